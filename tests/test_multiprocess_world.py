"""The default job (`python train.py`, trainer "world") on two processes (rag_jax.commands.launch,
one fake CPU device each, gloo) against one process of two devices, on a tiny world.

Process 1 is killed in RAG-Sequence's step 3 (its checkpoint of step 2 saved): the launcher
names it in one line; the rerun skips the recorded phases and resumes RAG-Sequence from the
checkpoint. Then every phase's metrics.jsonl, the phases' results and the report (held-out EM,
recall before and after RAG training, hot-swap counts, losses) equal the one-process run's bit
for bit but for wall-clock figures and paths, and so do the held-out predictions files, byte for
byte: the steps run on the same 2-device global mesh, the passages are encoded and the held-out
questions answered on one device per process. Process 0 alone writes the workdir's files and
the console; process 1 logs to .logs/process-1.log. Processes given different configs are
refused before any work, naming the field.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rag_jax.commands.launch import child_env, free_port

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600
TINY = {
    "world.num_people": 40, "world.num_cities": 6, "world.num_companies": 5,
    "world.num_years": 10, "world.num_meetings": 10,
    "retriever.hidden_size": 32, "retriever.layers": 1, "retriever.heads": 2,
    "retriever.ffn_dim": 64, "retriever.batch_size": 16, "retriever.num_train_steps": 2,
    "retriever.warmup_steps": 1,
    "generator.d_model": 32, "generator.layers": 1, "generator.heads": 2, "generator.ffn_dim": 64,
    "rag.batch_size": 8, "rag.n_docs": 3, "rag.num_train_steps": 4, "rag.warmup_steps": 1,
    "rag.checkpoint_every": 2, "rag.log_every": 2,
    "eval.batch_size": 40, "eval.recall_ks": "(1,3)",
}
PHASE_METRICS = ("retriever/train", "rag_sequence", "rag_token", "closed_book")


def train_command(workdir: Path, **fields) -> list[str]:
  return [sys.executable, str(ROOT / "train.py"), f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in {**TINY, **fields}.items())]


def launch(workdir: Path, processes: int, devices: int, **env) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "rag_jax.commands.launch", f"--num_processes={processes}",
             f"--cpu_devices={devices}", f"--log_dir={workdir / '.logs'}", "--grace_s=2", "--",
             *train_command(workdir)]
  return subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                        capture_output=True, text=True, timeout=TIMEOUT_S)


def figures(workdir: Path, phase: str) -> list[dict]:
  """A phase's metric records without the speed figures (wall-clock)."""
  return [{k: v for k, v in json.loads(line).items()
           if not k.endswith("_per_s") and k != "elapsed_s"}
          for line in (workdir / phase / "metrics.jsonl").read_text().splitlines() if line]


def without_clocks(tree, workdir: Path):
  """A JSON tree without its wall-clock figures and machine, and `workdir` in paths as WORKDIR."""
  if isinstance(tree, dict):
    return {k: without_clocks(v, workdir) for k, v in tree.items()
            if not (k.endswith(("_per_s", "seconds", "elapsed_s", "this_run")) or k == "machine")}
  if isinstance(tree, list):
    return [without_clocks(v, workdir) for v in tree]
  return tree.replace(str(workdir), "WORKDIR") if isinstance(tree, str) else tree


@pytest.mark.slow
def test_world_job_on_two_processes_equals_one_and_resumes_after_a_kill(tmp_path):
  work, one = tmp_path / "two", tmp_path / "one"
  killed = launch(work, 2, 1, RAG_JAX_KILL_AT="train:3:1")  # process 1, RAG-Sequence's step 3
  assert killed.returncode == 1, killed.stdout + killed.stderr
  assert killed.stderr.strip().splitlines()[-1].startswith(
      "error: process 1 of 2 was killed by SIGKILL"), killed.stderr
  assert list(json.loads((work / "phases.json").read_text())) == [
      "world", "tokenizer", "retriever", "index"]
  run = launch(work, 2, 1)
  assert run.returncode == 0, run.stdout + run.stderr
  assert "] index: done in an earlier run" in run.stdout
  assert "resumed from step 2" in (work / "rag_sequence" / "train.log").read_text()
  reference = launch(one, 1, 2)
  assert reference.returncode == 0, reference.stdout + reference.stderr

  for phase in PHASE_METRICS:
    assert figures(work, phase) == figures(one, phase), phase
  assert [r["step"] for r in figures(work, "rag_sequence")] == [2, 4]
  for name in ("report.json", "phases.json"):
    got, want = (without_clocks(json.loads((w / name).read_text()), w) for w in (work, one))
    assert got == want, name
  assert want["evaluation"]["result"]["rag_token"]["recall"]["recall@3"] > 0  # not all empty
  for model in ("rag_sequence", "rag_token"):
    name = f"{model}/heldout_predictions.jsonl"
    assert (work / name).read_bytes() == (one / name).read_bytes(), name
  # Process 0 writes the workdir and the console; process 1 logs to its file.
  assert "# rag_jax default job" in run.stdout
  assert "process 1 of 2" not in (work / "train.log").read_text()
  assert "phase evaluation" in (work / ".logs" / "process-1.log").read_text()
  assert sorted(p.name for p in (work / ".logs").iterdir()) == ["process-1.log"]


def test_processes_given_different_world_configs_are_refused_before_work(tmp_path):
  """Before: train.py refused the world job on several processes altogether."""
  address, work = f"127.0.0.1:{free_port()}", tmp_path / "run"
  procs = [subprocess.Popen(
      [*train_command(work, **{"world.num_people": [40, 41][i]}),
       f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=child_env({**os.environ, "PYTHONPATH": str(ROOT)}, i, 2, address,
                              work / ".logs", cpu_devices=1, gpus=None),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = [p.communicate(timeout=TIMEOUT_S) for p in procs]
  assert [p.returncode for p in procs] == [1, 1], results
  line = results[0][1].strip().splitlines()[-1]
  assert line.startswith("error: process 1 was given another config than process 0 ("), line
  assert '"num_people": 41' in line and '"num_people": 40' in line
  assert line.endswith("every process must run one config in one workdir (nothing was written)")
  assert sorted(p.name for p in work.iterdir()) == [".logs"]  # no config.json, lock, world
