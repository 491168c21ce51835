"""The shared training loop's NaN stop: it never makes the device wait for the host between
steps, and still logs and saves nothing non-finite."""

import math

import flax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rag_jax.training import loop


@flax.struct.dataclass
class _State:
  step: jnp.ndarray
  params: dict


class _Scalar:
  """A device scalar stand-in that logs when the host reads it (what a sync would be)."""

  def __init__(self, value: float, step: int, events: list[str]):
    self.value, self.step, self.events = value, step, events

  def __float__(self) -> float:
    self.events.append(f"read {self.step}")
    return self.value

  def __add__(self, other):
    return float(self.value) + float(other)

  __radd__ = __add__


def _config(steps: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(num_train_steps=steps, batch_size=1, log_every=4,
                                        eval_every=4, checkpoint_every=4, keep_checkpoints=3))


def _step_fn(events: list[str], nan_at: int | None = None):
  def step_fn(state, step):
    done = step + 1
    events.append(f"dispatch {done}")
    loss = math.nan if done == nan_at else 1.0
    params = {"w": state.params["w"] + (math.nan if done == nan_at else 1.0)}
    return (_State(jnp.asarray(done), params),
            {"loss_sum": _Scalar(loss, done, events), "grad_norm": _Scalar(1.0, done, []),
             "examples": 1.0})
  return step_fn


def _start() -> _State:
  return _State(jnp.asarray(0), {"w": jnp.zeros(())})


def test_a_steps_nan_check_waits_until_the_next_step_is_dispatched(tmp_path):
  # Old loop: "dispatch 1, read 1, dispatch 2, read 2, ...": the host waited for every step
  # before dispatching the next, so the accelerator idled while the host dispatched.
  events: list[str] = []
  loop.train_loop(_config(8), tmp_path, _start(), _step_fn(events), summarize=dict,
                  desc="test")
  checks = [e for e in events if e.startswith(("dispatch", "read 1", "read 2", "read 5"))]
  assert checks[:4] == ["dispatch 1", "dispatch 2", "read 1", "dispatch 3"]
  at = checks.index("dispatch 5")
  assert checks[at:at + 3] == ["dispatch 5", "dispatch 6", "read 5"]
  # Every step is checked exactly once, in order.
  reads = [int(e.split()[1]) for e in events if e.startswith("read")]
  assert reads == list(range(1, 9))


@pytest.mark.parametrize("nan_at", [3, 4])
def test_a_nan_step_is_never_logged_or_saved(tmp_path, nan_at):
  # Step 3: found once step 4 is dispatched, before step 4's record or checkpoint. Step 4 (a
  # log and checkpoint step): found before its record and checkpoint. Either way no record or
  # checkpoint holds it, and the error names the step.
  events: list[str] = []
  with pytest.raises(loop.NonFiniteLossError, match=rf"step {nan_at}: non-finite loss"):
    loop.train_loop(_config(8), tmp_path, _start(), _step_fn(events, nan_at), summarize=dict,
                    desc="test")
  assert not (tmp_path / "metrics.jsonl").exists() or not (
      tmp_path / "metrics.jsonl").read_text().strip()
  manager = ocp.CheckpointManager((tmp_path / "checkpoints").absolute())
  assert manager.latest_step() is None
  del manager


def test_the_last_step_is_checked_before_the_run_ends(tmp_path):
  events: list[str] = []
  with pytest.raises(loop.NonFiniteLossError, match=r"step 6: non-finite loss.*step 4"):
    loop.train_loop(_config(6), tmp_path, _start(), _step_fn(events, 6), summarize=dict,
                    desc="test")
  manager = ocp.CheckpointManager((tmp_path / "checkpoints").absolute())
  assert manager.latest_step() == 4
  restored = manager.restore(4)
  assert np.isfinite(np.asarray(restored["params"]["w"]))
