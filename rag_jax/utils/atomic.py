"""Atomic output: a file or directory appears complete under its final name, or not at all.

Everything rag_jax writes that a user would hate to lose (checkpoints, indexes, embedding shards)
goes through these helpers: the content is written under a temporary name in the same parent
directory, then moved into place with `os.replace`/`os.rename`, which are atomic on POSIX file
systems. A crash or an exception in the middle leaves the previous version untouched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rag_jax.utils.faults import kill_point


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
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
