"""Which examples each training step reads: a pure function of (seed, step), so a resumed run
reads exactly what an uninterrupted one would."""

from __future__ import annotations

import numpy as np


def epoch_rows(seed: int, step: int, n_examples: int, batch_size: int) -> np.ndarray:
  """Rows [batch_size] of the global batch for `step`: a fresh permutation of the examples per
  epoch (numpy's generator seeded with (seed, epoch)), the remainder of each epoch dropped."""
  per_epoch = n_examples // batch_size
  if per_epoch == 0:
    raise ValueError(f"{n_examples} training examples < batch_size {batch_size}")
  epoch, offset = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(n_examples)
  return order[offset * batch_size:(offset + 1) * batch_size]
