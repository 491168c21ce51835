"""What every training loop shares: the workdir guard, the loop itself (`train_loop`: resume,
NaN stop, metrics, evaluation, checkpoints), the metrics file and orbax checkpoints."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from tqdm import tqdm

from rag_jax.distributed import is_primary, on_primary, process_index
from rag_jax.utils.atomic import atomic_file
from rag_jax.utils.errors import UserError
from rag_jax.utils.faults import kill_point
from rag_jax.utils.lock import workdir_lock
from rag_jax.utils.logs import workdir_logging


class WorkdirConfigError(UserError, ValueError):
  """The workdir holds a run of another config; the message names each differing field."""


def config_leaves(tree: Any, prefix: str = "config") -> dict[str, Any]:
  """{dotted path: value} of every leaf of a JSON tree (a dict is a group, anything else a leaf)."""
  if isinstance(tree, dict) and tree:
    out: dict[str, Any] = {}
    for key, value in tree.items():
      out.update(config_leaves(value, f"{prefix}.{key}"))
    return out
  return {prefix: tree}


# Config fields that only evaluation reads, per config.trainer: a difference in one of them never
# refuses a workdir (the trained models stay valid); the workdir's config.json takes the new
# values and the trainer redoes the evaluation that used the old ones (the `on_evaluation_change`
# of check_workdir). A pattern is a dotted path below the config, `*` standing for one name.
#   world        `eval`: read by the job's evaluation phase (and evaluate.py) only.
#   world_paper  each world's `eval`, `paper` (Figure 2 and 3 settings) and the FEVER-like rows'
#                decoding length: read by the evaluation phases only.
#   rag          `eval` (the paper-row configs' group): read by evaluate.py only.
EVALUATION_ONLY: dict[str, tuple[str, ...]] = {
    "world": ("eval",),
    "world_paper": ("worlds.*.eval", "paper", "fever.max_label_tokens"),
    "rag": ("eval",),
}


def evaluation_only(field: str, trainer: str | None) -> bool:
  """Whether the dotted leaf `config.a.b...` is an evaluation-only field of `trainer`."""
  parts = field.split(".")[1:]  # without the leading "config"
  for pattern in EVALUATION_ONLY.get(trainer or "", ()):
    names = pattern.split(".")
    if len(names) <= len(parts) and all(n in ("*", p) for n, p in zip(names, parts[:len(names)],
                                                                          strict=True)):
      return True
  return False


def config_differences(previous: dict[str, Any], current: dict[str, Any],
                       keep: Callable[[str], bool] = lambda field: True) -> list[str]:
  """`config.a.b: X in the workdir, Y now` for each leaf that differs (missing: <absent>) and
  that `keep` selects."""
  old, new = config_leaves(previous), config_leaves(current)
  absent = "<absent>"
  return [f"{k}: {json.dumps(old.get(k, absent))} in the workdir, {json.dumps(new.get(k, absent))}"
          " now" for k in sorted(set(old) | set(new))
          if old.get(k, absent) != new.get(k, absent) and keep(k)]


@contextlib.contextmanager
def claimed_workdir(config: ml_collections.ConfigDict, workdir: Path, key: str,
                    timeout_s: float, *, log_file: bool = True,
                    on_evaluation_change: Callable[[list[str]], None] | None = None
                    ) -> Iterator[None]:
  """The run's hold on its workdir: process 0 takes the lock (rag_jax.utils.lock), records or
  checks the config (check_workdir) and, with log_file, sends the library's logs to
  workdir/train.log; the other processes wait for it (distributed.on_primary under `key`), and
  a refusal there ends them too. Released on exit."""
  with contextlib.ExitStack() as stack:
    def claim() -> None:  # process 0's
      stack.enter_context(workdir_lock(workdir))
      check_workdir(config, workdir, on_evaluation_change=on_evaluation_change)
      if log_file:
        stack.enter_context(workdir_logging(workdir))
    on_primary(key, claim, timeout_s)
    yield


def check_workdir(config: ml_collections.ConfigDict, workdir: Path,
                  on_evaluation_change: Callable[[list[str]], None] | None = None) -> None:
  """Records the config in workdir/config.json, or refuses a workdir holding another config.

  Call it once the config is validated (rag_jax/training/config_check.py) and the workdir lock is
  held: the config is recorded only by a run that starts with it, so a refused config never
  locks the workdir out of the corrected rerun. The error names every differing leaf field with
  both values. Fields that only evaluation reads (EVALUATION_ONLY, by config.trainer) never
  refuse: where only they differ, `on_evaluation_change(differences)` first discards what the
  evaluation made with the recorded values, then config.json is rewritten with the new ones (in
  this order, so a kill between the two leaves a workdir whose rerun does both again).
  """
  saved = workdir / "config.json"
  current = json.loads(config.to_json_best_effort())
  if saved.exists():
    previous = json.loads(saved.read_text())
    if previous == current:
      return
    trainer = previous.get("trainer") if isinstance(previous, dict) else None
    if trainer != current.get("trainer"):
      trainer = None  # another kind of run altogether: every field counts
    blocking = config_differences(previous, current,
                                  lambda field: not evaluation_only(field, trainer))
    if blocking:
      raise WorkdirConfigError(
          f"{workdir} holds a run with another config ({'; '.join(blocking)}); use a new "
          f"--workdir, rerun with the values of {saved}, or delete {workdir}")
    changed = config_differences(previous, current)
    logging.warning("%s: only fields that evaluation alone reads differ from %s (%s): the "
                    "training is kept and %s takes the new values", workdir, saved.name,
                    "; ".join(changed), saved.name)
    if on_evaluation_change is not None:
      on_evaluation_change(changed)
  with atomic_file(saved, "w") as f:
    f.write(json.dumps(current, indent=2, sort_keys=True) + "\n")


METRICS_FILE = "metrics.jsonl"
WINDOW_FILE = "metrics_window.json"


class MetricsWriter:
  """Appends one JSON object per line to workdir/metrics.jsonl (and logs it to the log file).

  A run resumed from the checkpoint of step `resume_step` continues the file of the run it
  resumes: the records that run wrote after that checkpoint (steps it redoes now), and a last
  line cut by a kill, are dropped first (the file is rewritten atomically), so the resumed run's
  file holds the records an uninterrupted run writes, once each, in step order.
  """

  def __init__(self, workdir: Path, resume_step: int = 0):
    path = workdir / METRICS_FILE
    if path.exists():
      kept = []
      data = path.read_bytes()
      for line in data[:data.rfind(b"\n") + 1].splitlines():  # complete lines only
        try:
          record = json.loads(line)
        except ValueError:
          continue
        if isinstance(record, dict) and record.get("step", 0) <= resume_step:
          kept.append(line + b"\n")
      if b"".join(kept) != data:
        with atomic_file(path, "wb") as f:
          f.write(b"".join(kept))
    self._file = path.open("a")

  def write(self, record: dict[str, Any]) -> None:
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    logging.info("%s", record)

  def close(self) -> None:
    self._file.close()


class WindowLog:
  """workdir/metrics_window.json: the metric sums of the steps since the last record, saved with
  each checkpoint that falls between two records (checkpoint_every not a multiple of
  log_every), so that the first record of a resumed run sums the same steps as an
  uninterrupted run's. {step: {metric: sum}}, the newest `keep` checkpoints' steps."""

  def __init__(self, workdir: Path, keep: int):
    self.path, self.keep = workdir / WINDOW_FILE, keep
    self.saved: dict[str, dict[str, float]] = (json.loads(self.path.read_text())
                                               if self.path.exists() else {})

  def at(self, step: int) -> dict[str, float]:
    """The sums saved with the checkpoint of `step` ({} if none: the record starts there)."""
    return dict(self.saved.get(str(step), {}))

  def save(self, step: int, window: dict[str, Any]) -> None:
    self.saved[str(step)] = {k: float(v) for k, v in window.items()}
    for old in sorted(self.saved, key=int)[:-self.keep - 1]:
      del self.saved[old]
    with atomic_file(self.path, "w") as f:
      json.dump(self.saved, f)


def checkpoint_manager(workdir: Path, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
  """Async, atomic (temp dir + rename), keep-N orbax checkpoints in workdir/checkpoints.

  Replica-parallel saving (orbax's default off GPU) splits every replicated array into one
  slice per device so that several hosts share the writing; on a single host it only adds an
  eager slice per array and device (seconds per save on CPU), so it is on only for multi-host.
  """
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1),
      override=True)
  return ocp.CheckpointManager(
      (workdir / "checkpoints").absolute(),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints,
                                           save_interval_steps=config.checkpoint_every))


# tensorstore's errors (orbax writes through it) carry the OS error as `[os_error_code=28]` or
# `os_error_code='28'` inside a ValueError's message.
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


@contextlib.contextmanager
def checkpoint_os_errors(manager: ocp.CheckpointManager) -> Iterator[None]:
  """An OS error met while orbax writes a checkpoint (a full disk, a read-only or vanished
  directory) is raised as the OSError it is, naming the checkpoint directory, so that the entry
  points print one line (`error: WORKDIR/checkpoints: No space left on device (errno 28)`);
  orbax raises it as a ValueError whose message holds the code. The last complete checkpoint is
  kept either way (orbax writes each step to a temporary directory first)."""
  try:
    yield
  except ValueError as e:
    found = _OS_ERROR_CODE.search(str(e))
    if found is None:
      raise
    code = int(found.group(1))
    raise OSError(code, os.strerror(code), str(manager.directory)) from e


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: Any,
                    config: ml_collections.ConfigDict) -> bool:
  """Saves (async) every config.checkpoint_every steps and at the last step; True if it saved.

  Only those steps reach orbax: its default policy would also save the first step it is
  offered (no checkpoint yet), which costs a blocking device-to-host copy of the whole state for
  a checkpoint nobody needs.
  """
  final = step == config.num_train_steps
  if step % config.checkpoint_every == 0 or final:
    with checkpoint_os_errors(manager):
      manager.save(step, args=ocp.args.StandardSave(state), force=final)
    return True
  return False


def restore_latest(manager: ocp.CheckpointManager, state: Any) -> Any:
  """The latest checkpoint restored into `state`'s structure and shardings, or `state`."""
  latest = manager.latest_step()
  if latest is None:
    return state
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = manager.restore(latest, args=ocp.args.StandardRestore(abstract))
  logging.info("resumed from step %d", latest)
  return restored


class Throughput:
  """Steps/s and examples/s since the loop (re)started, and the seconds since then."""

  def __init__(self, start_step: int, batch_size: int):
    self.start_step, self.batch_size, self.t0 = start_step, batch_size, time.time()

  def __call__(self, step: int) -> dict[str, float]:
    elapsed = max(time.time() - self.t0, 1e-9)
    steps = step - self.start_step
    return {"steps_per_s": steps / elapsed, "examples_per_s": steps * self.batch_size / elapsed,
            "elapsed_s": elapsed}


class NonFiniteLossError(UserError, FloatingPointError):
  """A step produced a NaN/inf loss or gradient; the run stopped before saving that state."""


def check_finite(metrics: dict[str, Any], step: int, manager: ocp.CheckpointManager) -> None:
  """Stops the run at the first non-finite loss or gradient norm, before its state is saved.

  The state after such a step has NaN parameters (or will have, through Adam's moments), so it
  must never reach a checkpoint: the previous checkpoints stay, and the error says which one a
  rerun resumes from. Reads two scalars of `step` (waits for that step to finish).
  """
  loss, norm = float(metrics["loss_sum"]), float(metrics["grad_norm"])
  if math.isfinite(loss) and math.isfinite(norm):
    return
  manager.wait_until_finished()
  last = manager.latest_step()
  kept = (f"the last good checkpoint, step {last}, is kept in {manager.directory}" if last
          is not None else f"no checkpoint had been saved yet in {manager.directory}")
  raise NonFiniteLossError(
      f"step {step}: non-finite loss (loss sum {loss}, gradient norm {norm}); the run stopped "
      f"without saving this state and {kept}. A rerun resumes from there and, being "
      "deterministic, meets the same step: lower the learning rate or check that step's batch.")


StepFn = Callable[[Any, int], tuple[Any, dict[str, Any]]]


def train_loop(config: ml_collections.ConfigDict, workdir: Path, state: Any, step_fn: StepFn, *,
               summarize: Callable[[dict[str, float]], dict[str, float]],
               evaluate: Callable[[Any], dict[str, float]] | None = None,
               desc: str = "train", stop_after: int | None = None,
               postfix: Callable[[dict[str, float]], dict[str, str]] | None = None,
               eval_prefix: str = "eval_") -> tuple[Any, bool]:
  """The loop every trainer runs: resume, step, stop on NaN, log, evaluate, checkpoint.

  Args:
    config: num_train_steps, batch_size, log_every, eval_every, checkpoint_every,
      keep_checkpoints.
    state: the initial TrainState, placed on the devices (its shardings are kept on restore).
    step_fn: (state, step) -> (state, metrics): one optimizer step on the batch of `step` (a
      pure function of the step, so a resumed run sees the same data). metrics are device
      scalars: sums with their denominators, plus "loss_sum" and "grad_norm" for the NaN stop.
    summarize: the window's summed metrics (host floats) -> the record's figures.
    evaluate: params -> held-out figures, every eval_every steps and at the last step.
    stop_after: end after that many total steps, as a kill would (checkpoint saved).
  Returns:
    (state, finished): finished is False when stop_after ended the run early.

  Writes workdir/metrics.jsonl (one record per log_every steps, with steps/s and the elapsed
  seconds since this (re)start) and keep-N orbax checkpoints in workdir/checkpoints. On several
  processes every process runs the loop (the steps, evaluations and orbax saves are collective)
  and process 0 alone writes the metrics files and the progress bar. A resumed
  run's metrics.jsonl equals an uninterrupted run's but for the speed figures: the records
  after the restored checkpoint are dropped before they are written again (MetricsWriter), and
  a record whose window began before that checkpoint sums the same steps (WindowLog).
  """
  manager = checkpoint_manager(workdir, config)
  state = restore_latest(manager, state)
  start = int(state.step)
  primary = is_primary()  # several processes: every one steps, process 0 alone writes files
  writer = MetricsWriter(workdir, start) if primary else None
  windows = WindowLog(workdir, config.keep_checkpoints)
  throughput = Throughput(start, config.batch_size)
  window: dict[str, Any] = windows.at(start) if start % config.log_every else {}
  # The NaN check of a step runs once the next step is dispatched, so the device never waits
  # for the host between steps; where the host waits anyway (a log record, an evaluation, a
  # checkpoint, the end) the step is checked first, so nothing non-finite is logged or saved.
  unchecked: tuple[dict[str, Any], int] | None = None
  try:
    with tqdm(total=config.num_train_steps, initial=start, desc=desc, unit="step",
              dynamic_ncols=True, disable=not primary) as bar:
      for step in range(start, config.num_train_steps):
        state, metrics = step_fn(state, step)
        done = step + 1
        if unchecked is not None:
          check_finite(*unchecked, manager)
        unchecked = (metrics, done)
        # Device scalars, summed without a host sync until the window is logged.
        # (A "*_max" metric is the window's maximum.)
        window = {k: (jnp.maximum(window.get(k, 0.0), v) if k.endswith("_max")
                      else window.get(k, 0.0) + v) for k, v in metrics.items() if k != "grad_norm"}
        bar.update(1)
        last = done == config.num_train_steps or (stop_after is not None and done >= stop_after)
        if (last or done % config.log_every == 0 or done % config.checkpoint_every == 0):
          check_finite(*unchecked, manager)
          unchecked = None
        if done % config.log_every == 0 or done == config.num_train_steps:
          record = {"step": done, **summarize({k: float(v) for k, v in window.items()}),
                    **throughput(done)}
          window = {}
          if evaluate is not None and (done % config.eval_every == 0
                                       or done == config.num_train_steps):
            record.update({f"{eval_prefix}{k}": v for k, v in evaluate(state.params).items()})
          if postfix is not None:
            bar.set_postfix(postfix(record))
          if writer is not None:
            writer.write(record)
        if save_checkpoint(manager, done, state, config) and window and primary:
          windows.save(done, window)  # Steps since the last record: a resume sums them too.
        kill_point(f"train:{done}:{process_index()}")  # tests: process i dies after step done
        if stop_after is not None and done >= stop_after:
          break
  finally:
    with checkpoint_os_errors(manager):
      manager.wait_until_finished()
    manager.close()
    if writer is not None:
      writer.close()
  return state, int(state.step) >= config.num_train_steps
