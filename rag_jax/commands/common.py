"""What every command shares: absl flag parsing into a command's own FlagValues, and the
question loop of the question-asking commands (search, answer).

Each command keeps its flags in its own `flags.FlagValues` (not absl's global FLAGS), so the
commands can be imported together (tests, notebooks) without their flag names colliding, and
`main(argv)` can be called as a function with a list of arguments.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from absl import flags


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
