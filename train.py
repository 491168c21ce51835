"""Trains a model: `python train.py [--config=configs/<experiment>.py] [--workdir=...]`.

With no flags it runs the built-in default job (configs/default.py, the synthetic world) in
./workdir. Runs from any directory: the default config is found beside this file.

The flags and the config are checked before anything runs: a bad flag or `--config.x` override
exits 2, a bad config field 1 (rag_jax/training/config_check.py), before the workdir is touched.
The workdir is locked for the run (rag_jax/utils/lock.py). An anticipated error (a bad config
field, a locked workdir, a bad data file, a workdir that cannot be written) prints one line
`error: ...` (exit 2 for a usage error, 1 for any other); --traceback shows its traceback. See
rag_jax/commands/common.py and docs/failure_modes.md. The default job and the RAG fine-tuning
trainer (configs/rag_finetune.py) run on several processes too (docs/distributed.md);
processes 1.. log to WORKDIR/.logs/process-<i>.log.
"""

import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import flags

from rag_jax.commands.common import ConfigFile, define_common_flags, run_main, start_processes
from rag_jax.distributed import is_primary
from rag_jax.utils.errors import UsageError, os_errors_under
from rag_jax.utils.host_memory import configure_host_allocator
from rag_jax.utils.logs import quiet_console

FLAGS = flags.FLAGS


def _job(module: str) -> Callable[..., dict | None]:
  """`module`.train_and_evaluate(config, workdir), imported when called: jax and the models take
  seconds to load, and a bad flag is refused before."""
  def train_and_evaluate(config, workdir: str) -> dict | None:
    return importlib.import_module(module).train_and_evaluate(config, workdir)
  return train_and_evaluate


# config.trainer picks the job; each is train_and_evaluate(config, workdir).
TRAINERS = {"world": _job("rag_jax.experiments.world.job"),
            "reversal": _job("rag_jax.experiments.reversal"),
            "rag": _job("rag_jax.training.rag_trainer"),
            "paper_scale": _job("rag_jax.experiments.paper_scale"),
            "world_paper": _job("rag_jax.experiments.world.paper"),
            "world_shift": _job("rag_jax.experiments.world.shift")}

# The trainers that run on several processes (docs/distributed.md); the others refuse them.
MULTI_PROCESS = ("rag", "world")

CONFIG = ConfigFile(Path(__file__).resolve().parent / "configs" / "default.py",
                    "Experiment config file (a get_config() module).")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Where logs, metrics and checkpoints go.")
define_common_flags(FLAGS)
flags.declare_key_flag("config")
flags.declare_key_flag("traceback")


def summary(report: dict, workdir: str) -> str:
  """The finished run in one line: its scalar figures, and where the rest is."""
  figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in report.items() if isinstance(v, int | float | str))
  return f"done: {figures} (report.json, metrics.jsonl and train.log in {workdir})"


def train(positional: list[str]) -> None:
  """The run of the parsed flags."""
  if positional:
    raise UsageError(f"unexpected arguments {positional}; every setting is a flag")
  configure_host_allocator()  # Before jax starts its CPU client.
  config = CONFIG.value
  multi = config.get("trainer") in MULTI_PROCESS  # processes 1.. log to WORKDIR/.logs
  start_processes(FLAGS, "train.py" if multi else f"train.py's {config.get('trainer')} job",
                  Path(_WORKDIR.value) / ".logs" if multi else None)
  from rag_jax.evaluation import paper  # here: it loads jax (seconds), after the flags
  quiet_console()
  paper.validate(config)  # every field, a paper row's `eval` group too, before any phase
  with os_errors_under(_WORKDIR.value):
    report = TRAINERS[config.trainer](config, _WORKDIR.value)
  # The world jobs print their own report; processes 1.. log.
  if report and config.trainer not in ("world", "world_paper", "world_shift") and is_primary():
    print(summary(report, _WORKDIR.value), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
  """Trains with argv's flags (default sys.argv[1:]); returns the exit code."""
  return run_main(FLAGS, "python train.py", __doc__, argv, train, config=CONFIG)


if __name__ == "__main__":
  sys.exit(main())
