"""Trains a model: `python train.py [--config=configs/<experiment>.py] [--workdir=...]`.

With no flags it runs the built-in default job (configs/default.py) in ./workdir.
"""

from absl import app, flags
from ml_collections import config_flags

from rag_jax.training import rag_trainer, seq2seq, world_job

# config.trainer picks the library loop; each is train_and_evaluate(config, workdir).
TRAINERS = {"world": world_job.train_and_evaluate, "seq2seq": seq2seq.train_and_evaluate,
            "rag": rag_trainer.train_and_evaluate}

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py", "Experiment config file (a get_config() module).")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Where logs, metrics and checkpoints go.")


def main(argv):
  del argv
  config = _CONFIG.value
  trainer = config.get("trainer", "seq2seq")
  if trainer not in TRAINERS:
    raise app.UsageError(f"config.trainer {trainer!r}: expected one of {sorted(TRAINERS)}")
  TRAINERS[trainer](config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
