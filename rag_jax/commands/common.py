"""What every command shares: absl flag parsing into a command's own FlagValues, the error
policy, and the question loop of the question-asking commands (search, answer).

Error policy: an anticipated error (rag_jax.utils.errors.UserError: a bad corpus line, an empty
question, an index built with another encoder, ...) prints one line `error: <message>` on
stderr and the command exits 1; --traceback shows its traceback instead. Any other exception is
a bug and keeps its traceback. Warnings of the library (a truncated question) print as
`warning: <message>` lines.

Each command keeps its flags in its own `flags.FlagValues` (not absl's global FLAGS), so the
commands can be imported together (tests, notebooks) without their flag names colliding, and
`main(argv)` can be called as a function with a list of arguments.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TextIO

from absl import flags

from rag_jax.utils.errors import UserError


def int_list(values: list[str], flag: str) -> tuple[int, ...] | None:
  """A list flag's values as ints (None when empty); a non-number is a one-line error."""
  try:
    numbers = tuple(int(v) for v in values)
  except ValueError:
    raise UserError(f"{flag}: expected whole numbers, got {','.join(values)}") from None
  return numbers or None


def define_common_flags(flag_values: flags.FlagValues) -> None:
  """The flags of every command: --traceback."""
  flags.DEFINE_bool("traceback", False, "On an anticipated error, show its traceback (by "
                    "default it prints one 'error: ...' line).", flag_values=flag_values)


@contextlib.contextmanager
def console_warnings() -> Iterator[None]:
  """For the duration of the block, log records from WARNING up print on the current stderr
  as `warning: <message>` (`error: ...` for errors)."""
  handler = logging.StreamHandler(sys.stderr)
  handler.setLevel(logging.WARNING)
  handler.setFormatter(logging.Formatter("%(levelname_lower)s: %(message)s"))
  handler.addFilter(_lower_level)
  root = logging.getLogger()
  root.addHandler(handler)
  try:
    yield
  finally:
    root.removeHandler(handler)


def _lower_level(record: logging.LogRecord) -> bool:
  record.levelname_lower = record.levelname.lower()
  return True


def one_line_errors(body: Callable[[], int | None], show_traceback: bool) -> int:
  """Runs `body`; an anticipated error (UserError) prints one `error: ...` line and gives exit
  code 1 (raised with its traceback when `show_traceback`). Returns body's code (None: 0)."""
  try:
    return body() or 0
  except UserError as e:
    if show_traceback:
      raise
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 1


def run_command(body: Callable[[], int], flag_values: flags.FlagValues) -> int:
  """Runs a command's body under the error policy (module docstring); returns its exit code."""
  with console_warnings():
    return one_line_errors(
        body, flag_values.is_parsed() and flag_values["traceback"].value)


def parse_flags(flag_values: flags.FlagValues, program: str, doc: str,
                argv: Sequence[str] | None) -> list[str]:
  """Parses `argv` (without the program name; default sys.argv[1:]) into `flag_values` and
  returns the positional arguments. --help prints `doc` and the flags and exits 0; a bad flag
  prints one error line and the usage hint and exits 2."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--help" in argv or "-h" in argv or "--helpfull" in argv:
    print(f"{doc.strip()}\n\nflags:\n{flag_values.get_help()}")
    raise SystemExit(0)
  flag_values.unparse_flags()
  try:
    return flag_values([program, *argv])[1:]
  except flags.Error as e:
    print(f"error: {e}\n(see {program} --help)", file=sys.stderr)
    raise SystemExit(2) from None


def ask(questions: list[str], handle: Callable[[list[str]], str], stdin: TextIO,
        stdout: TextIO) -> int:
  """Prints handle(questions) for the questions given on the command line, or else for each
  non-empty line of stdin (with a prompt when stdin is a terminal) until end of input."""
  if questions:
    print(handle(questions), file=stdout, flush=True)
    return 0
  interactive = stdin.isatty()
  while True:
    if interactive:
      print("question> ", end="", file=stdout, flush=True)
    line = stdin.readline()
    if not line:
      return 0
    if line.strip():
      print(handle([line.strip()]), file=stdout, flush=True)
