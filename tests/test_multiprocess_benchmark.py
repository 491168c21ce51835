"""benchmark.py on several processes (rag_jax.commands.launch): the spanning workloads split
over the processes and agree with one process on the same global batch; what has no
several-process form is refused in one line before any work."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import cli, presets

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 420
TINY = ["--preset=tiny", "--train_kinds=rag_sequence", "--repeats=1", "--warmup=1"]


def _env(**extra: str) -> dict[str, str]:
  return {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "PYTHONPATH": str(ROOT),
          **extra}


def _launch(tmp_path: Path, devices: int, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "rag_jax.commands.launch", "--num_processes=2",
       f"--cpu_devices={devices}", f"--log_dir={tmp_path / 'logs'}", "--grace_s=2", "--",
       sys.executable, "benchmark.py", *args], cwd=ROOT, env=_env(), capture_output=True,
      text=True, timeout=TIMEOUT_S)


@pytest.mark.slow
def test_two_processes_split_the_work_and_agree_with_one_process(tmp_path):
  run = _launch(tmp_path, 1, *TINY, f"--workdir={tmp_path / 'two'}")  # default workloads
  assert run.returncode == 0, run.stdout + run.stderr[-3000:]
  # Process 0 prints the table and writes the JSON; process 1 only its log.
  assert run.stdout.count("rag_jax/s") == 1 and run.stdout.count("JSON: ") == 1
  assert run.stdout.startswith(f"2 processes: workloads train,retrieval,encode; peers, ScaNN "
                               f"and faiss off; processes 1.. log to {tmp_path / 'logs'}\n")
  log1 = (tmp_path / "logs" / "process-1.log").read_text()
  assert "rag_jax/s" not in log1 and "JSON: " not in log1
  report = json.loads((tmp_path / "two" / "tiny.json").read_text())
  assert report["errors"] == []
  assert (report["machine"]["processes"], report["machine"]["devices_per_process"]) == (2, 1)
  assert report["options"]["peers"] is False and report["options"]["processes"] == 2
  # The job's ceilings: both processes' matmul rates, measured side by side, summed.
  each = report["ceilings"]["per_process"]
  assert report["ceilings"]["jax_matmul_flops"] == sum(c["jax_matmul_flops"] for c in each)
  assert len(each) == 2
  rows = report["results"]
  assert [r["workload"] for r in rows] == ["train", "retrieval", "encode", "encode"]
  assert all(r["processes"] == 2 for r in rows)
  assert [r["peer"] for r in rows if r["workload"] != "retrieval"] == [None] * 3
  train, exact, fixed, mixed = rows
  preset = presets.get("tiny")
  # The preset's batch is the global batch: each process fed half of it.
  assert (train["batch"], train["rows_per_process"]) == (preset.batch, preset.batch // 2)
  assert (fixed["batch"], fixed["rows_per_process"]) == (preset.encode_batch,
                                                         preset.encode_batch // 2)
  # The exact search over the index sharded on both processes finds numpy's top-100.
  assert exact["case"] == "exact (jax) vs numpy" and exact["rag_jax"]["recall@100"] == 1.0
  # The mixed corpus: each process encoded its half, and said so in its log.
  assert mixed["rows_per_process"] == [32, 32] and mixed["passages"] == preset.encode_corpus
  assert "process 1 of 2: passages 32-63 (32 rows) of 64 are its share" in log1
  assert "process 0 of 2: passages 0-31 (32 rows) of 64 are its share" in (
      tmp_path / "two" / "benchmark.log").read_text()
  assert not (tmp_path / "two" / ".logs").exists()  # the launcher's log dir wins

  # One process over two devices, the same global batches.
  one = subprocess.run(
      [sys.executable, "benchmark.py", *TINY, "--workloads=train,encode", "--peers=false",
       f"--workdir={tmp_path / 'one'}"], cwd=ROOT, capture_output=True, text=True,
      timeout=TIMEOUT_S, env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  assert one.returncode == 0, one.stderr[-3000:]
  ref = json.loads((tmp_path / "one" / "tiny.json").read_text())
  assert (ref["machine"]["processes"], ref["machine"]["devices_per_process"]) == (1, 2)
  ref_train, _, ref_mixed = ref["results"]
  # Same global batch on the same device count: the same step, bit for bit.
  assert train["rag_jax"]["loss_first_step"] == ref_train["rag_jax"]["loss_first_step"]
  # The halves' embeddings add up to the whole corpus's (batches of other shapes: rounding).
  assert mixed["embedding_abs_sum"] == pytest.approx(ref_mixed["embedding_abs_sum"], rel=1e-6)
  assert mixed["real_tokens"] == ref_mixed["real_tokens"]


def test_a_workload_of_one_process_is_refused_before_joining(tmp_path):
  """Before: 'benchmark.py runs on one process', exit 1, after joining the job."""
  proc = subprocess.run(
      [sys.executable, "benchmark.py", "--workloads=train,generate", "--peers",
       "--num_processes=2", "--process_id=0", "--coordinator_address=127.0.0.1:9",
       "--distributed_timeout=10", f"--workdir={tmp_path / 'b'}"], cwd=ROOT, env=_env(),
      capture_output=True, text=True, timeout=120)
  assert (proc.returncode, proc.stdout) == (2, "")
  assert proc.stderr == (
      "error: on several processes benchmark.py runs --workloads=train,retrieval,encode (or a "
      "part), in-process, without peers, ScaNN or faiss; not generate, --peers (one process "
      "only)\n")
  assert not (tmp_path / "b").exists()


def test_a_batch_that_does_not_split_over_the_global_devices_is_refused(tmp_path):
  """2 processes x 3 devices: the tiny batches (2, 16) do not split over 6 devices; every
  process refuses once joined, before any work."""
  run = _launch(tmp_path, 3, "--workloads=train,encode", f"--workdir={tmp_path / 'w'}")
  assert run.returncode == 1
  line = ("error: the tiny preset's batch 2 and encode_batch 16 cannot be split over 6 devices "
          "(each process feeds the same number of rows to each of its devices); use a device "
          "count that divides it")
  assert run.stderr.strip().splitlines()[0] == line
  # The launcher names the first process to exit (either: both refuse at once) and stops the
  # other, which may not have written its line yet.
  first = re.search(r"error: process ([01]) of 2 exited with status 2", run.stderr)
  assert first, run.stderr
  if first.group(1) == "1":
    assert line in (tmp_path / "logs" / "process-1.log").read_text()
  assert not (tmp_path / "w").exists()


def test_several_process_checks():
  tiny = presets.get("tiny")
  assert cli.several_process_problem(["train", "encode", "retrieval"],
                                     {"peers": False, "profile": 0}, "auto") is None
  assert cli.several_process_problem(["encode", "generate"],
                                     {"scann": ["2:0.03"], "max_batch": True}, "yes").endswith(
      "; not generate, --scann, --max_batch, --isolate=yes (one process only)")
  assert cli.global_batch_problem(tiny, ["train", "encode"], 2) is None
  assert cli.global_batch_problem(tiny, ["retrieval"], 3) is None  # no batch to split
  assert cli.global_batch_problem(tiny, ["encode"], 4) is None
  assert cli.global_batch_problem(tiny, ["train", "encode"], 4).startswith(
      "the tiny preset's batch 2 cannot be split over 4 devices")
