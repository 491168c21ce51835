"""train.py and evaluate.py on two processes (rag_jax.commands.launch, fake CPU devices, gloo).

train.py's RAG fine-tuning (1 device each) against the same run on one process of 2 devices:
the same losses at every logged step (in-step and host retrieval), one process killed mid-run
names itself and a rerun resumes from the orbax checkpoint, process 0 alone writes the workdir's
files, processes given different configs are refused before any work. evaluate.py's answers
modes (2 devices each) write one 2-device process's files byte for byte; its part files resume
whole batches and merge in question order."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import rag_finetune
from rag_jax.commands.launch import child_env, free_port
from rag_jax.evaluation import loop
from rag_jax.retrieval.pipeline import build_from_corpus
from rag_jax.training import rag_trainer
from tests import test_evaluate as te
from tests.test_rag_trainer import setup  # noqa: F401 (the tiny corpus, index and models)

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
SETTINGS = {"n_docs": 2, "max_source_length": 12, "max_target_length": 5,
            "max_combined_length": 24, "batch_size": 8, "num_train_steps": 6,
            "learning_rate": 5e-3, "warmup_steps": 2, "max_grad_norm": 1.0, "log_every": 2,
            "eval_every": 6, "checkpoint_every": 2}


def config_of(root: Path, dirs: dict) -> dict:
  return {"question_encoder_checkpoint": str(dirs["question"]),
          "generator_checkpoint": str(dirs["generator"]), "index_dir": str(root / "kb"),
          "data_dir": str(root / "data"), **SETTINGS}


def train_command(workdir: Path, fields: dict) -> list[str]:
  return [sys.executable, str(ROOT / "train.py"),
          f"--config={ROOT / 'configs' / 'rag_finetune.py'}", f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in fields.items())]


def launch(workdir: Path, fields: dict, processes: int = 2, devices: int = 1,
           **env) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "rag_jax.commands.launch", f"--num_processes={processes}",
             f"--cpu_devices={devices}", f"--log_dir={workdir / '.logs'}", "--grace_s=2", "--",
             *train_command(workdir, fields)]
  return subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                        capture_output=True, text=True, timeout=TIMEOUT_S)


def records(workdir: Path) -> list[dict]:
  return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]


def test_two_processes_train_as_one_and_resume_after_a_kill(setup, tmp_path):  # noqa: F811
  root, dirs = setup
  fields = config_of(root, dirs)
  work = tmp_path / "run"
  # Process 1 dies after step 3 (the checkpoint of step 2 is saved, or being saved).
  killed = launch(work, fields, RAG_JAX_KILL_AT="train:3:1")
  assert killed.returncode == 1, killed.stdout + killed.stderr
  assert killed.stderr.strip().splitlines()[-1].startswith(
      "error: process 1 of 2 was killed by SIGKILL"), killed.stderr
  run = launch(work, fields)
  assert run.returncode == 0, run.stdout + run.stderr

  # The reference: the same config on one process of 2 devices.
  one = launch(tmp_path / "one", fields, processes=1, devices=2)
  assert one.returncode == 0, one.stdout + one.stderr
  assert_same_figures(records(work), records(tmp_path / "one"))
  written = json.loads((work / "report.json").read_text())
  report = json.loads((tmp_path / "one" / "report.json").read_text())
  assert written["devices"] == report["devices"] == 2
  assert written["val_loss"] == pytest.approx(report["val_loss"], rel=1e-5)
  assert (work / "export" / "config.json").is_file()
  # Process 0 writes the workdir's files and the console; process 1 its log.
  assert "done: " in run.stdout and (work / "train.log").is_file()
  assert "process 1 of 2" not in (work / "train.log").read_text()
  assert (work / ".logs" / "process-1.log").is_file()


def assert_same_figures(got: list[dict], want: list[dict]) -> None:
  """Process 0's gradients and metric sums are added to process 1's by gloo, in another order
  than one process's psum where more than two devices add up: the same figures to float32
  rounding (bit for bit measured here, 2 x 1 devices against 1 x 2: a sum of two is the same
  either way; 7e-7 relative measured with 2 x 4 devices against 1 x 8)."""
  assert [r["step"] for r in got] == [r["step"] for r in want] == [2, 4, 6]
  for key in ("loss", "loss_per_token", "top_doc_prior", "val_loss", "val_loss_per_token",
              "val_answer_recall_at_2"):
    for g, w in zip(got, want, strict=True):
      if key in w:
        assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), (key, g["step"])


@pytest.mark.slow
@pytest.mark.parametrize("retrieval,context_encoder,kind,refresh", [
    ("host", False, "exact", "none"), ("host", False, "scann", "none"),
    ("device", True, "exact", "none"), ("device", True, "exact", "rolling"),
    ("device", True, "exact", "scheduled")])
def test_host_retrieval_and_context_encoder_on_two_processes_train_as_one(
    setup, tmp_path, retrieval, context_encoder, kind, refresh):  # noqa: F811
  """config.retrieval="host": each process indexes its block of rows (12 of the 24 passages),
  every one searches the whole batch and the top-k lists are merged: the passages of one index
  over all rows (ScaNN below its brute-force size is exact). config.train_context_encoder:
  process 0 builds the encoder table, each process reads its rows; the index state of a
  rolling or scheduled refresh is sharded over the global mesh like the index."""
  root, dirs = setup
  fields = {**config_of(root, dirs), "retrieval": retrieval}
  if kind == "scann":
    build_from_corpus(root / "corpus.tsv", tmp_path / "kb", encoder=str(dirs["context"]),
                      fmt="tsv", split_words=None, index_type="scann", progress=False)
    fields["index_dir"] = str(tmp_path / "kb")
  if context_encoder:
    fields.update(train_context_encoder=True, context_encoder_checkpoint=str(dirs["context"]),
                  context_encoder_max_length=32, index_refresh=refresh, refresh_rows_per_step=2,
                  refresh_schedule="0-6:3")
  for work, processes, devices in (("run", 2, 1), ("one", 1, 2)):
    run = launch(tmp_path / work, fields, processes, devices)
    assert run.returncode == 0, run.stdout + run.stderr
  report = json.loads((tmp_path / "run" / "report.json").read_text())
  assert report["retrieval"] == retrieval
  assert report["train_context_encoder"] == context_encoder
  assert (tmp_path / "run" / "export" / "ctx_encoder").is_dir() == context_encoder
  assert_same_figures(records(tmp_path / "run"), records(tmp_path / "one"))
  if refresh != "none":
    for got, want in zip(records(tmp_path / "run"), records(tmp_path / "one"), strict=True):
      assert (got["staleness"], got["staleness_max"]) == (want["staleness"],
                                                          want["staleness_max"])
  if retrieval == "host":
    logs = [(tmp_path / "run" / "train.log").read_text(),
            (tmp_path / "run" / ".logs" / "process-1.log").read_text()]
    assert [f"this process indexes rows [{a}, {b}) of 24 ({kind})" in log
            for log, (a, b) in zip(logs, [(0, 12), (12, 24)], strict=True)] == [True, True]


@pytest.mark.slow
def test_processes_given_different_configs_are_refused_before_work(setup, tmp_path):  # noqa: F811
  root, dirs = setup
  address = f"127.0.0.1:{free_port()}"
  work = tmp_path / "run"
  procs = []
  for i in range(2):
    fields = {**config_of(root, dirs), "learning_rate": [5e-3, 1e-3][i]}
    procs.append(subprocess.Popen(
        [*train_command(work, fields), f"--coordinator_address={address}", "--num_processes=2",
         f"--process_id={i}"], cwd=ROOT,
        env=child_env({**os.environ, "PYTHONPATH": str(ROOT)}, i, 2, address, work / ".logs",
                      cpu_devices=2, gpus=None),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  results = [p.communicate(timeout=TIMEOUT_S) for p in procs]
  assert [p.returncode for p in procs] == [1, 1], results
  lines = results[0][1].strip().splitlines()
  assert lines == ['error: process 1 was given another config than process 0 ('
                   + lines[0].split("(", 1)[1]], results[0][1]
  assert '"learning_rate": 0.001' in lines[0] and '"learning_rate": 0.005' in lines[0]
  assert lines[0].endswith("every process must train one config on the same files (nothing "
                           "was written)")
  assert sorted(p.name for p in work.iterdir()) == [".logs"]  # no config.json, checkpoint, lock


def test_run_facts_tell_apart_files_of_one_name(setup, tmp_path):  # noqa: F811
  """What check_same compares: another answer of the same length in a data file at the same
  path (another host's copy) changes that file's fact alone."""
  root, dirs = setup
  data = tmp_path / "data"
  data.mkdir()
  for f in (root / "data").iterdir():
    (data / f.name).write_bytes(f.read_bytes())
  config = rag_finetune.get_config()
  config.update({**config_of(root, dirs), "data_dir": str(data)})
  before = rag_trainer.run_facts(config, tmp_path)
  lines = (data / "train.target").read_text().splitlines(keepends=True)
  swapped = next(line for line in lines if line != lines[0] and len(line) == len(lines[0]))
  (data / "train.target").write_text("".join([swapped, *lines[1:]]))
  assert (data / "train.target").stat().st_size == len("".join(lines).encode())
  after = rag_trainer.run_facts(config, tmp_path)
  assert [k for k in before if before[k] != after[k]] == [str(data / "train.target")]
  assert len(before) == 10  # config, workdir, 4 data files, index, store, 2 checkpoint configs


@pytest.mark.slow
def test_evaluate_py_on_two_processes_writes_one_processs_files(tmp_path):
  """evaluate.py's three modes, in one workdir: answers (5 questions in batches of 2, process 0
  answering batches 0 and 2, process 1 batch 1), the Figure-3 sweep (--docs=1,2: retrieval
  depth 2), then --retrieval_only (depth 8: the retrieval deepened). Process 0 writes every file
  byte for byte as one process of as many devices as each of them (2) does. (Against a process
  of another number of CPU devices, scores differ by float32 rounding: XLA blocks the question
  encoder's matmuls differently.)"""
  (tmp_path / "world").mkdir()
  world = te.pref.build_world(tmp_path / "world", te.TITLES, te.TEXTS, te.QUESTIONS, te.N_DOCS,
                              te.MAX_COMBINED)
  root, *_, models = world
  flags = [f"--config.{k}={v}" for k, v in {
      "model_type": "rag_token", "rag_checkpoint": models["token"][1],
      "index_dir": root / "kb", "eval.test_file": te.write_qa_csv(tmp_path / "q.csv", te.GOLD),
      "eval.batch_size": 2, "eval.max_length": te.MAX_LENGTH,
      "eval.rag_token.n_docs": te.N_DOCS}.items()]

  def evaluate(processes: int, work: Path, *mode: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "rag_jax.commands.launch", f"--num_processes={processes}",
               "--cpu_devices=2", f"--log_dir={work / 'eval' / '.logs'}", "--grace_s=2", "--",
               sys.executable, str(ROOT / "evaluate.py"),
               f"--config={ROOT / 'configs' / 'paper_nq.py'}", f"--workdir={work}", *flags,
               *mode]
    return subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=TIMEOUT_S)

  for mode in ((), ("--docs=1,2",), ("--retrieval_only",)):
    for processes in (1, 2):
      run = evaluate(processes, tmp_path / str(processes), *mode)
      assert run.returncode == 0, run.stdout + run.stderr
  folders = [tmp_path / str(p) / "eval" / "nq-rag_token-test" for p in (1, 2)]
  files = sorted(str(f.relative_to(folders[0])) for f in folders[0].rglob("*") if f.is_file())
  assert "retrieval/predictions.jsonl" in files and "docs_2/predictions.jsonl" in files
  assert files == sorted(str(f.relative_to(folders[1])) for f in folders[1].rglob("*")
                         if f.is_file())  # no part file left
  for name in files:
    if not name.endswith(".png"):
      assert (folders[1] / name).read_bytes() == (folders[0] / name).read_bytes(), name
  records = [json.loads(x) for x in (folders[1] / "retrieval" / "predictions.jsonl"
                                     ).read_text().splitlines()]
  assert [len(r["passage_ids"]) for r in records] == [8] * 5  # deepened from 2
  assert "recall@5" in run.stdout  # process 0's table
  assert "answered 1 batch(es)" in (tmp_path / "2" / "eval" / ".logs" / "process-1.log"
                                    ).read_text()


def test_evaluation_part_files_resume_whole_batches_and_merge_in_question_order(tmp_path):
  """The pieces of the multi-process evaluation loop, against the one-process loop's file: a
  part file cut by a kill keeps its whole batches only, one of another share none, and process
  0's merge writes the one-process file byte for byte."""
  examples = [loop.EvalExample(f"q{i}", (f"a{i}",)) for i in range(7)]

  def predict(batch):
    return [{"prediction": e.question.replace("q", "a")} for e in batch]

  whole = loop.run_loop(examples, predict, tmp_path / "one.jsonl", 2, progress=False)
  lines = (tmp_path / "one.jsonl").read_text().splitlines(keepends=True)
  # Two processes from 1 question done: batches start at 1, 3, 5; process 1 has [3].
  starts = [1, 3, 5][1::2]
  assert loop.resumable(whole[3:5], examples, starts, 2) == (whole[3:5], 1)
  assert loop.resumable(whole[3:4], examples, starts, 2) == ([], 0)  # a batch cut by a kill
  assert loop.resumable(whole[1:3], examples, starts, 2) == ([], 0)  # another share's records
  path = tmp_path / "two.jsonl"
  path.write_text(lines[0])
  loop.part_path(path, 0).write_text("".join(lines[1:3] + lines[5:]))
  loop.part_path(path, 1).write_text("".join(lines[3:5]))
  loop.merge_parts(path, whole[:1], len(examples))
  assert path.read_bytes() == (tmp_path / "one.jsonl").read_bytes()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "two.jsonl"]
  # A question no process answered is named, and the file is left as it was.
  path.write_text(lines[0])
  loop.part_path(path, 0).write_text("".join(lines[1:3]))
  with pytest.raises(ValueError, match=r"no process answered question\(s\) \[3, 4, 5, 6\]"):
    loop.merge_parts(path, whole[:1], len(examples))
  assert path.read_text() == lines[0]
