"""The default job (`python train.py`, trainer "world") on two processes (rag_jax.commands.launch,
one fake CPU device each, gloo) against one process of two devices, on a tiny world.

Process 1 is killed in RAG-Sequence's step 3 (its checkpoint of step 2 saved): the launcher
names it in one line; the rerun skips the recorded phases and resumes RAG-Sequence from the
checkpoint. Then every phase's metrics.jsonl equals the one-process run's bit for bit (the
steps run on the same 2-device global mesh, and the passages are encoded on one device per
process), and so do the report's held-out EM, recall before and after RAG training, hot-swap
counts and every held-out answer and its passages. The passage scores of the held-out
predictions differ by float32 rounding only: process 0 evaluates alone on its one device, the
reference process on two (XLA blocks the question encoder's matmuls differently). Process 0
alone writes the workdir's files and the console; process 1 logs to .logs/process-1.log.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def launch(workdir: Path, processes: int, devices: int, **env) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "rag_jax.commands.launch", f"--num_processes={processes}",
             f"--cpu_devices={devices}", f"--log_dir={workdir / '.logs'}", "--grace_s=2", "--",
             sys.executable, str(ROOT / "train.py"), f"--workdir={workdir}",
             *(f"--config.{k}={v}" for k, v in TINY.items())]
  return subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                        capture_output=True, text=True, timeout=TIMEOUT_S)


def figures(workdir: Path, phase: str) -> list[dict]:
  """A phase's metric records without the speed figures (wall-clock)."""
  return [{k: v for k, v in json.loads(line).items()
           if not k.endswith("_per_s") and k != "elapsed_s"}
          for line in (workdir / phase / "metrics.jsonl").read_text().splitlines() if line]


def predictions(workdir: Path, model: str) -> list[dict]:
  return [json.loads(x) for x in
          (workdir / model / "heldout_predictions.jsonl").read_text().splitlines()]


def same_answer(record: dict) -> dict:
  """A held-out prediction's fields that must be equal: all but the scores and their order."""
  return {k: v for k, v in record.items()
          if k not in ("score", "doc_scores", "passage_ids", "titles")}


def scored(record: dict) -> dict[str, float]:
  """{passage id: its score} of a held-out prediction (the untrained retriever's scores lie
  within float32 rounding of each other, where the two runs may order them differently)."""
  return dict(zip(record["passage_ids"], record["doc_scores"], strict=True))


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
  got, want = (json.loads((w / "report.json").read_text()) for w in (work, one))
  assert got["retriever"]["recall_before"] == want["retriever"]["recall_before"]
  assert got["closed_book"]["heldout_em"] == want["closed_book"]["heldout_em"]
  for model in ("rag_sequence", "rag_token"):
    for key in ("heldout_em", "recall_after", "hot_swap", "train_loss_first", "train_loss_last",
                "decoder"):
      assert got[model][key] == want[model][key], (model, key)
    for g, w in zip(predictions(work, model), predictions(one, model), strict=True):
      assert same_answer(g) == same_answer(w)
      assert scored(g).keys() == scored(w).keys()  # the same passages (near ties may swap)
      assert scored(g) == pytest.approx(scored(w), rel=1e-6)
      assert g["score"] == pytest.approx(w["score"], rel=1e-6)
  # Process 0 writes the workdir and the console; process 1 logs to its file.
  assert "# rag_jax default job" in run.stdout
  assert "process 1 of 2" not in (work / "train.log").read_text()
  assert "phase evaluation" in (work / ".logs" / "process-1.log").read_text()
  assert sorted(p.name for p in (work / ".logs").iterdir()) == ["process-1.log"]
