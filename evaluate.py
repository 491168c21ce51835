"""Evaluates a checkpoint and an index: `python evaluate.py --config=... --workdir=...`.

    python evaluate.py                                      # ./workdir, a finished default run
    python evaluate.py --config=configs/paper_nq.py --workdir=runs/nq \
        --config.rag_checkpoint=/ckpt/rag-sequence-nq --config.index_dir=/data/wiki_index \
        --config.eval.test_file=/data/dpr/nq-test.qa.csv     # [--retrieval_only | --docs=5,10,50]

Writes <workdir>/eval/<row>/predictions.jsonl and metrics.json and prints this run beside the
paper's number (or, for the default job, beside train.py's report); a killed evaluation resumes.
Modes and files: docs/evaluation.md. Runs from any directory: the default config is found
beside this file.
"""

import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from rag_jax.commands.common import one_line_errors
from rag_jax.evaluation import paper, runner
from rag_jax.experiments.world import evaluation as world_evaluation
from rag_jax.utils.host_memory import configure_host_allocator
from rag_jax.utils.logs import quiet_console

# config.trainer -> the evaluation runs of that kind of config: (config, workdir) -> [EvalRun].
RUNS = {"world": world_evaluation.evaluation_runs, "rag": paper.paper_runs}

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(__file__).resolve().parent / "configs" / "default.py"),
    "Experiment config file: configs/paper_<task>.py, or the default job's for its workdir.")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Where eval/ goes (a finished default run "
                               "for configs/default.py).")
_RETRIEVAL_ONLY = flags.DEFINE_bool("retrieval_only", False, "Only the question encoder and the "
                                    "index: recall@k and precision@k (config.eval.recall_ks).")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "On an anticipated error (a missing file, a "
                                "bad setting), show its traceback instead of one 'error:' line.")
_DOCS = flags.DEFINE_string("docs", "", "The paper's Figure 3: evaluate at each of these numbers "
                            "of docs, e.g. 5,10,20,30,40,50 (table and PNG plot).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a flag")
  configure_host_allocator()  # Before jax starts its CPU client.
  quiet_console()
  config = _CONFIG.value
  kind = config.get("trainer")
  if kind not in RUNS or "eval" not in config:
    raise app.UsageError(f"{flags.FLAGS['config'].config_filename}: not an evaluation config "
                         f"(config.trainer {kind!r}, expected one of {sorted(RUNS)}, and an "
                         "`eval` group); use configs/paper_<task>.py or configs/default.py")

  def run() -> None:
    docs = runner.ints(_DOCS.value, "--docs")
    runner.check_modes(_RETRIEVAL_ONLY.value, docs)
    runner.evaluate(RUNS[kind](config, _WORKDIR.value), _WORKDIR.value,
                    retrieval_only=_RETRIEVAL_ONLY.value, docs=docs)

  if code := one_line_errors(run, _TRACEBACK.value):
    sys.exit(code)


if __name__ == "__main__":
  app.run(main)
