"""Trains a model: `python train.py [--config=configs/<experiment>.py] [--workdir=...]`.

With no flags it runs the built-in default job (configs/default.py, the synthetic world) in
./workdir. Runs from any directory: the default config is found beside this file.

The config is validated before the workdir is touched (rag_jax/training/config_check.py), the
workdir is locked for the run (rag_jax/utils/lock.py), and an anticipated error (a bad config
field, a locked workdir, a bad data file) prints one line `error: ...` and exits 1; --traceback
shows its traceback. See docs/failure_modes.md.
"""

import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from rag_jax.commands.common import one_line_errors
from rag_jax.experiments import paper_scale, reversal
from rag_jax.experiments.world import job as world_job
from rag_jax.experiments.world import paper
from rag_jax.training import config_check, rag_trainer
from rag_jax.utils.host_memory import configure_host_allocator
from rag_jax.utils.logs import quiet_console

# config.trainer picks the job; each is train_and_evaluate(config, workdir).
TRAINERS = {"world": world_job.train_and_evaluate, "reversal": reversal.train_and_evaluate,
            "rag": rag_trainer.train_and_evaluate,
            "paper_scale": paper_scale.train_and_evaluate, "world_paper": paper.train_and_evaluate}

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(__file__).resolve().parent / "configs" / "default.py"),
    "Experiment config file (a get_config() module).")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Where logs, metrics and checkpoints go.")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "On an anticipated error, show its traceback "
                               "(by default it prints one 'error: ...' line).")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, except that an override of a field the config does not have
  (`--config.x=1`, which ml_collections reports as a chained AttributeError) prints one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error:
    raise  # app.run prints these in one line already
  except (AttributeError, KeyError) as e:
    if "--traceback" in argv:
      raise
    name = str(e).strip("\"'")
    overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    culprit = next((o for o in overrides if name in o[len("--config."):].split(".")), None)
    print(f"error: {culprit or '--config.' + name}: the config has no field {name!r} (see the "
          "config file for its fields)", file=sys.stderr)
    sys.exit(2)


def summary(report: dict, workdir: str) -> str:
  """The finished run in one line: its scalar figures, and where the rest is."""
  figures = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in report.items() if isinstance(v, int | float | str))
  return f"done: {figures} (report.json, metrics.jsonl and train.log in {workdir})"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a flag")
  configure_host_allocator()  # Before jax starts its CPU client.
  quiet_console()
  config = _CONFIG.value

  def run() -> None:
    config_check.validate(config)
    report = TRAINERS[config.trainer](config, _WORKDIR.value)
    if report and config.trainer not in ("world", "world_paper"):  # Print their own.
      print(summary(report, _WORKDIR.value), flush=True)

  if code := one_line_errors(run, _TRACEBACK.value):
    sys.exit(code)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
