"""The search and answer commands on 2 processes (1 fake CPU device each, gloo) against the same
command on one process over the same exact index: process 0 prints the same text (ids, scores,
order, ties included), with the questions on argv and on stdin; the ids also equal a numpy
brute-force top-k over the saved embeddings; process 1's log names its block of rows. Process 1
waits for each of process 0's batches however long it takes, and stops with process 0's input
error; tune_index refuses several processes, saying why."""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import DPRConfig, DPRContextEncoder, DPRQuestionEncoder

from rag_jax.commands import answer, search
from rag_jax.retrieval.encode import EncodeConfig
from rag_jax.retrieval.index import open_index_embeddings, read_meta
from rag_jax.retrieval.pipeline import build_from_corpus
from rag_jax.retrieval.retriever import Retriever
from tests import pipeline_reference as pref
from tests import test_answer as ta
from tests.test_retrieval_encode import make_passages, save_tokenizer

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["who was king of rome", "music and art in paris 1815", "river"]


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
  """An exact index of 11 passages (blocks of rows 0-5 and 6-10 on 2 processes) where row 8
  repeats row 1: a tie across the blocks; a tiny random DPR question encoder."""
  root = tmp_path_factory.mktemp("mp_commands")
  docs = make_passages(10, seed=5)
  rows = [*docs[:8], docs[1], *docs[8:]]
  (root / "docs.tsv").write_text("".join(f"{d.title}\t{d.text}\n" for d in rows))
  tokenizer = save_tokenizer(root / "qry", docs)
  tokenizer.save_pretrained(root / "ctx")
  torch.manual_seed(2)
  config = DPRConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
                     initializer_range=0.5)
  DPRQuestionEncoder(config).save_pretrained(root / "qry")
  DPRContextEncoder(config).save_pretrained(root / "ctx")
  build_from_corpus(root / "docs.tsv", root / "kb", encoder=str(root / "ctx"), fmt="tsv",
                    split_words=None, index_type="exact", progress=False,
                    encode_config=EncodeConfig(batch_size=4, max_length=64, shard_size=4))
  return root


def _launch(tmp_path: Path, args: list[str], stdin: str = "") -> str:
  """Process 0's stdout of `args` on 2 processes x 1 CPU device."""
  tmp_path.mkdir(exist_ok=True)
  run = subprocess.run(
      [sys.executable, "-m", "rag_jax.commands.launch", "--num_processes=2", "--cpu_devices=1",
       f"--log_dir={tmp_path / 'logs'}", "--", sys.executable, "-m", *args],
      cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, input=stdin,
      capture_output=True, text=True, timeout=300)
  log = (tmp_path / "logs" / "process-1.log")
  assert run.returncode == 0, run.stderr[-3000:] + (log.read_text()[-3000:] if log.exists()
                                                    else "")
  return run.stdout


def test_search_on_two_processes_prints_what_one_process_prints(kb, tmp_path):
  emb = open_index_embeddings(kb / "kb" / "index", read_meta(kb / "kb" / "index")).to_array()
  count = len(emb)
  assert count == 11 and np.array_equal(emb[8], emb[1])  # the tie across the blocks
  args = ["--dir", str(kb / "kb"), "--question_encoder", str(kb / "qry"), f"--k={count}"]
  one = io.StringIO()
  assert search.main([*args, *QUESTIONS], stdout=one) == 0

  # The independent reference: numpy brute force over the saved embeddings, ties to the
  # smaller row. Elementwise in float64, not a BLAS matmul, whose blocking can give two equal
  # rows different scores.
  retriever = Retriever.load(kb / "kb", kb / "qry")
  queries = retriever.embed(*retriever.tokenize(QUESTIONS)).astype(np.float64)
  scores = (queries[:, None, :] * emb[None, :, :]).sum(-1)  # [Q, N]
  printed = [[int(r) for r in re.findall(r"row (\d+)\)$", block, re.M)]
             for block in one.getvalue().split("Q: ")[1:]]
  assert printed == np.argsort(-scores, axis=1, kind="stable").tolist()
  assert all(b.index(1) < b.index(8) and abs(b.index(1) - b.index(8)) == 1 for b in printed)

  argv = _launch(tmp_path / "argv", ["rag_jax.commands.search", *args, *QUESTIONS])
  assert argv == one.getvalue()
  lines = "\n".join([QUESTIONS[0], "", *QUESTIONS[1:]]) + "\n"  # a batch per line
  one_by_line = io.StringIO()
  assert search.main(args, stdin=io.StringIO(lines), stdout=one_by_line) == 0
  stdin = _launch(tmp_path / "stdin", ["rag_jax.commands.search", *args], stdin=lines)
  assert stdin == one_by_line.getvalue()
  assert re.findall(r"row (\d+)\)$", stdin, re.M) == re.findall(r"row (\d+)\)$", argv, re.M)
  log = (tmp_path / "stdin" / "logs" / "process-1.log").read_text()
  assert "this process indexes rows [6, 11) of 11 (exact)" in log
  assert "Q: " not in log  # only process 0 prints the results


@pytest.mark.slow
def test_answer_on_two_processes_prints_what_one_process_prints(tmp_path_factory, tmp_path):
  root, *_, models = pref.build_world(tmp_path_factory.mktemp("mp_answer"), ta.TITLES, ta.TEXTS,
                                      ta.QUESTIONS, ta.N_DOCS, ta.MAX_COMBINED)
  args = ["--checkpoint", str(models["token"][1]), "--index_dir", str(root / "kb"),
          "--num_beams", "2", "--max_length", "8"]
  lines = "\n".join(ta.QUESTIONS) + "\n"
  one = io.StringIO()
  assert answer.main(args, stdin=io.StringIO(lines), stdout=one) == 0
  assert one.getvalue().count("A: ") == len(ta.QUESTIONS)
  got = _launch(tmp_path, ["rag_jax.commands.answer", *args], stdin=lines)
  assert got == one.getvalue()
  assert "this process indexes rows [4, 8) of 8 (exact)" in (
      tmp_path / "logs" / "process-1.log").read_text()


def test_tune_index_refuses_several_processes_saying_why(tmp_path):
  run = subprocess.run(
      [sys.executable, "-m", "rag_jax.commands.launch", "--num_processes=2", "--cpu_devices=1",
       f"--log_dir={tmp_path}", "--", sys.executable, "-m", "rag_jax.commands.tune_index",
       "--dir=unused", "--question_encoder=unused", "--questions=unused"],
      cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
      timeout=120)
  assert run.returncode == 1
  assert ("error: rag_jax.commands.tune_index runs on one process (tuning measures one index on "
          "one machine; " in run.stderr)


SHARED = """
import sys, time
from rag_jax import distributed
from rag_jax.commands.common import shared_batches
distributed.initialize()
distributed.WAIT_SLICE_S = 0.5  # process 1 waits out several slices for each batch

def read():  # process 0's input: slow, then broken
  for batch in (["a", "b"], ["c"]):
    time.sleep(2)
    yield batch
  raise OSError(5, "Input/output error", "<stdin>")

got = []
try:
  for batch in shared_batches(read()):
    got.append(batch)
finally:
  print("process", distributed.process_index(), "got", got, flush=True)
  if distributed.is_primary():
    time.sleep(3)  # process 1 logs its error before the launcher stops it
"""


def test_shared_batches_wait_for_process_0_and_stop_with_its_error(tmp_path):
  run = subprocess.run(
      [sys.executable, "-m", "rag_jax.commands.launch", "--num_processes=2", "--cpu_devices=1",
       f"--log_dir={tmp_path}", "--grace_s=30", "--", sys.executable, "-c", SHARED],
      cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
      timeout=120)
  assert run.returncode == 1
  assert "process 0 got [['a', 'b'], ['c']]" in run.stdout
  assert "OSError: [Errno 5] Input/output error: '<stdin>'" in run.stderr
  log = (tmp_path / "process-1.log").read_text()
  assert "process 1 got [['a', 'b'], ['c']]" in log
  assert ("DistributedError: process 0 stopped reading questions, so process 1 of 2 stops: "
          "<stdin>: Input/output error (errno 5)") in log
