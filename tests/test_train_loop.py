"""The shared training loop's NaN stop: it never makes the device wait for the host between
steps, and still logs and saves nothing non-finite."""

import errno
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import flax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from rag_jax.training import loop

ROOT = Path(__file__).resolve().parents[1]

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


def _deterministic_step(state, step):
  """One step whose metrics are a fixed function of the step (as a real step's are of its
  batch): loss 1/(step + 1), a growing parameter."""
  done = step + 1
  return (_State(jnp.asarray(done), {"w": state.params["w"] + done}),
          {"loss_sum": jnp.float32(1.0 / done), "grad_norm": jnp.float32(1.0),
           "examples": jnp.float32(1.0)})


def _records(workdir) -> list[dict]:
  speed = ("steps_per_s", "examples_per_s", "elapsed_s")  # Wall-clock figures of each (re)start.
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(line).items() if k not in speed} for line in lines]


@pytest.mark.parametrize("log_every,stop_after,torn", [(5, 15, False), (3, 7, True)])
def test_a_resumed_runs_metrics_equal_an_uninterrupted_runs(tmp_path, log_every, stop_after,
                                                              torn):
  # Stopped after a record (step 15; step 6) but before the next checkpoint (steps 10, 20 /
  # 4, 8), as a kill there would; the old loop kept the records past the restored checkpoint
  # and wrote them again on resume: steps 5, 10, 15, 15, 20 (and 3, 6, 6, 9, 12 with the
  # first record after the resume summing 2 steps, not 3). With log_every 3 the checkpoint
  # falls inside a record's window: the resumed record sums the same three steps. `torn`: the
  # kill also cut the file in the middle of a line.
  config = _config(20 if log_every == 5 else 12)
  config.log_every = config.eval_every = log_every
  config.checkpoint_every = 10 if log_every == 5 else 4
  evaluate = lambda params: {"w": float(params["w"])}  # noqa: E731
  full, killed = tmp_path / "full", tmp_path / "killed"
  loop.train_loop(config, full, _start(), _deterministic_step, summarize=dict, evaluate=evaluate,
                  desc="test")
  _, finished = loop.train_loop(config, killed, _start(), _deterministic_step, summarize=dict,
                                evaluate=evaluate, desc="test", stop_after=stop_after)
  assert not finished
  if torn:
    with (killed / "metrics.jsonl").open("a") as f:
      f.write('{"step": 99, "loss_s')  # A record cut by the kill.
  loop.train_loop(config, killed, _start(), _deterministic_step, summarize=dict,
                  evaluate=evaluate, desc="test")
  expected = [{"step": s, "loss_sum": pytest.approx(sum(1.0 / d for d in range(s - log_every + 1,
                                                                                  s + 1)),
                                                   rel=1e-6),
               "examples": float(log_every), "eval_w": float(sum(range(s + 1)))}
              for s in range(log_every, config.num_train_steps + 1, log_every)]
  assert _records(full) == expected  # the brute-force reference: sums of 1/step per window
  assert _records(killed) == _records(full)  # bit for bit, step by step


_FILE_TOO_LARGE = """
import resource, signal, sys
from pathlib import Path
import jax, ml_collections
from rag_jax.training import loop
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
config = ml_collections.ConfigDict(
    {"keep_checkpoints": 3, "checkpoint_every": 1, "num_train_steps": 2})
manager = loop.checkpoint_manager(Path(sys.argv[1]), config)
state = {"w": jax.random.normal(jax.random.key(0), (64, 1024))}  # random: does not compress
loop.save_checkpoint(manager, 1, state, config)
manager.wait_until_finished()
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
  with loop.checkpoint_os_errors(manager):
    loop.save_checkpoint(manager, 2, state, config)
    manager.wait_until_finished()
except OSError as e:
  print(f"OSError {e.errno} {e.filename} {manager.latest_step()}")
"""


def test_an_os_error_while_orbax_writes_is_an_oserror_naming_the_directory(tmp_path):
  """orbax reports a failed write (here a real EFBIG from RLIMIT_FSIZE, as a full disk gives
  ENOSPC) as a ValueError holding the code; the loop raises it as that OSError, naming the
  checkpoint directory, so the entry points print one line. The complete checkpoint stays."""
  result = subprocess.run([sys.executable, "-c", _FILE_TOO_LARGE, str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
  assert result.stdout.splitlines()[-1:] == [
      f"OSError {errno.EFBIG} {tmp_path / 'checkpoints'} 1"], result.stderr[-2000:]
