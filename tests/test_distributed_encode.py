"""Passage encoding on several processes (rag_jax.commands.launch + encode_passages): the
embeddings equal a one-process encoding row for row, a killed process is named and leaves no
complete manifest and a rerun resumes to the same result, and processes given different inputs
are refused before any work. Each process has 2 fake CPU devices; gloo collectives."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from jax.sharding import Mesh
from transformers import DPRConfig, DPRContextEncoder

from rag_jax.commands.launch import child_env, free_port
from rag_jax.retrieval.backends import load_index
from rag_jax.retrieval.embeddings import EmbeddingStore
from rag_jax.retrieval.encode import EncodeConfig, encode_from_checkpoint
from rag_jax.retrieval.store import PassageStore, build_store_from_file
from tests.test_retrieval_encode import make_passages, save_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONFIG = EncodeConfig(batch_size=8, max_length=64, shard_size=10, length_bucket=16)
FLAGS = ["--split_words=0", "--batch_size=8", "--max_length=64", "--shard_size=10",
         "--length_bucket=16", "--quiet"]
TIMEOUT_S = 240


def write_corpus(path: Path, passages) -> Path:
  path.write_text("".join(f"{p.title}\t{p.text}\n" for p in passages))
  return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A 45-passage corpus, a tiny DPR context encoder, and the one-process embeddings on 2 local
  devices (each process of the jobs below has 2 too: the same batches on the same shapes)."""
  root = tmp_path_factory.mktemp("dist_encode")
  passages = make_passages(45)
  tokenizer = save_tokenizer(root / "encoder", passages)
  torch.manual_seed(0)
  DPRContextEncoder(DPRConfig(
      vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=128, projection_dim=16)).eval(
  ).save_pretrained(root / "encoder")
  corpus = write_corpus(root / "corpus.tsv", passages)
  store = build_store_from_file(corpus, root / "ref_store", split_words=None, progress=False)
  ref = encode_from_checkpoint(store, root / "ref_emb", str(root / "encoder"), config=CONFIG,
                               mesh=Mesh(np.array(jax.devices()[:2]), ("data",)), progress=False)
  return root, corpus, ref.to_array()


def launch(root: Path, corpus: Path, out: Path, logs: Path, processes: int = 2, devices: int = 2,
           command: str = "encode_passages", *extra: str, **env) -> subprocess.CompletedProcess:
  command = [sys.executable, "-m", "rag_jax.commands.launch", f"--num_processes={processes}",
             f"--cpu_devices={devices}", f"--log_dir={logs}", "--grace_s=2", "--",
             sys.executable, "-m", f"rag_jax.commands.{command}", f"--corpus={corpus}",
             f"--encoder={root / 'encoder'}", f"--out={out}", *FLAGS, *extra]
  environ = {**os.environ, "PYTHONPATH": str(ROOT), **env}
  return subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True,
                        timeout=TIMEOUT_S)


def test_two_processes_equal_one_process_row_for_row(tmp_path, setup):
  """build_index on two processes: they split the encoding, process 0 builds the index."""
  root, corpus, ref = setup
  run = launch(root, corpus, tmp_path / "wiki", tmp_path / "logs", 2, 2, "build_index",
               "--index=exact")
  assert run.returncode == 0, run.stdout + run.stderr
  # Only process 0 prints; process 1 logs its share (shards 1 and 3 of 0..4) to its file.
  assert run.stdout.strip().splitlines() == [
      f"built an exact index of 45 passages x 16 in {tmp_path / 'wiki'}/index"]
  log = (tmp_path / "logs" / "process-1.log").read_text()
  assert "process 1 of 2: shards [1, 3] (20 rows) are its share, 2 to encode" in log
  emb = EmbeddingStore(tmp_path / "wiki" / "embeddings")
  assert emb.manifest["complete"] and emb.count == 45
  np.testing.assert_array_equal(emb.to_array(), ref)  # bit for bit
  # The store process 0 built is the corpus, row for row.
  store = PassageStore(tmp_path / "wiki" / "passages")
  assert [store.text(i) for i in range(45)] == [p.text for p in make_passages(45)]
  scores, ids = load_index(tmp_path / "wiki" / "index").search(ref[:6], 5)  # every row's own
  brute = ref[:6] @ ref.T
  np.testing.assert_array_equal(ids, np.argsort(-brute, axis=1, kind="stable")[:, :5])


def test_killed_process_is_named_and_a_rerun_resumes(tmp_path, setup):
  root, corpus, ref = setup
  out = tmp_path / "wiki"
  run = launch(root, corpus, out, tmp_path / "logs",
               RAG_JAX_KILL_AT="encode:shard_written:process1")
  assert run.returncode == 1
  assert run.stderr.strip().splitlines()[-1] == (
      f"error: process 1 of 2 was killed by SIGKILL (its output: {tmp_path / 'logs'}/"
      "process-1.log); the other processes were stopped")
  manifest = json.loads((out / "embeddings" / "manifest.json").read_text())
  assert manifest["complete"] is False  # no manifest names shards that are missing
  with pytest.raises(Exception, match="complete=false"):
    EmbeddingStore(out / "embeddings")
  first = (out / "embeddings" / "shard-00001.npy").stat()  # process 1's shard before the kill

  run = launch(root, corpus, out, tmp_path / "logs")
  assert run.returncode == 0, run.stdout + run.stderr
  again = (out / "embeddings" / "shard-00001.npy").stat()
  assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # kept
  np.testing.assert_array_equal(EmbeddingStore(out / "embeddings").to_array(), ref)


def test_processes_given_different_corpora_are_refused_before_work(tmp_path, setup):
  root, corpus, _ = setup
  other = make_passages(45)
  other[30] = dataclasses.replace(other[30], text=other[30].text + " extra")  # one word more
  corpora = [corpus, write_corpus(tmp_path / "corpus.tsv", other)]
  address = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "rag_jax.commands.encode_passages", f"--corpus={corpora[i]}",
       f"--encoder={root / 'encoder'}", f"--out={tmp_path / 'wiki'}", *FLAGS,
       f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=child_env({**os.environ, "PYTHONPATH": str(ROOT)}, i, 2, address,
                              tmp_path / "logs", cpu_devices=2, gpus=None),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = [p.communicate(timeout=TIMEOUT_S) for p in procs]
  assert [p.returncode for p in procs] == [1, 1]
  line = results[0][1].strip().splitlines()
  assert len(line) == 1 and line[0].startswith(
      "error: process 1 was given another corpus file than process 0 (corpus.tsv, ")
  assert line[0].endswith("every process must read the same corpus file the same way (nothing "
                          "was written)")
  assert (tmp_path / "logs" / "process-1.log").read_text().strip().splitlines()[-1] == line[0]
  assert not (tmp_path / "wiki").exists()


@pytest.mark.slow
def test_four_processes_of_one_device(tmp_path, setup):
  """4 x 1 device: bit for bit a one-process encoding on 1 device (the same batch shapes);
  against the 2-device one, rows differ by float32 rounding only (a device's batch of 8 rows
  instead of 4 changes how XLA's CPU matmul blocks the sums)."""
  root, corpus, ref = setup
  run = launch(root, corpus, tmp_path / "wiki", tmp_path / "logs", processes=4, devices=1)
  assert run.returncode == 0, run.stdout + run.stderr
  got = EmbeddingStore(tmp_path / "wiki" / "embeddings").to_array()
  one = encode_from_checkpoint(PassageStore(tmp_path / "wiki" / "passages"), tmp_path / "one",
                               str(root / "encoder"), config=CONFIG,
                               mesh=Mesh(np.array(jax.devices()[:1]), ("data",)), progress=False)
  np.testing.assert_array_equal(got, one.to_array())
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
  for i, shards in ((1, [1]), (2, [2]), (3, [3])):
    assert f"process {i} of 4: shards {shards} " in (tmp_path / "logs" / f"process-{i}.log"
                                                      ).read_text()


@pytest.mark.slow
def test_a_single_process_command_refuses_several(tmp_path, setup):
  root, corpus, _ = setup
  command = [sys.executable, "-m", "rag_jax.commands.launch", "--num_processes=2",
             "--cpu_devices=1", f"--log_dir={tmp_path / 'logs'}", "--",
             sys.executable, str(ROOT / "train.py"), f"--config={ROOT / 'configs' / 'reversal.py'}",
             f"--workdir={tmp_path / 'run'}"]
  run = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=TIMEOUT_S)
  assert run.returncode == 1
  lines = run.stderr.strip().splitlines()
  assert ("error: train.py's reversal job runs on one process; it was started as process 0 of 2 "
          "(docs/distributed.md lists the stages that run on several)") in lines
  assert lines[-1].startswith("error: process ") and " of 2 exited with status 1" in lines[-1]
  assert not (tmp_path / "run").exists()
