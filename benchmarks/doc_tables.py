"""The results tables of README.md and docs/*.md, rendered from the JSON they report.

  python -m benchmarks.doc_tables            # rewrites every marked table in place
  python -m benchmarks.doc_tables --check    # exit 1 if a table differs from its JSON

A table sits between `<!-- begin NAME -->` and `<!-- end NAME -->`. NAME is a file stem of
docs/benchmark_results/ (benchmark.py's JSON, rendered by benchmarks.report), or one of the
views below of those files and of docs/results/*.json (a default-job report.json with the run's
`command`, `date`, `commit` and `host` added). Each table carries one caption line: command,
date, hardware, commit.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from absl import app, flags

from benchmarks import report as bench_report
from benchmarks.presets import DPR_PASSAGES
from rag_jax.experiments.world.fever import markdown as fever_markdown
from rag_jax.experiments.world.paper_report import PAPER_TABLE1_NQ, PAPER_TABLE6_NQ, WorldReport
from rag_jax.experiments.world.paper_report import RECALL_KS as PAPER_RECALL_KS
from rag_jax.experiments.world.shift import rows_table as shift_rows_table
from rag_jax.utils.atomic import atomic_file

ROOT = Path(__file__).resolve().parent.parent
BENCHMARK_RESULTS = ROOT / "docs" / "benchmark_results"
RESULTS = ROOT / "docs" / "results"
MARKER = re.compile(r"<!-- begin (?P<name>[\w.]+) -->\n.*?<!-- end (?P=name) -->", re.S)


def _load(path: Path) -> dict[str, Any]:
  return json.loads(path.read_text())


def _bench(name: str) -> dict[str, Any]:
  report = _load(BENCHMARK_RESULTS / f"{name}.json")
  bench_report.derive(report)
  return report


def world_caption(r: dict[str, Any]) -> str:
  """`command` (date; hardware; jax; commit; seconds of phases)."""
  m = r["machine"]
  return (f"`{r['command']}` ({r['date']}; {m['cpu_cores']} CPU cores, {r['host']}, "
          f"{len(m['devices'])} {'device' if len(m['devices']) == 1 else 'devices'}; "
          f"jax {m['jax']}; commit {r['commit']}; {r['total_seconds']:.0f} s of phases)")


def _models(r: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
  return [("RAG-Sequence", r["rag_sequence"]), ("RAG-Token", r["rag_token"])]


def world_summary(r: dict[str, Any]) -> str:
  """The README's table: held-out EM, recall@1 and hot-swap per model."""
  k1 = next(iter(r["retriever"]["recall_before"]))
  lines = [world_caption(r), "",
           "| model | held-out EM | " + k1 + " after training | changed facts following world "
           "2's index |", "|---|---|---|---|"]
  for label, m in _models(r):
    s = m["hot_swap"]
    lines.append(f"| {label} | **{m['heldout_em']:.3f}** | {m['recall_after'][k1]:.3f} | "
                 f"{s['follow_new_index']} / {s['changed']} |")
  cb = r["closed_book"]
  lines.append(f"| closed-book BART | **{cb['heldout_em']:.3f}** (majority answer "
               f"{r['majority_em']:.3f}) | | |")
  return "\n".join(lines)


def world_tables(r: dict[str, Any]) -> str:
  """docs/world.md's tables: EM and losses, recall before / after, hot-swap, phase seconds."""
  ks = list(r["retriever"]["recall_before"])
  lines = [world_caption(r), "",
           "| model (training objective) | decoder that ran | held-out EM | train loss (first -> "
           "last window) | steps/s |", "|---|---|---|---|---|"]
  for label, m in _models(r):
    lines.append(f"| {label} | {m['decoder']['name']} | **{m['heldout_em']:.3f}** | "
                 f"{m['train_loss_first']:.3f} -> {m['train_loss_last']:.3f} | "
                 f"{m['steps_per_s']:.2f} |")
  cb = r["closed_book"]
  lines += [f"| closed-book BART (same size, steps) | {cb['decoder']['name']} | "
            f"**{cb['heldout_em']:.3f}** | {cb['train_loss_first']:.3f} -> "
            f"{cb['train_loss_last']:.3f} | |",
            f"| majority answer per attribute | | {r['majority_em']:.3f} | | |", "",
            "| question encoder | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks),
            "| retriever (before RAG training) | "
            + " | ".join(f"{r['retriever']['recall_before'][k]:.3f}" for k in ks) + " |"]
  for label, m in _models(r):
    lines.append(f"| after {label} training | "
                 + " | ".join(f"{m['recall_after'][k]:.3f}" for k in ks) + " |")
  lines += ["", "| hot-swap to world 2's index | changed facts | new value | old value |",
            "|---|---|---|---|"]
  for label, m in _models(r):
    s = m["hot_swap"]
    lines.append(f"| {label} | {s['changed']} | {s['follow_new_index']} | "
                 f"{s['keep_old_answer']} |")
  phases = r["phase_seconds"]
  lines += ["", "| phase | " + " | ".join(phases) + " | total |",
            "|---|" + "---|" * (len(phases) + 1),
            "| seconds | " + " | ".join(f"{v:.1f}" for v in phases.values())
            + f" | **{r['total_seconds']:.1f}** |"]
  return "\n".join(lines)


def world_hard(_: Any = None) -> str:
  """docs/world.md's harder-world tables: EM, recall and hot-swap, with EDA and without it (the
  same config with retriever.question_eda = 0)."""
  r, plain = _load(RESULTS / "world_hard.json"), _load(RESULTS / "world_hard_no_eda.json")
  ks = list(r["retriever"]["recall_before"])
  lines = [world_caption(r), "", f"Without EDA: {world_caption(plain)}", "",
           "| model | decoder | held-out EM | without EDA |", "|---|---|---|---|"]
  pairs = list(zip(_models(r), _models(plain), strict=True))
  for (label, m), (_, p) in pairs:
    lines.append(f"| {label} | {m['decoder']['name']} | **{m['heldout_em']:.3f}** | "
                 f"{p['heldout_em']:.3f} |")
  cb, cb_plain = r["closed_book"], plain["closed_book"]
  lines += [f"| closed-book BART | {cb['decoder']['name']} | **{cb['heldout_em']:.3f}** | "
            f"{cb_plain['heldout_em']:.3f} |",
            f"| majority answer per attribute | | {r['majority_em']:.3f} | "
            f"{plain['majority_em']:.3f} |", "",
            "| question encoder (held-out paraphrases) | " + " | ".join(ks) + " | without EDA |",
            "|---|" + "---|" * (len(ks) + 1)]
  rows = [("retriever (before RAG training)", r["retriever"]["recall_before"],
           plain["retriever"]["recall_before"])]
  rows += [(f"after {label} training", m["recall_after"], p["recall_after"])
           for (label, m), (_, p) in pairs]
  for label, ours, theirs in rows:
    lines.append(f"| {label} | " + " | ".join(f"{ours[k]:.3f}" for k in ks) + " | "
                 + " / ".join(f"{theirs[k]:.3f}" for k in ks) + " |")
  lines += ["", "| hot-swap to world 2's index | changed facts | new value | old value | "
            "without EDA (new / old) |", "|---|---|---|---|---|"]
  for (label, m), (_, p) in pairs:
    s, t = m["hot_swap"], p["hot_swap"]
    lines.append(f"| {label} | {s['changed']} | {s['follow_new_index']} | "
                 f"{s['keep_old_answer']} | {t['follow_new_index']} / {t['keep_old_answer']} |")
  return "\n".join(lines)


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def _paper_worlds(r: dict[str, Any]) -> list[tuple[str, Any]]:
  return [(name, WorldReport.from_dict(w)) for name, w in r["worlds"].items()]


def world_paper_table6(r: dict[str, Any]) -> str:
  """Tables 1 and 6 in miniature: held-out EM and recall@k of every row, per world, beside the
  paper's NQ EM (Table 6 dev; Table 1 test for the learned rows)."""
  worlds = _paper_worlds(r)
  head = " | ".join(f"{name} world: EM | " + " / ".join(f"R@{k}" for k in PAPER_RECALL_KS)
                    for name, _ in worlds)
  lines = [world_caption(r), "", f"| row | {head} | paper NQ |",
           "|---|" + "---|---|" * len(worlds) + "---|"]
  majority = " / ".join(_pct(w.evaluation.majority_em) for _, w in worlds)
  lines.append(f"| closed-book BART (majority answer {majority}) | "
               + " | ".join(f"{_pct(w.closed_book_em)} | " for _, w in worlds)
               + " | (T5-11B 34.5) |")
  for key, row in worlds[0][1].evaluation.rows.items():
    cells = []
    for _, w in worlds:
      s = w.evaluation.rows[key].scores
      cells.append(f"{_pct(s.em)} | "
                   + " / ".join(_pct(s.recall[f"recall@{k}"]) for k in PAPER_RECALL_KS))
    test = PAPER_TABLE1_NQ.get(row.row)
    paper = f"{PAPER_TABLE6_NQ[row.row]}" + (f" (test {test})" if test else "")
    lines.append(f"| {row.row} | " + " | ".join(cells) + f" | {paper} |")
  return "\n".join(lines)


def world_paper_hot_swap(r: dict[str, Any]) -> str:
  """The hot-swap 2x2 of every row, per world: % of the changed facts answered with world 1's /
  world 2's value, over world 1's index and over world 2's."""
  worlds = _paper_worlds(r)
  lines = [world_caption(r), "",
           "| row | " + " | ".join(f"{name} world, index 1 | index 2" for name, _ in worlds)
           + " |", "|---|" + "---|---|" * len(worlds)]
  for key, row in worlds[0][1].evaluation.rows.items():
    cells = []
    for _, w in worlds:
      h = w.evaluation.rows[key].scores.hot_swap
      cells += [f"{_pct(h.share(h.old_index_gave_old_answer))} / "
                f"{_pct(h.share(h.old_index_gave_new_answer))}",
                f"{_pct(h.share(h.keep_old_answer))} / {_pct(h.share(h.follow_new_index))}"]
    lines.append(f"| {row.row} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def world_paper_fever(r: dict[str, Any]) -> str:
  """The FEVER-like column of each world that has it, as the job's report.md shows it (label
  accuracy, per class, the deciding passage's recall@k, the paper's FEVER-3 dev accuracy)."""
  lines = [world_caption(r), ""]
  for name, w in _paper_worlds(r):
    if w.fever is not None:
      lines += [f"{name} world:", "", *fever_markdown(w.fever, w.fever_steps)]
  return "\n".join(lines).rstrip()


def world_shift(r: dict[str, Any]) -> str:
  """The shifted world: the world-A retriever's recall@5 on both worlds, then every row's EM,
  recall@5 over its own index and over world B as built, speed and staleness
  (rag_jax.experiments.world.shift's report table)."""
  before = r["retriever"]
  return "\n".join([
      world_caption(r), "",
      f"World-A retriever, held-out recall@5: {before['recall_world_a']['recall@5']:.3f} on "
      f"world A, {before['recall_world_b']['recall@5']:.3f} on world B "
      f"({r['passages']} passages).", "", *shift_rows_table(r)])


def _where(r: dict[str, Any]) -> str:
  """'2026-11-28, 1 x cpu, 2 host CPUs, commit 5c328e3': when, on what, from which commit."""
  m = r["machine"]
  return (f"{r['date'][:10]}, {m['devices']}, {m['cpu_count']} host CPUs, "
          f"commit {r.get('commit', 'not recorded')}")


def _bench_caption(r: dict[str, Any]) -> str:
  return f"`{r['command']}` ({_where(r)})"


# The README's headline: (label, workload, case prefix) per row, one column per JSON.
HEADLINE_ROWS = (
    ("training step, RAG-Sequence", "train", "rag_sequence"),
    ("training step, RAG-Token", "train", "rag_token"),
    ("RAG-Token beam search", "generate", "RAG-Token beam"),
    ("RAG-Sequence thorough decoding", "generate", "RAG-Sequence thorough"),
)
HEADLINE_COLUMNS = (("paper_h200", "1 x H200, BART-large, bf16"),
                    ("base_cpu", "2 CPU cores, BART-base, float32"))


def headline(_: Any = None) -> str:
  """The README's benchmark table: rag_jax's speed over transformers' in the same run."""
  reports = {stem: _bench(stem) for stem, _ in HEADLINE_COLUMNS}
  lines = ["| rag_jax vs transformers | " + " | ".join(t for _, t in HEADLINE_COLUMNS) + " |",
           "|---|" + "---:|" * len(HEADLINE_COLUMNS)]
  for label, workload, case in HEADLINE_ROWS:
    cells = []
    for stem, _ in HEADLINE_COLUMNS:
      row = next(x for x in reports[stem]["results"]
                 if x["workload"] == workload and x["case"].startswith(case))
      cells.append(f"**{row['ratio_to_peer']:.2f}x**")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  sources = "; ".join(
      f"[{stem}](docs/benchmark_results/{stem}.json): {_where(reports[stem])}"
      for stem, _ in HEADLINE_COLUMNS)
  lines += ["", f"Ratio = transformers' time / rag_jax's, same run, weights and inputs; {sources}; "
            "commands in [docs/benchmarks.md](docs/benchmarks.md)."]
  return "\n".join(lines)


def calibration(r: dict[str, Any]) -> str:
  """The settings ScaNN's calibration timed on its sample, per target recall."""
  lines = [_bench_caption(r), "",
           "| target recall@100 | reorder | leaves found | recall@100 (sample) | q/s (sample) |",
           "|---:|---:|---:|---:|---:|"]
  for row in r["results"]:
    ours = row["rag_jax"]
    if "calibration_settings" not in ours:
      continue
    best = max(s[3] for s in ours["calibration_settings"])
    for leaves, reorder, recall, qps in ours["calibration_settings"]:
      q = f"**{qps:,.0f}**" if qps == best else f"{qps:,.0f}"
      lines.append(f"| {ours['target_recall']} | {reorder} | {leaves} | {recall:.3f} | {q} |")
  return "\n".join(lines)


def bert_parameters(cfg: dict[str, Any]) -> int:
  """A BERT encoder without pooler (DPR's): embeddings and their LayerNorm, then per layer the
  Q/K/V/output projections, the feed-forward pair and two LayerNorms."""
  h, f = cfg["hidden_size"], cfg["intermediate_size"]
  embeddings = (cfg["vocab_size"] + cfg["max_position_embeddings"] + 2) * h + 2 * h
  layer = 4 * (h * h + h) + 2 * h * f + f + h + 4 * h
  return embeddings + cfg["num_hidden_layers"] * layer


REFRESH_BOUNDS = (1_000, 10_000, 100_000)  # Staleness bounds (steps) of the rolling refresh.


def refresh_plan(r: dict[str, Any]) -> str:
  """docs/training.md's refresh cost at the paper's scale, computed from one benchmark run's
  passage-encoding rate and RAG-Sequence step time (one device) and the Wikipedia index size."""
  enc = next(x for x in r["results"] if x["workload"] == "encode")
  step = next(x for x in r["results"] if x["workload"] == "train")
  rate, step_s = enc["rag_jax"]["items_per_s"], step["rag_jax"]["median_s"]
  n, width = DPR_PASSAGES, r["shape"]["encode_length"]
  retrieved = step["batch"] * step["n_docs"]
  in_step = 3 * retrieved / rate  # forward + backward of the retrieved passages: ~3 forwards
  gib = 2.0**30
  lines = [
      f"From `{r['command']}` ({_where(r)}): the DPR context encoder at {rate:,.0f} passages/s "
      f"({width} tokens, {enc['dtype']}), the RAG-Sequence step at {step_s * 1e3:.1f} ms "
      f"({step['batch']} questions x {step['n_docs']} passages); {n:,} passages.", "",
      "| item | 1 device | 8 devices (each its shard) |", "|---|---:|---:|",
      f"| full refresh | {n / rate / 60:.1f} min | {n / 8 / rate / 60:.1f} min |",
      f"| re-encoding the {retrieved} retrieved passages in the step (~3 forwards) | "
      f"{in_step * 1e3:.1f} ms ({in_step / step_s:.0%} of the step) | the same per device |"]
  for bound in REFRESH_BOUNDS:
    one, eight = math.ceil(n / bound), math.ceil(n / 8 / bound)
    lines.append(f"| rolling, every row at most {bound:,} steps old: rows per step, encoding "
                 f"time / step time | {one:,}, {one / rate / step_s:.2f}x | "
                 f"{eight:,}, {eight / rate / step_s:.2f}x |")
  table = n * (width * 2 + 4) / gib  # uint16 ids (BERT's 30,522 fit) + int32 lengths
  encoder = bert_parameters(r["shape"]["question_encoder"]) * 16 / gib  # fp32 p, g, 2 moments
  lines.append(f"| memory: encoder table {n:,} x {width} uint16 + lengths; `encoded_at` int32; "
               f"context encoder with gradient and AdamW, fp32 | {table:.2f} + "
               f"{n * 4 / gib:.2f} + {encoder:.2f} GiB | 1/8 of the first two each |")
  return "\n".join(lines)


def encode_mixed(r: dict[str, Any]) -> str:
  """Passage encoding against transformers: per-token speed (fixed batch) and a mixed-length
  corpus each side encodes as it is used (benchmarks/encoding.py)."""
  lines = [_bench_caption(r), "",
           "| passages | rag_jax /s | transformers /s | ratio (each repeat) | tokens run | "
           "max abs diff | programs |",
           "|---|---:|---:|---:|---:|---:|---:|"]
  for row in r["results"]:
    if row["workload"] != "encode":
      continue
    ours, peer = row["rag_jax"], row["peer"]
    each = row.get("ratio_per_repeat")
    spread = f" ({min(each):.2f}-{max(each):.2f})" if each else ""
    tokens = (f"{ours['tokens_run']:,} / {peer['tokens_run']:,}" if "tokens_run" in ours
              else "same")
    diff = f"{row['max_abs_diff']:.1e}" if "max_abs_diff" in row else "-"
    lines.append(f"| {row['case'].removeprefix('DPR context encoder, ').removesuffix(' tokens')} | "
                 f"{ours['items_per_s']:.2f} | {peer['items_per_s']:.2f} | "
                 f"**{row['ratio_to_peer']:.2f}x**{spread} | {tokens} | {diff} | "
                 f"{ours.get('compiled_programs', 1)} |")
  return "\n".join(lines)


def encode_split(_: Any = None) -> str:
  """The mixed corpus encoded by one process and by two (each its block): a check that the
  work is split, with the embeddings' sum of absolute values as the check that it is the same
  work. No rate: without a peer in the same run it would read as a speed claim."""
  runs = [_bench(f"world_cpu_encode_{n}") for n in ("1x1", "2x1")]
  m = runs[1]["machine"]
  launch = (f"python -m rag_jax.commands.launch --num_processes={m['processes']} "
            f"--cpu_devices={m['devices_per_process']} --")
  same = runs[1].get("commit") == runs[0].get("commit")
  lines = [f"`{runs[0]['command']}` ({_where(runs[0])}), and under `{launch}`"
           f"{'' if same else ' (commit ' + str(runs[1].get('commit')) + ')'}:", "",
           "| processes x devices | rows per process | sum of abs(embeddings) |",
           "|---|---|---:|"]
  for r in runs:
    row = next(x for x in r["results"] if x["workload"] == "encode" and "embedding_abs_sum" in x)
    shares = row.get("rows_per_process", [row["passages"]])
    lines.append(f"| {r['machine']['processes']} x {r['machine']['devices_per_process']} | "
                 f"{', '.join(map(str, shares))} | {row['embedding_abs_sum']:.4f} |")
  return "\n".join(lines)


# Marker name -> (renderer, its JSON source; None: the renderer reads its own).
VIEWS: dict[str, tuple[Callable[[Any], str], Path | None]] = {
    "world_default.summary": (world_summary, RESULTS / "world_default.json"),
    "world_default": (world_tables, RESULTS / "world_default.json"),
    "benchmark_headline": (headline, None),
    "base_cpu_retrieval.calibration": (calibration, BENCHMARK_RESULTS / "base_cpu_retrieval.json"),
    "world_hard": (world_hard, None),
    "base_cpu_encode.mixed": (encode_mixed, BENCHMARK_RESULTS / "base_cpu_encode.json"),
    "encode_split": (encode_split, None),
    "world_paper.table6": (world_paper_table6, RESULTS / "world_paper.json"),
    "world_paper.hot_swap": (world_paper_hot_swap, RESULTS / "world_paper.json"),
    "world_paper.fever": (world_paper_fever, RESULTS / "world_paper.json"),
    "world_shift": (world_shift, RESULTS / "world_shift.json"),
    "paper_h200_profile.refresh_plan": (refresh_plan,
                                        BENCHMARK_RESULTS / "paper_h200_profile.json"),
}


def render(name: str) -> str:
  """The markdown of one marker name."""
  if name in VIEWS:
    fn, source = VIEWS[name]
    return fn(None if source is None else
              (_bench(source.stem) if source.parent == BENCHMARK_RESULTS else _load(source)))
  path = BENCHMARK_RESULTS / f"{name}.json"
  if not path.exists():
    raise KeyError(f"no table named {name!r}: neither a view of benchmarks/doc_tables.py nor "
                   f"{path.relative_to(ROOT)}")
  return bench_report.render(_load(path))


def markdown_files() -> list[Path]:
  return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def regenerate(text: str) -> str:
  """text with every marked table replaced by its rendering."""
  return MARKER.sub(lambda m: f"<!-- begin {m['name']} -->\n{render(m['name'])}\n"
                              f"<!-- end {m['name']} -->", text)


_CHECK = flags.DEFINE_bool("check", False, "Only compare; exit 1 where a table differs.")


def main(argv: list[str]) -> None:
  del argv
  stale = []
  for path in markdown_files():
    text = path.read_text()
    new = regenerate(text)
    if new == text:
      continue
    stale.append(str(path.relative_to(ROOT)))
    if not _CHECK.value:
      with atomic_file(path, "w") as f:
        f.write(new)
  if stale:
    print(("stale: " if _CHECK.value else "rewritten: ") + ", ".join(stale))
    if _CHECK.value:
      sys.exit(1)


if __name__ == "__main__":
  app.run(main)
