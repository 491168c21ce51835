"""The phase runner of the world experiments (the default job, the paper in miniature and its
FEVER-like rows).

A job is a list of named phases run in order in one workdir. Each finished phase's result (JSON)
and wall time are recorded in workdir/phases.json, atomically, as the phase ends: a rerun skips
the recorded phases (one console line each) and runs the others, so a job killed in the middle
resumes at the phase it was in (which resumes from its own checkpoints or starts again).

On several processes (rag_jax.distributed) every process runs the same phases in order: a phase
runs on all of them (its work is collective), or on process 0 alone (`Phase.primary`: inside
`distributed.alone()`, the others waiting at most PRIMARY_TIMEOUT_S); either way every process
then holds process 0's result, which process 0 alone records.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rag_jax.distributed import all_gather_text, alone, is_primary, on_primary, process_count
from rag_jax.utils.atomic import atomic_file
from rag_jax.utils.errors import InputError

log = logging.getLogger(__name__)
PRIMARY_TIMEOUT_S = 3600  # several processes: how long the others wait for a phase of process 0


class PhaseLog:
  """workdir/phases.json: {phase: {"seconds": wall time, "result": its summary}} (atomic)."""

  def __init__(self, workdir: Path):
    self.path = workdir / "phases.json"
    self.phases: dict[str, Any] = {}
    if self.path.exists():
      try:
        self.phases = json.loads(self.path.read_text())
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{self.path}: not the JSON this job writes ({e}); it records the "
                         "finished phases: restore it, or delete it to run every phase "
                         "again") from None

  def done(self, name: str) -> bool:
    return name in self.phases

  def result(self, name: str) -> Any:
    return self.phases[name]["result"]

  def finish(self, name: str, seconds: float, result: Any) -> None:
    """Records a finished phase (in phases.json: process 0's; the others keep it in memory)."""
    self.phases[name] = {"seconds": round(seconds, 2), "result": result}
    if is_primary():
      self._save()

  def forget(self, names: Sequence[str]) -> None:
    """Marks the phases `names` as not done (the next run runs them again)."""
    for name in names:
      self.phases.pop(name, None)
    self._save()

  def _save(self) -> None:
    with atomic_file(self.path, "w") as f:
      json.dump(self.phases, f, indent=2)


@dataclasses.dataclass(frozen=True)
class Phase:
  """One named step of a job: run(job) -> its JSON result; summary(result) -> the text after
  the phase's wall time on its console line (none: the wall time alone)."""

  name: str
  run: Callable[[Any], Any]
  summary: Callable[[Any], str] | None = None
  primary: bool = False  # several processes: process 0 runs it alone (module docstring)


def run_phase(job: Any, phase: Phase) -> Any:
  """phase.run(job); on several processes process 0's result on every process (module
  docstring)."""
  if process_count() == 1:
    return phase.run(job)
  made = []
  if phase.primary:
    def alone_run() -> None:
      with alone():
        made.append(phase.run(job))
    on_primary(f"phase/{phase.name}", alone_run, PRIMARY_TIMEOUT_S)
  else:
    made.append(phase.run(job))
  shared = all_gather_text(f"phase/{phase.name}/result",
                           json.dumps(made[0]) if made else "", PRIMARY_TIMEOUT_S)[0]
  return json.loads(shared)


def console(line: str) -> None:
  """One line on the console that does not break a progress bar."""
  tqdm.write(line)


def run_phases(job: Any, phases: Sequence[Phase], phase_log: PhaseLog, label: str = "",
               stop_after: str | None = None) -> bool:
  """Runs the phases of `phases` not yet in `phase_log`, in order, each recorded as it ends.

  Prints one line per phase: `[<label> i/n] name: <seconds> s, <summary>`, or `... done in an
  earlier run (<seconds> s)` for a recorded one. Returns False where it stopped after the phase
  `stop_after` (as a kill would: the next call resumes), True once every phase is recorded.
  """
  prefix = f"{label} " if label else ""
  for i, phase in enumerate(phases, 1):
    tag = f"[{prefix}{i}/{len(phases)}] {phase.name}"
    if phase_log.done(phase.name):
      console(f"{tag}: done in an earlier run ({phase_log.phases[phase.name]['seconds']:.1f} s)")
      continue
    log.info("phase %s ...", phase.name)
    start = time.monotonic()
    result = run_phase(job, phase)
    seconds = time.monotonic() - start
    phase_log.finish(phase.name, seconds, result)
    log.info("phase %s: %.1f s, %s", phase.name, seconds, result)
    console(f"{tag}: {seconds:.1f} s" + (f", {phase.summary(result)}" if phase.summary else ""))
    if phase.name == stop_after:
      return False
  return True
