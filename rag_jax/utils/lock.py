"""One run per workdir, one build per index directory: a lock file holding the owner's pid, host
and start time.

    with workdir_lock(workdir):      # raises WorkdirLocked if a live process holds it
      ...train...
    with output_lock(out):           # build_index: OUT's sibling .OUT.lock
      ...build...

Two trainings in one workdir would resume from, and overwrite, each other's checkpoints; two
builds into one output directory would write over each other's shards. The lock of a workdir is
the file workdir/run.lock; the lock of a build's output OUT is the file .OUT.lock beside it (OUT
itself appears only once the build is complete: rag_jax/retrieval/pipeline.py). Either is
created with O_CREAT | O_EXCL (atomic: of two processes racing, exactly one creates it) and
removed when the block exits, however it exits. A lock whose owner is gone (killed with SIGKILL,
the machine rebooted) is stale: on the same host, a pid that no longer runs, or runs another
program started later (pid reuse, detected from the process start time in /proc), is taken over
with a warning that names it. A lock written on another host is never taken over (its pid
cannot be checked from here): the error says which host holds it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from rag_jax.utils.errors import UserError

LOCK_NAME = "run.lock"
log = logging.getLogger(__name__)


class WorkdirLocked(UserError, RuntimeError):
  """Another live process holds the lock (of a workdir, or of a build's output directory); the
  message names its pid and host."""


def process_start(pid: int) -> str | None:
  """The start time of process `pid` in clock ticks since boot (/proc/PID/stat, field 22),
  or None where /proc is unavailable or the process does not exist."""
  try:
    stat = Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name; 22nd overall


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # exists, owned by another user
    return True
  return True


def _describe(owner: dict) -> str:
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
  return f"pid {owner.get('pid')} on host {owner.get('host')} (started {started})"


def stale_reason(owner: dict) -> str | None:
  """Why the lock of `owner` (the lock file's content) is stale, or None if it may be live."""
  if owner.get("host") != socket.gethostname():
    return None
  pid = owner.get("pid")
  if not isinstance(pid, int) or not _alive(pid):
    return "that process is no longer running"
  recorded, now = owner.get("proc_start"), process_start(pid)
  if recorded is not None and now is not None and recorded != now:
    return "that pid now belongs to another process"
  return None


def _create(path: Path) -> None:
  owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
           "proc_start": process_start(os.getpid())}
  fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  with os.fdopen(fd, "w") as f:
    f.write(json.dumps(owner) + "\n")
    f.flush()
    os.fsync(f.fileno())


def _read(path: Path) -> dict:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise
  except (OSError, ValueError):
    return {}  # torn or foreign content: a writer died between create and write


@contextlib.contextmanager
def file_lock(path: Path, in_use: Callable[[str], str]) -> Iterator[Path]:
  """Holds the lock file `path` for the duration of the block (its directory is created if
  needed).

  Raises WorkdirLocked with the message in_use(holder) (holder: "pid P on host H (started T)")
  when a live process (or one on another host) holds it; takes over a stale lock with a warning
  naming its dead owner. Yields the lock file's path.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  for _ in range(3):
    try:
      _create(path)
      break
    except FileExistsError:
      pass
    try:
      owner = _read(path)
    except FileNotFoundError:
      continue  # released meanwhile: try again
    reason = stale_reason(owner) if owner else "it holds no owner (torn write)"
    if reason is None:
      raise WorkdirLocked(in_use(_describe(owner)))
    log.warning("%s: taking over the stale lock of %s; %s", path, _describe(owner), reason)
    with contextlib.suppress(FileNotFoundError):
      path.unlink()
  else:
    raise WorkdirLocked(f"{path}: could not take the lock (other processes keep taking it)")
  try:
    yield path
  finally:
    with contextlib.suppress(FileNotFoundError, ValueError, OSError):
      if _read(path).get("pid") == os.getpid():
        path.unlink()


def workdir_lock(workdir: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
  """Holds workdir/run.lock for the duration of the block (the workdir is created if needed);
  see file_lock."""
  path = Path(workdir) / LOCK_NAME
  return file_lock(path, lambda holder: (
      f"{path.parent} is in use by {holder}: a second run there would resume from the "
      "checkpoints it is writing. Wait for it to finish, stop it, or use another --workdir (if "
      f"that process is gone, delete {path})"))


def output_lock_path(out: str | os.PathLike) -> Path:
  """The lock file of a build into `out`: .OUT.lock beside it."""
  out = Path(out)
  return out.parent / f".{out.name}.lock"


def output_lock(out: str | os.PathLike) -> contextlib.AbstractContextManager[Path]:
  """Holds the lock of a build into the directory `out` (rag_jax.commands.build_index) for the
  duration of the block; see file_lock."""
  path = output_lock_path(out)
  return file_lock(path, lambda holder: (
      f"{out} is being built by {holder}: a second build there would write over the files it "
      "is writing. Wait for it to finish, stop it, or use another --out (if that process is "
      f"gone, delete {path})"))
