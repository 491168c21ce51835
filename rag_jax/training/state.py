"""The train state shared by every trainer."""

from __future__ import annotations

import flax.struct
import jax
from flax.training import train_state


class TrainState(train_state.TrainState):
  """step, params, opt_state (and the static apply_fn, tx), plus the base dropout key.

  The key is stored as raw uint32 key data so orbax checkpoints it like any array; steps derive
  their keys with fold_in(wrap_key_data(dropout_key), step), so a resumed run draws exactly the
  randomness of an uninterrupted one.
  """

  dropout_key: jax.Array = flax.struct.field(default=None)
