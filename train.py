"""Trains a model: `python train.py [--config=configs/<experiment>.py] [--workdir=...]`.

With no flags it runs the built-in default job (configs/default.py, the synthetic world) in
./workdir. Runs from any directory: the default config is found beside this file.
"""

from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from rag_jax.experiments import reversal
from rag_jax.experiments.world import job as world_job
from rag_jax.training import rag_trainer

# config.trainer picks the job; each is train_and_evaluate(config, workdir).
TRAINERS = {"world": world_job.train_and_evaluate, "reversal": reversal.train_and_evaluate,
            "rag": rag_trainer.train_and_evaluate}

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(Path(__file__).resolve().parent / "configs" / "default.py"),
    "Experiment config file (a get_config() module).")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Where logs, metrics and checkpoints go.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; every setting is a flag")
  config = _CONFIG.value
  trainer = config.get("trainer")
  if trainer not in TRAINERS:
    raise app.UsageError(f"{flags.FLAGS['config'].config_filename}: config.trainer is "
                         f"{trainer!r}; expected one of {sorted(TRAINERS)}")
  TRAINERS[trainer](config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
