"""Times rag_jax against transformers' PyTorch RAG and faiss in one run, at a preset's shapes.

  python benchmark.py --preset=tiny                 # seconds on a CPU (CI-sized)
  python benchmark.py --preset=base                 # the BERT-base + BART-base anchor shape
  python benchmark.py --preset=paper --max_batch    # BERT-base + BART-large, on an accelerator

Workloads: the RAG-Sequence / RAG-Token training step, RAG generation (RAG-Token beam,
RAG-Sequence thorough and fast), retrieval (exact and ScaNN against faiss HNSW; exact on the
device against torch), passage encoding. Prints a table and writes <workdir>/<preset>.json:
medians over repeats after warm-up, compile time apart, peak memory, the ratio to the peer and
the fraction of the machine's measured matmul peak or copy bandwidth. docs/benchmarks.md
explains every field and records the measured figures.

Every flag is checked before any group runs (benchmarks/cli.py): a bad one prints one line
`error: ...` and exits 2; a workdir that cannot be written exits 1 (rag_jax/commands/common.py).

Several processes (docs/distributed.md; e.g. `python -m rag_jax.commands.launch
--num_processes=2 --cpu_devices=1 -- python benchmark.py --workloads=train,encode`): the train
step data parallel over the global mesh (the preset's batch is the global batch, each process
feeding its rows), the fixed encoding batch likewise, the mixed corpus split into one block per
process (each encodes its own), the exact search over an index sharded on the global mesh. Every
process makes the same timed calls, which end together; a figure is global work / wall time,
against the processes' ceilings summed. Peers, ScaNN and faiss are off, and without
--workloads so is generate; generate, --max_batch, --profile, --isolate=yes, a peer or ScaNN
flag given and a batch the global devices do not divide are refused before any work. Process 0
prints and writes the JSON (`machine.processes`, `devices_per_process`); process i logs to
<workdir>/.logs/process-<i>.log (the launcher's --log_dir under the launcher).
"""

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

# jax must not reserve most of the accelerator's memory: torch shares the device in this process.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

from absl import flags  # noqa: E402

from benchmarks import cli, presets  # noqa: E402
from rag_jax.commands.common import (  # noqa: E402
  define_common_flags,
  run_main,
  start_processes,
)
from rag_jax.distributed import ENV_LOG_DIR, is_primary, settings  # noqa: E402
from rag_jax.utils.errors import UsageError, os_errors_under  # noqa: E402
from rag_jax.utils.host_memory import configure_host_allocator  # noqa: E402
from rag_jax.utils.logs import LogFile  # noqa: E402

_PRESET = flags.DEFINE_enum("preset", "tiny", ["tiny", "world", "base", "paper"], "Shapes.")
_WORKLOADS = flags.DEFINE_list("workloads", list(cli.WORKLOADS),
                               "Workload groups to run, in this order.")
_MAX_BATCH = flags.DEFINE_bool("max_batch", False,
                               "Also find the largest RAG-Sequence training batch that fits "
                               "(accelerators; compiles the step again).")
_N_DOCS = flags.DEFINE_list("n_docs", [], "Passages per question to time (default: preset's).")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                           "Compute dtype; auto = bf16 on accelerators, float32 on CPU.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (the median is reported).",
                                lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls first (the first is compilation).",
                               lower_bound=0)
_PEERS = flags.DEFINE_bool("peers", True, "Also time transformers / faiss / torch.")
_INDEX_ROWS = flags.DEFINE_integer("index_rows", 0, "Retrieval rows (0: the preset's).",
                                   lower_bound=0)
_SCANN = flags.DEFINE_multi_string(
    "scann", list(cli.SCANN_SPECS), "ScaNN settings 'leaves_per_sqrt_n:width[,width]' "
    "(repeatable); a width is a share of the leaves (0.03) or 'recall=R', the smallest reaching "
    "recall@100 R on held-out queries.")
_FAISS_EF = flags.DEFINE_list("faiss_ef", [str(ef) for ef in cli.FAISS_EF],
                              "faiss HNSW efSearch values.")
_HNSW_M = flags.DEFINE_integer("hnsw_m", 128, "faiss HNSW links per node.", lower_bound=2)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/benchmark", "Where the JSON and log go.")
_BUDGET = flags.DEFINE_float("time_budget_s", 3600.0, "Groups starting later are skipped.")
_ISOLATE = flags.DEFINE_enum("isolate", "auto", ["auto", "yes", "no"],
                             "One child process per group (auto: yes, except the tiny preset "
                             "on CPU).")
_PROFILE = flags.DEFINE_integer(
    "profile", 0, "Trace this many more calls of each training step (and of the largest device "
    "search) with jax.profiler and add a per-op summary to the JSON (benchmarks/profile.py).")
_TRAIN_KINDS = flags.DEFINE_list("train_kinds", list(cli.TRAIN_KINDS),
                                 "RAG models of the train workload.")
_ATTENTION = flags.DEFINE_list(
    "attention", ["xla"],
    "rag_jax's BART attention, one or more of: xla (the XLA core), cudnn (cuDNN's fused "
    "attention where it applies; NVIDIA GPUs; rag_jax.models.layers.DotProductAttention). The "
    "train group times each against the same peer measurement; the other groups use the first.")
_RESCORE = flags.DEFINE_list(
    "rescore", ["auto:auto"],
    "Thorough decoding's rescoring settings G:W to time, each against the same transformers "
    "call: G candidates per question per pass, W decoder positions per call; each a positive "
    "int, auto (the library's default: a quarter) or all (one pass, one call).")
_GROUP = flags.DEFINE_string("group", None, "Internal: run one group and write --child_out.")
_CHILD_OUT = flags.DEFINE_string("child_out", None, "Internal: the child's result file.")
define_common_flags(flags.FLAGS)
flags.declare_key_flag("traceback")
for _name, _check in (("workloads", cli.check_workloads), ("n_docs", cli.check_positive_ints),
                      ("faiss_ef", cli.check_positive_ints), ("scann", cli.check_scann),
                      ("train_kinds", cli.check_train_kinds), ("attention", cli.check_attention),
                      ("rescore", cli.check_rescore), ("group", cli.check_group),
                      ("time_budget_s", cli.check_time_budget)):
  flags.register_validator(_name, _check)
flags.register_multi_flags_validator(["group", "child_out"],
                                    lambda v: not v["group"] or bool(v["child_out"]),
                                    "--group needs --child_out")


def benchmark(positional: list[str]) -> None:
  """The run of the parsed (and checked) flags."""
  if positional:
    raise UsageError(f"unexpected arguments {positional}; every setting is a flag")
  configure_host_allocator()  # As train.py does; before jax starts its CPU client.
  if _expects_several_processes():  # refused before joining where the flags say so
    _check_several_processes()
  options = {"preset": _PRESET.value, "dtype": _DTYPE.value, "repeats": _REPEATS.value,
             "warmup": _WARMUP.value, "n_docs": [int(n) for n in _N_DOCS.value],
             "peers": _PEERS.value, "workdir": _WORKDIR.value,
             "time_budget_s": _BUDGET.value, "isolate": _ISOLATE.value,
             "index_rows": _INDEX_ROWS.value, "scann": _SCANN.value,
             "faiss_ef": [int(v) for v in _FAISS_EF.value], "hnsw_m": _HNSW_M.value,
             "profile": _PROFILE.value, "train_kinds": _TRAIN_KINDS.value,
             "attention": _ATTENTION.value, "rescore": _RESCORE.value}
  with os_errors_under(options["workdir"]):
    count = start_processes(flags.FLAGS, "benchmark.py", Path(options["workdir"]) / ".logs")
    import jax  # here: jax and torch load in seconds, after the flags

    from benchmarks import runner
    workloads = _workloads(count > 1)
    if count > 1:  # the same checks (a cluster jax detected), and the batches' split
      _check_several_processes(jax.device_count())
      options.update(peers=False, isolate="no", processes=count)
      if is_primary():
        logs = os.environ.get(ENV_LOG_DIR) or Path(options["workdir"]) / ".logs"
        print(f"{count} processes: workloads {','.join(workloads)}; peers, ScaNN and faiss "
              f"off; processes 1.. log to {logs}", flush=True)
    Path(options["workdir"]).mkdir(parents=True, exist_ok=True)
    # Library INFO lines go to the workdir's log; the console keeps warnings, phases and results.
    # (Process i > 0: its log file, which its stderr already is.)
    handler = (LogFile(Path(options["workdir"]) / "benchmark.log") if is_primary()
               else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    if _GROUP.value:  # A child: one group, its result to a file.
      out = Path(_CHILD_OUT.value)
      result = runner.run_group(_GROUP.value, options,
                                lambda rows: runner.write_json(runner.partial_path(out), rows))
      runner.write_json(out, result)
      return
    groups = ["ceilings", *workloads]
    if _MAX_BATCH.value:
      groups += ["max_batch_jax", "max_batch_torch"]
    report = runner.run(options, groups, " ".join(["python", *sys.argv]))
    if is_primary():
      print(runner.table(report))
      print(f"JSON: {Path(options['workdir']) / (options['preset'] + '.json')}")


def _expects_several_processes() -> bool:
  """Whether the flags or the environment start this process as one of several (a cluster jax
  detects may name its count only once joined: checked again then)."""
  v = flags.FLAGS
  found = settings(v.coordinator_address, v.num_processes, v.process_id, v.distributed,
                   v.distributed_timeout)
  return found is not None and found.num_processes != 1


def _workloads(several: bool) -> list[str]:
  """--workloads; on several processes without the flag, those of its default that run there."""
  if several and not _WORKLOADS.present:
    return [w for w in _WORKLOADS.value if w in cli.MULTIPROCESS_WORKLOADS]
  return _WORKLOADS.value


def _check_several_processes(devices: int | None = None) -> None:
  """Refuses (UsageError: exit 2, one line) what has no several-process form, and with the
  global device count known, batches that do not split over it."""
  given = {name: flags.FLAGS[name].value for name in cli.ONE_PROCESS_FLAGS
           if flags.FLAGS[name].present}
  workloads = _workloads(True)
  problem = cli.several_process_problem(workloads, given, _ISOLATE.value)
  if problem is None and devices is not None:
    problem = cli.global_batch_problem(presets.get(_PRESET.value), workloads, devices)
  if problem:
    raise UsageError(problem)


def main(argv: Sequence[str] | None = None) -> int:
  """Benchmarks with argv's flags (default sys.argv[1:]); returns the exit code."""
  return run_main(flags.FLAGS, "python benchmark.py", __doc__, argv, benchmark)


if __name__ == "__main__":
  sys.exit(main())
