"""Where log records go: the workdir's log file gets everything from INFO up, the console only
warnings and errors (progress bars, one line per finished phase and the results are printed by
the jobs themselves).

Libraries' INFO records (orbax's per-save lines, jax's backend probing, absl) and the metric
records therefore reach train.log and never the console. Two known-harmless library warnings are
kept off the console too (they still reach the file): orbax's note that rag_jax registers its own
jax.Array checkpoint handler (rag_jax/training/loop.py does so on purpose). A log file that
cannot be written (a full disk) says so in one warning line and is given up (`LogFile`).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _orbax_info(record: logging.LogRecord) -> bool:
  """Drops orbax's INFO chatter (a CheckpointManager dump per save) from the log file."""
  return record.levelno >= logging.WARNING or "orbax" not in record.pathname


class ConsoleFilter(logging.Filter):
  """Warnings and errors, but not the expected handler-override note of orbax. One instance per
  workdir_logging block, so a nested block's exit leaves the outer block's filter in place."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING and not (
        record.levelno < logging.ERROR and record.pathname.endswith("type_handler_registry.py"))


def quiet_console() -> None:
  """Before any workdir log file exists (config checks, device discovery): no INFO records on
  the console either (jax's backend probing logs "Unable to initialize backend 'tpu'" at INFO).
  Entry points call it first; `--verbosity` given on the command line still wins."""
  if not any(arg.startswith(("--verbosity", "-v=")) for arg in sys.argv[1:]):
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.WARNING))


class LogFile(logging.FileHandler):
  """A log file that, when it cannot be written (a full disk, a read-only mount), says so once
  on stderr, in one line naming the file and the cause, and drops its records from then on.
  (logging's own handler prints a traceback for every record it fails to write; the run's
  outputs report their own write errors.)"""

  failed = False

  def emit(self, record: logging.LogRecord) -> None:
    if not self.failed:
      super().emit(record)

  def handleError(self, record: logging.LogRecord) -> None:
    error = sys.exc_info()[1]
    if not isinstance(error, OSError):
      super().handleError(record)
      return
    if not self.failed:
      self.failed = True
      cause = f"{error.strerror} (errno {error.errno})" if error.strerror else str(error)
      print(f"warning: {self.baseFilename}: {cause}; log records are not written there from "
            "now on", file=sys.stderr, flush=True)


class WorkdirLogFile(LogFile):
  """A workdir's log file (nested jobs each keep theirs, all at INFO)."""


@contextlib.contextmanager
def workdir_logging(workdir: Path, filename: str = "train.log") -> Iterator[Path]:
  """For the duration of the block: every record from INFO up goes to workdir/filename, and the
  handlers already installed (absl's stderr handler, a notebook's) see warnings and errors
  only. Yields the log file's path."""
  path = Path(workdir) / filename
  handler = WorkdirLogFile(path)
  handler.setFormatter(logging.Formatter(FORMAT))
  handler.addFilter(_orbax_info)
  root = logging.getLogger()
  console = [h for h in root.handlers if not isinstance(h, WorkdirLogFile)]
  console_filter = ConsoleFilter()
  for h in console:
    h.addFilter(console_filter)
  level = root.level
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  try:
    yield path
  finally:
    root.removeHandler(handler)
    root.setLevel(level)
    for h in console:
      h.removeFilter(console_filter)
    handler.close()
