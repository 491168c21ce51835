"""Trains a model: `python train.py [--config=configs/<experiment>.py] [--workdir=...]`.

With no flags it runs the built-in default job (configs/default.py) in ./workdir.
"""

from absl import app, flags
from ml_collections import config_flags

from rag_jax.training import seq2seq

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/default.py", "Experiment config file (a get_config() module).")
_WORKDIR = flags.DEFINE_string("workdir", "workdir", "Where logs, metrics and checkpoints go.")


def main(argv):
  del argv
  seq2seq.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
