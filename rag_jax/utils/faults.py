"""Fault injection for the crash tests: named points where a process can be made to die.

`kill_point(name)` does nothing unless the environment variable RAG_JAX_KILL_AT equals `name`;
then it kills the process with SIGKILL on the spot (no cleanup, no finally blocks), as a power
cut or the OOM killer would. The tests (tests/test_build_index_faults.py) run a command once per
point and check that a rerun finishes what the killed run started and that no partial output is
ever visible under a final name. Production runs never set the variable.
"""

from __future__ import annotations

import os
import signal

KILL_ENV = "RAG_JAX_KILL_AT"


def kill_point(name: str) -> None:
  """SIGKILLs this process if RAG_JAX_KILL_AT names this point (see the module docstring)."""
  if os.environ.get(KILL_ENV) == name:
    os.kill(os.getpid(), signal.SIGKILL)
