r"""N processes of one rag_jax command on this machine, joined by jax.distributed.

  python -m rag_jax.commands.launch --num_processes=2 --cpu_devices=2 -- \
      python -m rag_jax.commands.encode_passages --corpus=psgs.tsv --encoder=ctx --out=wiki
  python -m rag_jax.commands.launch --num_processes=8 --gpus_per_process=1 -- python ...

For tests and for one multi-accelerator box without a cluster manager (on SLURM or a TPU slice,
start the command itself: docs/distributed.md). Each process gets RAG_JAX_COORDINATOR_ADDRESS
(127.0.0.1 and a free port), RAG_JAX_NUM_PROCESSES, RAG_JAX_PROCESS_ID and RAG_JAX_LOG_DIR, and
its devices: --cpu_devices=K gives each K fake CPU devices (XLA_FLAGS
--xla_force_host_platform_device_count, gloo collectives), --gpus_per_process=G each its own G
GPUs (CUDA_VISIBLE_DEVICES). Process 0 reads this console's stdin and writes to this console;
process i > 0 reads nothing (as srun's default) and writes to LOG_DIR/process-<i>.log.

The job ends with the first process that fails: the others are stopped, and one line names it,
`error: process 1 of 2 was killed by SIGKILL (log: ...)`, exit 1; exit 0 when every process
exits 0. Ctrl-C stops them all.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from absl import flags

from rag_jax.commands.common import LAUNCH_LOG_DIR, error_line, parse_flags, run_command
from rag_jax.distributed import ENV_COORDINATOR, ENV_LOG_DIR, ENV_NUM_PROCESSES, ENV_PROCESS_ID
from rag_jax.utils.errors import UsageError, UserError

FLAGS = flags.FlagValues()
_F = {"flag_values": FLAGS}
flags.DEFINE_integer("num_processes", 2, "Processes to start.", lower_bound=1, **_F)
flags.DEFINE_integer("cpu_devices", None, "Fake CPU devices per process (CPU only, gloo "
                     "collectives).", lower_bound=1, **_F)
flags.DEFINE_integer("gpus_per_process", None, "GPUs per process (CUDA_VISIBLE_DEVICES).",
                     lower_bound=1, **_F)
flags.DEFINE_string("log_dir", LAUNCH_LOG_DIR, "Where processes 1.. write their output.", **_F)
flags.DEFINE_integer("port", 0, "Coordinator port on 127.0.0.1 (0: a free one).", lower_bound=0,
                     **_F)
flags.DEFINE_float("grace_s", 10.0, "After a failure, seconds the others get to stop after "
                   "SIGTERM before SIGKILL.", lower_bound=0.0, **_F)
flags.DEFINE_bool("traceback", False, "On an anticipated error, show its traceback.", **_F)


class ProcessFailed(UserError, RuntimeError):
  """A process of the job exited with a non-zero status or a signal."""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(base: dict[str, str], index: int, count: int, address: str, log_dir: Path,
              cpu_devices: int | None, gpus: int | None) -> dict[str, str]:
  """The environment of process `index`: the job's settings and its own devices."""
  env = {**base, ENV_COORDINATOR: address, ENV_NUM_PROCESSES: str(count),
         ENV_PROCESS_ID: str(index), ENV_LOG_DIR: str(log_dir), "PYTHONUNBUFFERED": "1"}
  if cpu_devices is not None:
    kept = [f for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join([*kept, f"--xla_force_host_platform_device_count={cpu_devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
  if gpus is not None:
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(index * gpus, (index + 1) * gpus))
  return env


def describe_exit(code: int) -> str:
  if code < 0:
    try:
      return f"was killed by {signal.Signals(-code).name}"
    except ValueError:
      return f"was killed by signal {-code}"
  return f"exited with status {code}"


def last_line(path: Path) -> str:
  """The last non-empty line of a log (what an `error: ...` process printed), or ''."""
  try:
    with open(path, "rb") as f:
      f.seek(max(0, f.seek(0, 2) - 4096))
      lines = [x.strip() for x in f.read().decode("utf-8", "replace").splitlines() if x.strip()]
  except OSError:
    return ""
  return lines[-1] if lines else ""


def stop(procs: list[subprocess.Popen], grace_s: float) -> None:
  """SIGTERM to every running process, SIGKILL to those still running after grace_s."""
  for p in procs:
    if p.poll() is None:
      p.terminate()
  deadline = time.monotonic() + grace_s
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


def launch(command: Sequence[str], num_processes: int, *, cpu_devices: int | None = None,
           gpus_per_process: int | None = None, log_dir: str | os.PathLike = LAUNCH_LOG_DIR,
           port: int = 0, grace_s: float = 10.0) -> None:
  """Runs `command` as `num_processes` processes (module docstring); raises ProcessFailed
  naming the first that fails, after stopping the others."""
  log_dir = Path(log_dir).resolve()
  log_dir.mkdir(parents=True, exist_ok=True)
  address = f"127.0.0.1:{port or free_port()}"
  procs, logs = [], []
  try:
    for i in range(num_processes):
      env = child_env(dict(os.environ), i, num_processes, address, log_dir, cpu_devices,
                      gpus_per_process)
      path = log_dir / f"process-{i}.log"
      out = None if i == 0 else open(path, "ab")  # noqa: SIM115 (closed below)
      logs.append(path)
      procs.append(subprocess.Popen(list(command), env=env, stdout=out,  # stdin: process 0's
                                    stdin=None if i == 0 else subprocess.DEVNULL,
                                    stderr=None if out is None else subprocess.STDOUT))
      if out is not None:
        out.close()
    while True:
      codes = [p.poll() for p in procs]
      failed = next((i for i, c in enumerate(codes) if c not in (None, 0)), None)
      if failed is not None:
        stop(procs, grace_s)
        where = "this console" if failed == 0 else str(logs[failed])
        # A process that exits with a status printed why last (`error: ...`); a signal's last
        # line is whatever the process was doing, left to its log.
        tail = "" if failed == 0 or codes[failed] < 0 else last_line(logs[failed])
        raise ProcessFailed(
            f"process {failed} of {num_processes} {describe_exit(codes[failed])} (its output: "
            f"{where}{'; last line: ' + tail if tail else ''}); the other processes were "
            "stopped")
      if all(c == 0 for c in codes):
        return
      time.sleep(0.2)
  except KeyboardInterrupt:
    stop(procs, grace_s)
    raise


def main(argv: Sequence[str] | None = None) -> int:
  """Launches the command after `--` in argv; returns the exit code."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--" not in argv:
    print(error_line(UsageError("give the command to run after --, e.g. -- python -m "
                                "rag_jax.commands.encode_passages ...")), file=sys.stderr)
    return 2
  split = argv.index("--")
  parse_flags(FLAGS, "python -m rag_jax.commands.launch", __doc__, argv[:split])
  command = argv[split + 1:]
  if not command:
    print(error_line(UsageError("the command after -- is empty")), file=sys.stderr)
    return 2
  if FLAGS.cpu_devices is not None and FLAGS.gpus_per_process is not None:
    print(error_line(UsageError("--cpu_devices and --gpus_per_process exclude each other")),
          file=sys.stderr)
    return 2
  return run_command(lambda: launch(
      command, FLAGS.num_processes, cpu_devices=FLAGS.cpu_devices,
      gpus_per_process=FLAGS.gpus_per_process, log_dir=FLAGS.log_dir, port=FLAGS.port,
      grace_s=FLAGS.grace_s), FLAGS) or 0


def console_main() -> None:
  """The console script's entry (pyproject.toml)."""
  sys.exit(main())


if __name__ == "__main__":
  console_main()
