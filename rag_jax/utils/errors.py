"""The errors a user can meet and fix: each names what is wrong (file and line, config field,
flag, process) and what to do, so the commands print its message as one `error: ...` line.

Every anticipated failure of rag_jax raises a subclass of :class:`UserError` (often also a
subclass of the builtin it refines, e.g. ValueError, so that callers catching the builtin keep
working). The entry points (train.py, evaluate.py, benchmark.py and the rag-* commands, through
rag_jax/commands/common.py) print such an error, or an OSError, as one line `error: ...` and exit
with status 2 for a :class:`UsageError` (how the command was called) and 1 for any other; any
other exception is unexpected and keeps its traceback. See docs/failure_modes.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np


class UserError(Exception):
  """An anticipated failure whose message alone tells the user what to fix."""


class InputError(UserError, ValueError):
  """A setting or an input file that cannot be used as given (named, with what to do)."""


class UsageError(InputError):
  """A bad flag, flag value, config override or argument: the command was called wrongly, and
  nothing was run (the commands exit 2, as for a flag absl refuses)."""


class InputNotFoundError(UserError, FileNotFoundError):
  """A file or directory the user named (or a finished run it needs) that is not there."""


class NonFiniteError(UserError, FloatingPointError):
  """NaN or inf where a finite number is required (retrieval scores, decoding scores)."""


def check_finite(values: np.ndarray, what: str, allow_neg_inf: bool = False) -> None:
  """Raises NonFiniteError naming `what` and the first offending row when `values` holds a NaN
  or an inf (a -inf too, unless `allow_neg_inf`: a beam that never finished scores -inf).

  Args:
    values: [rows, ...] numbers, one row per question (or per returned sequence).
    what: what they are, for the message (e.g. "doc scores of the question encoder").
  """
  values = np.atleast_1d(np.asarray(values, np.float64))
  bad = np.isnan(values) | np.isposinf(values)
  if not allow_neg_inf:
    bad |= np.isneginf(values)
  bad_rows = np.nonzero(bad.reshape(len(values), -1).any(axis=1))[0]
  if not len(bad_rows):
    return
  first = values.reshape(len(values), -1)[bad_rows[0]]
  sample = float(first[~np.isfinite(first)][0])
  raise NonFiniteError(f"{what}: {sample} in {len(bad_rows)} of {len(values)} rows (first: row "
                       f"{int(bad_rows[0])}); the model or its input is broken, refusing to "
                       "return these results")


@contextlib.contextmanager
def os_errors_under(directory: str | os.PathLike) -> Iterator[None]:
  """An OSError raised in the block that names no file gets the note "in a file under
  <directory>" (a write or an fsync that fails on a full disk names none), so that the commands'
  one-line message says where: `error: No space left on device (errno 28); in a file under
  runs/nq`."""
  try:
    yield
  except OSError as e:
    if e.filename is None and not isinstance(e, UserError):
      e.add_note(f"in a file under {directory}")
    raise
