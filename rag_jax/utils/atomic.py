"""Atomic output: a file or directory appears complete under its final name, or not at all.

Everything rag_jax writes that a user would hate to lose (checkpoints, indexes, embedding shards)
goes through these helpers: the content is written under a temporary name in the same parent
directory, then moved into place with `os.replace`/`os.rename`, which are atomic on POSIX file
systems. A crash or an exception in the middle leaves the previous version untouched.

Modes: the temporaries are made with tempfile.mkdtemp / mkstemp, which create them owner-only
(0700 / 0600) whatever the umask, and some writers (safetensors) create their files 0600 too.
Before a result gets its final name, it and everything in it get the modes a plain `mkdir` /
`open(..., "w")` gives under the process's umask (directories 0755, files 0644 under umask 022;
an executable file keeps its execute bits), so an index, a passage store or an exported model is
as readable to the rest of a team as any file the user writes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rag_jax.utils.faults import kill_point


def current_umask() -> int:
  """The process's umask, read without changing it where Linux reports it (/proc/self/status,
  so no other thread ever sees a zero umask); elsewhere set and restored at once."""
  try:
    for line in Path("/proc/self/status").read_text().splitlines():
      if line.startswith("Umask:"):
        return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def file_mode() -> int:
  """The mode `open(path, "w")` gives a new file under the current umask (0o644 under 022)."""
  return 0o666 & ~current_umask()


def _umask_modes(root: Path) -> None:
  """Gives `root` (a directory) and everything under it the umask's modes (module docstring);
  symbolic links, and what they point to, are left alone."""
  umask = current_umask()
  os.chmod(root, 0o777 & ~umask)
  for parent, dirs, files in os.walk(root):
    for name in dirs + files:
      path = os.path.join(parent, name)
      st = os.lstat(path)
      if stat.S_ISDIR(st.st_mode):
        os.chmod(path, 0o777 & ~umask)
      elif stat.S_ISREG(st.st_mode):
        os.chmod(path, (0o777 if st.st_mode & 0o111 else 0o666) & ~umask)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
  """Yields a fresh temporary directory that replaces `path` when the block succeeds.

  Args:
    path: the final directory. Its parent is created if needed.
    overwrite: if False and `path` exists, raises FileExistsError before anything is written.

  On success an existing `path` is first renamed aside, the new directory renamed into place,
  and only then the old one deleted, so at every instant one complete version exists on disk.
  On an exception the temporary directory is removed and `path` is left as it was.
  """
  path = Path(path)
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} already exists; refusing to overwrite it")
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
  try:
    yield tmp
    _umask_modes(tmp)  # mkdtemp's 0700, and files written 0600 (see the module docstring)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  kill_point(f"atomic_directory:{path.name}")
  old = None
  if path.exists():
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
    os.rmdir(old)
    os.rename(path, old)
  os.rename(tmp, path)
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator:
  """Opens a temporary file that replaces `path` (os.replace) when the block succeeds."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
  try:
    with os.fdopen(fd, mode) as f:
      os.fchmod(f.fileno(), file_mode())  # mkstemp's is 0600 (see the module docstring)
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
