"""Starting a multi-process job (rag_jax/distributed.py): settings from flags, the environment or
a cluster manager, one-line errors for bad ones, a bounded wait for an unreachable coordinator;
the local launcher's environment and failure line (rag_jax/commands/launch.py)."""

import subprocess
import sys
import time

import pytest

from rag_jax.commands import encode_passages, launch
from rag_jax.distributed import DistributedError, Settings, initialize, settings

SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}


def test_one_process_starts_nothing():
  assert settings(environ={}) is None
  assert settings(num_processes=1, process_id=0, environ={}) is None
  assert settings(environ={**SLURM, "SLURM_NTASKS": "1"}) is None  # a one-task SLURM step
  assert settings(environ=SLURM, distributed="no") is None
  assert initialize(environ={}) == 1


def test_settings_from_flags_environment_and_clusters():
  env = {"RAG_JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "RAG_JAX_NUM_PROCESSES": "4",
         "RAG_JAX_PROCESS_ID": "3"}
  assert settings(environ=env) == Settings("10.0.0.1:1234", 4, 3)
  assert settings(process_id=2, environ=env) == Settings("10.0.0.1:1234", 4, 2)  # flags win
  # jax detects the rest itself: SLURM, Open MPI, TPU slices naming their workers, or asked to.
  assert settings(environ=SLURM) == Settings(None, None, None)
  assert settings(environ={"OMPI_COMM_WORLD_SIZE": "8"}) == Settings(None, None, None)
  assert settings(environ={"TPU_WORKER_HOSTNAMES": "a,b"}) == Settings(None, None, None)
  assert settings(environ={}, distributed="yes", timeout_s=5) == Settings(None, None, None, 5)


@pytest.mark.parametrize("kwargs, environ, message", [
    ({"num_processes": 2, "process_id": 2, "coordinator_address": "h:1"}, {},
     r"^--process_id=2 with --num_processes=2: a process id lies in \[0, 2\)$"),
    ({"num_processes": 2, "process_id": 1}, {},
     r"^process 1 of 2: no coordinator address; give --coordinator_address=HOST:PORT"),
    ({"num_processes": 2, "coordinator_address": "h:1"}, {}, r"^--process_id is missing"),
    ({"process_id": 0, "coordinator_address": "h:1"}, {}, r"^--num_processes is missing"),
    ({"num_processes": 2, "process_id": 0, "coordinator_address": "h"}, {},
     r"^--coordinator_address=h: expected HOST:PORT$"),
    ({}, {"RAG_JAX_NUM_PROCESSES": "two"}, r"^RAG_JAX_NUM_PROCESSES='two': expected a whole"),
])
def test_bad_settings_are_named(kwargs, environ, message):
  with pytest.raises(DistributedError, match=message) as e:
    settings(**kwargs, environ=environ)
  assert "\n" not in str(e.value)


def test_unreachable_coordinator_fails_within_the_timeout():
  port = launch.free_port()  # nothing listens there
  start = time.monotonic()
  with pytest.raises(DistributedError, match=rf"^process 1 of 2 could not reach the coordinator "
                     rf"127.0.0.1:{port} within 2 s \(.*\); is process 0 running"):
    initialize(f"127.0.0.1:{port}", 2, 1, timeout_s=2, environ={})
  assert time.monotonic() - start < 10


def test_command_names_a_bad_process_id_in_one_line(tmp_path, capsys):
  corpus = tmp_path / "c.tsv"
  corpus.write_text("Title\tsome text\n")
  code = encode_passages.main([f"--corpus={corpus}", "--encoder=x", f"--out={tmp_path / 'o'}",
                               "--num_processes=2", "--process_id=2",
                               "--coordinator_address=127.0.0.1:1"])
  err = capsys.readouterr().err.strip().splitlines()
  assert code == 1 and err == ["error: --process_id=2 with --num_processes=2: a process id lies "
                               "in [0, 2)"]
  assert not (tmp_path / "o").exists()


def test_launcher_environment_gives_each_process_its_devices():
  env = launch.child_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --foo"}, 1, 3,
                         "127.0.0.1:5", launch.Path("/l"), cpu_devices=2, gpus=None)
  assert env["RAG_JAX_PROCESS_ID"] == "1" and env["RAG_JAX_NUM_PROCESSES"] == "3"
  assert env["XLA_FLAGS"] == "--foo --xla_force_host_platform_device_count=2"
  assert env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
  gpu = launch.child_env({}, 2, 4, "a:1", launch.Path("/l"), cpu_devices=None, gpus=2)
  assert gpu["CUDA_VISIBLE_DEVICES"] == "4,5"


def test_launcher_names_the_first_failing_process_and_stops_the_others(tmp_path):
  # Process 1 fails at once; process 0 would sleep for a minute unless stopped.
  script = ("import os, sys, time\n"
            "if os.environ['RAG_JAX_PROCESS_ID'] == '1':\n"
            "  print('error: something went wrong'); sys.exit(3)\n"
            "time.sleep(60)\n")
  start = time.monotonic()
  with pytest.raises(launch.ProcessFailed) as e:
    launch.launch([sys.executable, "-c", script], 2, log_dir=tmp_path, grace_s=5)
  assert time.monotonic() - start < 30
  assert str(e.value) == (f"process 1 of 2 exited with status 3 (its output: "
                          f"{tmp_path / 'process-1.log'}; last line: error: something went "
                          "wrong); the other processes were stopped")


@pytest.mark.slow
def test_exchanges_and_barriers_can_recur_in_one_job(tmp_path):
  """Two encodings in one job make the same exchanges twice: each call gets its own keys (the
  coordination service refuses a key set twice)."""
  script = ("from rag_jax.distributed import all_gather_text, barrier, initialize, is_primary\n"
            "n = initialize()\n"
            "import jax\n"
            "p = str(jax.process_index())\n"
            "a = all_gather_text('x', 'a' + p, 60)\n"
            "barrier('y', 60)\n"
            "b = all_gather_text('x', 'b' + p, 60)\n"
            "barrier('y', 60)\n"
            "print(n, a, b, flush=True)\n")
  out = tmp_path / "out.txt"
  env = {**launch.os.environ, "PYTHONPATH": str(launch.Path(__file__).resolve().parents[1])}
  with open(out, "w") as f:
    subprocess.run([sys.executable, "-m", "rag_jax.commands.launch", "--num_processes=2",
                    "--cpu_devices=1", f"--log_dir={tmp_path}", "--", sys.executable, "-c",
                    script], env=env, stdout=f, check=True, timeout=120)
  assert out.read_text().splitlines() == ["2 ['a0', 'a1'] ['b0', 'b1']"]
  assert (tmp_path / "process-1.log").read_text().splitlines() == ["2 ['a0', 'a1'] ['b0', 'b1']"]
