"""Starting rag_jax as one of several processes: JAX's multi-controller runtime, nothing else.

Every entry point calls :func:`initialize` before it touches a device. It calls
``jax.distributed.initialize`` when this process is one of several, and does nothing on one:

- given settings: ``--coordinator_address``, ``--num_processes`` and ``--process_id`` (flags of
  every command), else the environment variables ``RAG_JAX_COORDINATOR_ADDRESS``,
  ``RAG_JAX_NUM_PROCESSES`` and ``RAG_JAX_PROCESS_ID`` (what ``rag_jax.commands.launch`` sets);
- a cluster jax detects itself: a SLURM step of several tasks, an Open MPI job of several ranks,
  a multi-host TPU slice that names its workers (``TPU_WORKER_HOSTNAMES`` /
  ``MEGASCALE_COORDINATOR_ADDRESS``); ``--distributed=yes`` asks jax to detect one anyway (a TPU
  VM slice whose workers only its metadata server knows), ``--distributed=no`` never starts.

Bad settings are one-line errors (:class:`DistributedError`): a process id outside
[0, num_processes), a count without a coordinator address. A process other than 0 first opens a
TCP connection to the coordinator and names it when that fails within ``timeout_s``; after that,
jax bounds every wait (``initialization_timeout``, and a process that stops sending heartbeats
is declared dead after ``heartbeat_timeout_seconds``, which aborts the others).

Once started, only process 0 writes shared files and the console (:func:`is_primary`); the
others' stdout and stderr go to ``<log_dir>/process-<i>.log``. :func:`all_gather_text`,
:func:`primary_value` and :func:`barrier` use the coordination service's key-value store
(bounded waits, no device collective), so host-side agreement checks need no compiled program.

jax is imported inside the functions that use it: the scripts import this module with their flags
and load jax (seconds) only once the flags are parsed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from rag_jax.utils.errors import UserError

T = TypeVar("T")
ENV_COORDINATOR = "RAG_JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "RAG_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "RAG_JAX_PROCESS_ID"
ENV_LOG_DIR = "RAG_JAX_LOG_DIR"  # where processes other than 0 log (overrides the command's)
DEFAULT_TIMEOUT_S = 300  # jax's own default for every process to join


class DistributedError(UserError, RuntimeError):
  """Bad multi-process settings, or a peer that could not be reached or agreed with."""


@dataclass(frozen=True)
class Settings:
  """How this process joins the job. coordinator_address/num_processes/process_id None: jax
  detects them (SLURM, Open MPI, TPU); timeout_s bounds the wait for every process to join."""

  coordinator_address: str | None
  num_processes: int | None
  process_id: int | None
  timeout_s: int = DEFAULT_TIMEOUT_S


def _int_setting(value, name: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise DistributedError(f"{name}={value!r}: expected a whole number") from None


def _cluster_processes(environ) -> int:
  """Processes of a job a cluster manager started (jax reads the same variables), else 1."""
  if all(k in environ for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
                                "SLURM_PROCID", "SLURM_LOCALID")):
    return _int_setting(environ["SLURM_NTASKS"], "SLURM_NTASKS") or 1
  if "OMPI_COMM_WORLD_SIZE" in environ:
    return _int_setting(environ["OMPI_COMM_WORLD_SIZE"], "OMPI_COMM_WORLD_SIZE") or 1
  hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
  if hosts.count(",") or environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return max(hosts.count(",") + 1, 2)
  return 1


def settings(coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None, distributed: str = "auto",
             timeout_s: int = DEFAULT_TIMEOUT_S, environ=None) -> Settings | None:
  """The settings this process starts with, or None for one process.

  Arguments win over the RAG_JAX_* environment variables; with neither, a cluster is detected
  (module docstring). `distributed`: auto, yes (always start; jax detects what is not given) or
  no (never). Raises DistributedError for inconsistent settings.
  """
  environ = os.environ if environ is None else environ
  if distributed not in ("auto", "yes", "no"):
    raise DistributedError(f"--distributed={distributed}: expected auto, yes or no")
  if distributed == "no":
    return None
  address = coordinator_address or environ.get(ENV_COORDINATOR) or None
  count = num_processes if num_processes is not None else _int_setting(
      environ.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
  index = process_id if process_id is not None else _int_setting(
      environ.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
  if timeout_s <= 0:
    raise DistributedError(f"--distributed_timeout={timeout_s}: expected a positive number of "
                           "seconds")
  if count is None and address is None and index is None:
    if distributed == "yes" or _cluster_processes(environ) > 1:
      return Settings(None, None, None, timeout_s)  # jax detects the cluster
    return None
  if count is not None and count < 1:
    raise DistributedError(f"--num_processes={count}: expected at least 1")
  if count == 1 and distributed != "yes":
    return None
  if count is None or index is None:
    missing = "--num_processes" if count is None else "--process_id"
    raise DistributedError(f"{missing} is missing: a process of a multi-process job needs "
                           "--coordinator_address, --num_processes and --process_id (or "
                           f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
  if not 0 <= index < count:
    raise DistributedError(f"--process_id={index} with --num_processes={count}: a process id "
                           f"lies in [0, {count})")
  if address is None:
    raise DistributedError(f"process {index} of {count}: no coordinator address; give "
                           f"--coordinator_address=HOST:PORT (process 0's host) or "
                           f"{ENV_COORDINATOR}")
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise DistributedError(f"--coordinator_address={address}: expected HOST:PORT")
  return Settings(address, count, index, timeout_s)


def wait_for_coordinator(address: str, timeout_s: float, what: str) -> None:
  """Retries a TCP connection to HOST:PORT until it opens; DistributedError after timeout_s.
  (jax's own client aborts the process, with a stack dump, when the coordinator never answers.)"""
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise DistributedError(f"{what} could not reach the coordinator {address} within "
                               f"{timeout_s:g} s ({e.strerror or e}); is process 0 running, and "
                               "is that address reachable from this host?") from None
      time.sleep(0.5)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, distributed: str = "auto",
               timeout_s: int = DEFAULT_TIMEOUT_S, log_dir: str | os.PathLike | None = None,
               environ=None) -> int:
  """Joins the multi-process job this process belongs to (module docstring); returns the
  number of processes (1: nothing was started). Called twice, the second call does nothing.

  log_dir: where a process other than 0 sends its stdout and stderr (``process-<i>.log``;
  RAG_JAX_LOG_DIR wins); None leaves them.
  """
  import jax  # here: seconds to load, after the flags (module docstring)

  if jax.distributed.is_initialized():
    return jax.process_count()
  environ = os.environ if environ is None else environ
  found = settings(coordinator_address, num_processes, process_id, distributed, timeout_s,
                   environ)
  if found is None:
    return 1
  if found.process_id not in (None, 0):
    wait_for_coordinator(found.coordinator_address, found.timeout_s,
                         f"process {found.process_id} of {found.num_processes}")
  jax.distributed.initialize(found.coordinator_address, found.num_processes, found.process_id,
                             initialization_timeout=found.timeout_s)
  log_dir = environ.get(ENV_LOG_DIR) or log_dir
  if not is_primary() and log_dir is not None:
    redirect_output(Path(log_dir) / f"process-{jax.process_index()}.log")
  return jax.process_count()


def redirect_output(path: Path) -> None:
  """Sends this process's stdout and stderr (Python's and the C++ runtime's) to `path`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  sys.stdout.flush()
  sys.stderr.flush()
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  os.dup2(fd, 1)
  os.dup2(fd, 2)
  os.close(fd)


_alone = False  # inside `alone()`: this process works by itself


def process_index() -> int:
  """This process's index among those working together (0 inside `alone()`)."""
  import jax  # here: seconds to load, after the flags (module docstring)

  return 0 if _alone else jax.process_index()


def process_count() -> int:
  """How many processes work together: jax.process_count(), or 1 inside `alone()`."""
  import jax  # here: seconds to load, after the flags (module docstring)

  return 1 if _alone else jax.process_count()


@contextlib.contextmanager
def alone() -> Iterator[None]:
  """For a block that process 0 runs by itself after the others are done (build_index's index
  stage after a multi-process encoding): rag_jax's exchanges and barriers, and the stages that
  split work by process, act as on one process instead of waiting for peers."""
  global _alone
  previous, _alone = _alone, True
  try:
    yield
  finally:
    _alone = previous


def is_primary() -> bool:
  """Whether this process writes shared files and the console (process 0, or the only one)."""
  return process_index() == 0


def describe() -> str:
  """'process I of N' (for messages)."""
  return f"process {process_index()} of {process_count()}"


def _client():
  """The coordination service's client (jax's internal handle, which orbax uses too)."""
  from jax._src import distributed as jax_distributed  # here: after the flags (module docstring)

  client = jax_distributed.global_state.client
  if client is None:
    raise DistributedError("jax.distributed is not initialized (several processes, no client)")
  return client


# Calls so far per exchange or barrier name: each call gets its own keys (the key-value store
# refuses a key set twice), and every process makes the same calls in the same order.
_calls: dict[str, int] = {}


def _key(name: str) -> str:
  _calls[name] = _calls.get(name, 0) + 1
  return f"rag_jax/{name}/{_calls[name]}"


def all_gather_text(name: str, value: str, timeout_s: float) -> list[str]:
  """Every process's `value` for the exchange `name`, in process order (one process: [value]).
  Every process makes the same calls in the same order (a name may recur); waits at most
  timeout_s per peer."""
  if process_count() == 1:
    return [value]
  client, key = _client(), _key(name)
  client.key_value_set(f"{key}/{process_index()}", value)
  return [client.blocking_key_value_get(f"{key}/{p}", int(timeout_s * 1000))
          for p in range(process_count())]


WAIT_SLICE_S = 10  # primary_value without a timeout waits in slices of this many seconds


def primary_value(name: str, value: str, timeout_s: float | None) -> str:
  """Process 0's `value` on every process (the others' `value` is ignored; one process: its
  own). Every process makes the same calls in the same order. timeout_s None: the others wait as
  long as process 0 takes (a person typing its input); a dead process 0 still ends the wait,
  once jax's heartbeat timeout declares it dead."""
  if process_count() == 1:
    return value
  client, key = _client(), _key(name)
  if is_primary():
    client.key_value_set(f"{key}/0", value)
    return value
  while True:
    wait_s = WAIT_SLICE_S if timeout_s is None else timeout_s
    try:
      return client.blocking_key_value_get(f"{key}/0", int(wait_s * 1000))
    except Exception as e:  # jaxlib's XlaRuntimeError; DEADLINE_EXCEEDED: keep waiting
      if timeout_s is not None or "DEADLINE_EXCEEDED" not in str(e):
        raise


def barrier(name: str, timeout_s: float) -> None:
  """Waits until every process reaches barrier `name` (at most timeout_s; a dead peer fails it
  once jax's heartbeat timeout declares it dead). Nothing on one process."""
  if process_count() > 1:
    _client().wait_at_barrier(_key(name), int(timeout_s * 1000))


def on_primary(name: str, action: Callable[[], object], timeout_s: float) -> None:
  """Runs `action` on process 0 only, then on every process raises what it raised: process 0
  its own error (any Exception), the others a DistributedError quoting it, so that no process
  waits for, or goes on after, a step that failed on process 0."""
  error = None
  if is_primary():
    try:
      action()
    except Exception as e:
      if process_count() == 1:
        raise
      error = e
  first = all_gather_text(name, "" if error is None else str(error) or type(error).__name__,
                          timeout_s)[0]
  if error is not None:
    raise error
  if first:
    raise DistributedError(f"process 0 failed, so {describe()} stops: {first}")


def primary_first(name: str, make: Callable[[], T], timeout_s: float) -> T:
  """make() on every process, process 0's call first and the others' after it returned (a cache
  that process 0 builds and the others then read); an error on process 0 is raised on every
  process (`on_primary`)."""
  made = []
  on_primary(name, lambda: made.append(make()), timeout_s)
  return made[0] if made else make()


def check_same(name: str, facts: dict[str, str], timeout_s: float, what: str) -> None:
  """Refuses (DistributedError on every process) when any process's `facts` differ from process
  0's, naming the field, the process and both values; `what` says what must agree. Nothing on
  one process."""
  gathered = [json.loads(t) for t in all_gather_text(name, json.dumps(facts), timeout_s)]
  for p, theirs in enumerate(gathered[1:], start=1):
    for key, value in gathered[0].items():
      if theirs.get(key) != value:
        raise DistributedError(f"process {p} was given another {key} than process 0 "
                               f"({theirs.get(key)} vs {value}); {what} (nothing was written)")


def file_fingerprint(path: str | os.PathLike, ends: int = 1 << 20) -> str:
  """'<size> bytes, sha256 <hex>' of a file's first and last `ends` bytes (all of a file up to
  2 * ends), for check_same: two processes given different files of one name are told apart
  without reading a corpus whole. '<absent>' for a missing file."""
  path = Path(path)
  if not path.is_file():
    return "<absent>"
  size = path.stat().st_size
  digest = hashlib.sha256()
  with path.open("rb") as f:
    digest.update(f.read(ends))
    if size > ends:
      f.seek(max(ends, size - ends))
      digest.update(f.read())
  return f"{size} bytes, sha256 {digest.hexdigest()[:16]}"
