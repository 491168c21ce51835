"""What the question-asking commands (retrieval.search, answer) share."""

from __future__ import annotations

from collections.abc import Callable
from typing import TextIO


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
