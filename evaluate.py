r"""Evaluates a checkpoint and an index: `python evaluate.py --config=... --workdir=...`.

    python evaluate.py                                      # ./workdir, a finished default run
    python evaluate.py --config=configs/paper_nq.py --workdir=runs/nq \
        --config.rag_checkpoint=/ckpt/rag-sequence-nq --config.index_dir=/data/wiki_index \
        --config.eval.test_file=/data/dpr/nq-test.qa.csv     # [--retrieval_only | --docs=5,10,50]

Writes <workdir>/eval/<row>/predictions.jsonl and metrics.json and prints this run beside the
paper's number (or, for the default job, beside train.py's report); a killed evaluation resumes.
Modes and files: docs/evaluation.md. Runs from any directory: the default config is found
beside this file. Errors: one line `error: ...`, exit 2 for a bad flag, override or config file
and 1 for any other anticipated failure; --traceback shows its traceback
(rag_jax/commands/common.py, docs/failure_modes.md). Runs on several processes too, each
answering its share of the questions (docs/distributed.md).
"""

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from absl import flags

from rag_jax.commands.common import ConfigFile, define_common_flags, run_main, start_processes
from rag_jax.utils.errors import InputError, UsageError, os_errors_under
from rag_jax.utils.host_memory import configure_host_allocator
from rag_jax.utils.logs import quiet_console

FLAGS = flags.FLAGS

# config.trainer -> the module whose evaluation_runs / paper_runs (config, workdir) -> [EvalRun]
# gives the evaluation runs of that kind of config (imported once the flags are parsed: they
# load jax and the models, seconds, and a bad flag is refused before).
RUNS = {"world": ("rag_jax.experiments.world.evaluation", "evaluation_runs"),
        "rag": ("rag_jax.evaluation.paper", "paper_runs")}

CONFIG = ConfigFile(Path(__file__).resolve().parent / "configs" / "default.py",
                    "Experiment config file: configs/paper_<task>.py, or the default job's for "
                    "its workdir.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Where eval/ goes (a finished default run "
                               "for configs/default.py).")
_RETRIEVAL_ONLY = flags.DEFINE_bool("retrieval_only", False, "Only the question encoder and the "
                                    "index: recall@k and precision@k (config.eval.recall_ks).")
_DOCS = flags.DEFINE_string("docs", "", "The paper's Figure 3: evaluate at each of these numbers "
                            "of docs, e.g. 5,10,20,30,40,50 (table and PNG plot).")
define_common_flags(FLAGS)
flags.declare_key_flag("config")
flags.declare_key_flag("traceback")


def evaluate(positional: list[str]) -> None:
  """The evaluation of the parsed flags."""
  if positional:
    raise UsageError(f"unexpected arguments {positional}; every setting is a flag")
  configure_host_allocator()  # Before jax starts its CPU client.
  # On several processes, processes 1.. log to WORKDIR/eval/.logs.
  start_processes(FLAGS, "evaluate.py", Path(_WORKDIR.value) / "eval" / ".logs")
  quiet_console()
  config = CONFIG.value
  kind = config.get("trainer")
  if kind not in RUNS or "eval" not in config:
    raise UsageError(f"{CONFIG.path}: not an evaluation config (config.trainer {kind!r}, "
                     f"expected one of {sorted(RUNS)}, and an `eval` group); use "
                     "configs/paper_<task>.py or configs/default.py")
  from rag_jax.evaluation import paper  # here: it loads jax, after the flags

  paper.validate(config)  # every field the evaluation reads, before any file is read
  module, runs = RUNS[kind]
  runs = getattr(importlib.import_module(module), runs)
  from rag_jax.evaluation import runner  # here: it loads the models, after the flags
  try:
    docs = runner.ints(_DOCS.value, "--docs")
    runner.check_modes(_RETRIEVAL_ONLY.value, docs)
  except InputError as e:
    raise UsageError(str(e)) from None
  with os_errors_under(_WORKDIR.value):
    runner.evaluate(runs(config, _WORKDIR.value), _WORKDIR.value,
                    retrieval_only=_RETRIEVAL_ONLY.value, docs=docs)


def main(argv: Sequence[str] | None = None) -> int:
  """Evaluates with argv's flags (default sys.argv[1:]); returns the exit code."""
  return run_main(FLAGS, "python evaluate.py", __doc__, argv, evaluate, config=CONFIG)


if __name__ == "__main__":
  sys.exit(main())
