"""Runs the benchmark's workload groups, derives ratios and fractions of peak, writes the JSON.

Groups run in a fixed order (the machine's ceilings first), each in a child process of its own
(`--group`; `--isolate=auto` keeps only the tiny preset on CPU in-process, for its one-minute
run), so one group's memory (jax's and torch's caching allocators keep what they took; on CPU,
the host heap a previous group left) or a crash cannot disturb the next, and a group that
overruns its share of `--time_budget_s` is stopped and recorded as such.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import multiprocess, presets, timing
from benchmarks.cli import GROUPS
from rag_jax.distributed import is_primary
from rag_jax.utils import host_memory
from rag_jax.utils.atomic import atomic_file


def run_group(group: str, options: dict[str, Any],
              finished: Callable[[list[dict[str, Any]]], None] | None = None) -> Any:
  """Runs one group in this process; returns its JSON-able result (a dict or a list). The train
  and generate groups, whose cases each compile a program of their own, hand the rows so far to
  `finished` after each case (a child process writes them out, so that a group stopped at the
  time budget keeps its finished cases)."""
  from benchmarks import encoding, generation, models, retrieval, train_step
  preset = presets.get(options["preset"])
  if options.get("n_docs"):
    preset = dataclasses.replace(preset, n_docs=tuple(options["n_docs"]))
  accel = timing.on_accelerator()
  dtype = models.compute_dtype(options["dtype"], accel, preset)
  reps, warm, peer = options["repeats"], options["warmup"], options["peers"]
  # The train group times each attention implementation; the others use the first.
  attentions = tuple(options.get("attention") or ("xla",))
  attention = attentions[0]
  # What an earlier group freed is still the process's (rag_jax/utils/host_memory.py): each
  # group starts on fresh pages, as it would in a process of its own.
  host_memory.release_free_memory()
  if group == "ceilings":
    size = 8192 if accel else 2048
    out = {"compute_dtype": dtype, "matmul_size": size,
           "jax_matmul_flops": timing.jax_matmul_peak(models.jnp_dtype(dtype), size),
           **timing.copy_bandwidth(2.0 if accel else 0.5, peer)}
    if peer:
      out["torch_matmul_flops"] = timing.torch_matmul_peak(dtype, size)
    if dtype != "float32":
      out["jax_matmul_flops_float32"] = timing.jax_matmul_peak(models.jnp_dtype("float32"), size)
    return multiprocess.summed_ceilings(out)
  if group in ("train", "generate"):
    rows: list[dict[str, Any]] = []
    if group == "train":
      cases = (row for n in preset.n_docs
               for kind in options.get("train_kinds") or train_step.KINDS
               for row in train_step.run_case(preset, kind, n, dtype, reps, warm, peer,
                                              options.get("profile", 0), attentions))
    else:
      cases = (row for kind, decoding in generation.MODES
               for row in generation.run_case(preset, kind, decoding, preset.n_docs[0], dtype,
                                              reps, warm, peer, attention,
                                              tuple(options.get("rescore") or ("auto:auto",))))
    for row in cases:
      rows.append(row)
      if finished:
        finished(rows)
    return rows
  if group == "retrieval":
    return retrieval.run(preset, reps, peer, profile_calls=options.get("profile", 0),
                         rows=options.get("index_rows") or None,
                         scann_specs=tuple(options.get("scann") or retrieval.SCANN_SPECS),
                         faiss_ef=tuple(options.get("faiss_ef") or retrieval.FAISS_EF),
                         hnsw_m=options.get("hnsw_m", 128))
  if group == "encode":
    return [encoding.run(preset, dtype, reps, warm, peer),
            encoding.run_mixed(preset, dtype, reps, warm, peer)]
  if group == "max_batch_jax":
    # The train group's row (already in this run's JSON) holds the memory plan the prediction
    # needs; only without it is the preset-batch step compiled again.
    first = _train_row(options, preset, dtype, attention) or next(train_step.run_case(
        preset, "rag_sequence", preset.n_docs[0], dtype, reps, warm, peer=False,
        attentions=(attention,)))
    largest = train_step.largest_jax_batch(preset, "rag_sequence", preset.n_docs[0], dtype,
                                           first["rag_jax"], reps, attention)
    return [_max_batch_row(preset, dtype, "rag_jax", largest)]
  if group == "max_batch_torch":
    largest = train_step.largest_torch_batch(preset, "rag_sequence", preset.n_docs[0], dtype,
                                             reps)
    return [_max_batch_row(preset, dtype, "peer", largest)]
  raise ValueError(f"unknown group {group!r}; choose from {GROUPS}")


def _train_row(options: dict[str, Any], preset, dtype: str,
               attention: str = "xla") -> dict[str, Any] | None:
  """This run's RAG-Sequence train row at the preset's batch and first n_docs, if the train
  group wrote one with a memory plan into <workdir>/<preset>.json."""
  path = Path(options["workdir"]) / f"{options['preset']}.json"
  if not path.exists():
    return None
  for row in json.loads(path.read_text()).get("results", []):
    ours = row.get("rag_jax") or {}
    if (row.get("workload") == "train" and row.get("kind") == "rag_sequence"
        and row.get("n_docs") == preset.n_docs[0] and row.get("batch") == preset.batch
        and row.get("dtype") == dtype and row.get("attention", "xla") == attention
        and ours.get("memory_plan")):
      return row
  return None


def _max_batch_row(preset, dtype: str, side: str, largest: dict[str, Any]) -> dict[str, Any]:
  from benchmarks import flops
  n = preset.n_docs[0]
  batch = largest.get("batch")
  row = {"workload": "train_max_batch", "case": f"largest rag_sequence batch, n_docs={n} "
         f"({'rag_jax' if side == 'rag_jax' else 'transformers'})", "kind": "rag_sequence",
         "n_docs": n, "batch": batch, "dtype": dtype, "unit": "questions", "items": batch,
         "rag_jax": None, "peer": None}
  row[side] = largest if side == "rag_jax" else {"name": "transformers + torch AdamW", **largest}
  if batch:
    row["flops_hand"] = flops.rag_train_step(preset.question_encoder, preset.generator, batch, n,
                                             preset.question_length, preset.context_length,
                                             preset.target_length)
  return row


def partial_path(child_out: Path) -> Path:
  """Where a child process keeps the rows of its group finished so far."""
  return child_out.with_name(child_out.name + ".partial")


def _child(group: str, options: dict[str, Any], timeout: float) -> Any:
  """Runs `benchmark.py --group=<group>` in a child process; its result, or an error dict that
  holds under "partial" the rows the child finished before it was stopped or failed."""
  with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp) / "result.json"
    cmd = [sys.executable, str(Path(__file__).resolve().parent.parent / "benchmark.py"),
           f"--group={group}", f"--child_out={out}", f"--preset={options['preset']}",
           f"--dtype={options['dtype']}", f"--repeats={options['repeats']}",
           f"--warmup={options['warmup']}", f"--peers={options['peers']}",
           f"--workdir={options['workdir']}", f"--n_docs={','.join(map(str, options['n_docs']))}",
           f"--index_rows={options['index_rows']}", *[f"--scann={s}" for s in options["scann"]],
           f"--faiss_ef={','.join(map(str, options['faiss_ef']))}", f"--hnsw_m={options['hnsw_m']}",
           f"--profile={options.get('profile', 0)}",
           f"--train_kinds={','.join(options.get('train_kinds') or [])}",
           f"--attention={','.join(options.get('attention') or ['xla'])}",
           f"--rescore={','.join(options.get('rescore') or ['auto:auto'])}"]
    env = dict(os.environ)
    if group == "max_batch_jax":  # jax alone on the device: let it take nearly all of it.
      env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = "0.95"
    try:
      proc = subprocess.run(cmd, timeout=max(1.0, timeout), capture_output=True, text=True,
                            env=env)
    except subprocess.TimeoutExpired:
      return _with_partial({"error": f"stopped after {timeout:.0f} s (time budget)"}, out)
    if proc.returncode != 0 or not out.exists():
      tail = (proc.stderr or proc.stdout)[-3000:]
      return _with_partial({"error": f"exit code {proc.returncode}", "stderr_tail": tail}, out)
    return json.loads(out.read_text())


def _with_partial(error: dict[str, Any], out: Path) -> dict[str, Any]:
  partial = partial_path(out)
  if partial.exists():
    error["partial"] = json.loads(partial.read_text())
    error["error"] += f"; kept the {len(error['partial'])} case(s) finished before"
  return error


def derive(report: dict[str, Any]) -> None:
  """Adds items/s, the ratio to the peer and fractions of the measured peaks to every row."""
  ceil = dict(report.get("ceilings") or {})
  # The machine's matmul peak: the faster of the two libraries' measured rates.
  peak = max(ceil.get("jax_matmul_flops") or 0.0, ceil.get("torch_matmul_flops") or 0.0)
  if report.get("ceilings"):
    report["ceilings"]["matmul_peak_flops"] = peak
  for row in report["results"]:
    ours, peer, hand = row.get("rag_jax"), row.get("peer"), row.get("flops_hand")
    items = row.get("items")
    for side in (ours, peer):
      if not side or "median_s" not in side:
        continue
      if items:
        side["items_per_s"] = items / side["median_s"]
      if hand:
        side["flops_per_s"] = hand / side["median_s"]
        if peak:
          side["fraction_of_peak"] = side["flops_per_s"] / peak
    if ours and peer and "median_s" in ours and "median_s" in peer:
      row["ratio_to_peer"] = peer["median_s"] / ours["median_s"]
    if ours and hand and ours.get("xla_flops"):
      row["xla_flops_over_hand"] = ours["xla_flops"] / hand


def table(report: dict[str, Any]) -> str:
  """The console table: one line per case."""
  lines = [f"{'workload':16s} {'case':66s} {'rag_jax/s':>10s} {'peer/s':>10s} {'ratio':>6s} "
           f"{'of peak':>8s}"]
  for row in report["results"]:
    ours, peer = row.get("rag_jax") or {}, row.get("peer") or {}
    fmt = lambda v: f"{v:10.2f}" if isinstance(v, float) else f"{'-':>10s}"  # noqa: E731
    ratio = row.get("ratio_to_peer")
    frac = ours.get("bandwidth_fraction", ours.get("fraction_of_peak"))
    lines.append(f"{row['workload']:16s} {row['case'][:66]:66s} {fmt(ours.get('items_per_s'))} "
                 f"{fmt(peer.get('items_per_s'))} "
                 f"{(f'{ratio:5.2f}x' if ratio else '     -'):>6s} "
                 f"{(f'{100 * frac:7.1f}%' if frac else '       -'):>8s}")
  for err in report["errors"]:
    lines.append(f"{err['group']}: {err['error']}")
  for row in report["results"]:
    if "error" in (row.get("rag_jax") or {}):
      lines.append(f"{row['workload']} {row['case']}: {row['rag_jax']['error'][:300]}")
  return "\n".join(lines)


def isolates(options: dict[str, Any], on_accelerator: bool) -> bool:
  """Whether each group runs in a child process: `--isolate`, where auto means yes except for the
  tiny preset on CPU (see the module docstring)."""
  if options["isolate"] != "auto":
    return options["isolate"] == "yes"
  return on_accelerator or options["preset"] != "tiny"


def run(options: dict[str, Any], groups: list[str], command: str) -> dict[str, Any]:
  """Runs `groups` in order within options['time_budget_s']; writes <workdir>/<preset>.json
  after each group (so a stopped run keeps what finished). On several processes every process
  runs every group and process 0 alone writes the file (its measurements: every timed call
  ends on all processes together)."""
  workdir = Path(options["workdir"])
  workdir.mkdir(parents=True, exist_ok=True)
  isolate = isolates(options, timing.on_accelerator())
  report = {"preset": options["preset"], "command": command,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "commit": timing.source_commit(),
            "machine": timing.machine(), "options": options,
            "shape": presets.get(options["preset"]).__dict__, "ceilings": None,
            "results": [], "errors": [], "seconds": {}}
  path = workdir / f"{options['preset']}.json"
  writes = is_primary()
  if writes:  # From the start this run's file, never an earlier run's (see _train_row).
    write_json(path, report)
  start = time.monotonic()
  for group in groups:
    left = options["time_budget_s"] - (time.monotonic() - start)
    if left <= 5:
      report["errors"].append({"group": group, "error": "not run: time budget spent"})
      continue
    print(f"[{time.monotonic() - start:7.1f} s] {group} ...", flush=True)
    t0 = time.monotonic()
    if isolate:
      result = _child(group, options, left)
    else:
      try:
        result = run_group(group, options)
      except Exception as error:  # noqa: BLE001 - recorded; the other groups still run
        logging.exception("group %s failed", group)
        result = {"error": f"{type(error).__name__}: {error}"[:2000],
                  "traceback": traceback.format_exc()[-3000:]}
    report["seconds"][group] = time.monotonic() - t0
    if isinstance(result, dict) and "error" in result:
      report["results"].extend(result.pop("partial", []))
      report["errors"].append({"group": group, **result})
    elif group == "ceilings":
      report["ceilings"] = result
    else:
      report["results"].extend(result)
    derive(report)
    if writes:
      write_json(path, report)
    print(f"[{time.monotonic() - start:7.1f} s] {group} done in {report['seconds'][group]:.1f} s",
          flush=True)
  return report


def write_json(path: Path, report: Any) -> None:
  """Writes JSON whole: a reader never sees a half-written file."""
  with atomic_file(path, "w") as f:
    f.write(json.dumps(report, indent=2, default=str) + "\n")
