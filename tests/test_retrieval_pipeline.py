"""Corpus file -> index in one command, questions -> passages, against a torch + numpy oracle."""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertTokenizerFast, DPRConfig, DPRContextEncoder, DPRQuestionEncoder

from rag_jax.commands import search
from rag_jax.retrieval.corpus import iter_passages
from rag_jax.retrieval.encode import EncodeConfig
from rag_jax.retrieval.pipeline import build_from_corpus
from rag_jax.retrieval.retriever import Retriever
from tests.test_retrieval_encode import make_passages, save_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """An own TSV corpus (long documents get split), tiny random DPR encoders, torch references."""
  root = tmp_path_factory.mktemp("pipeline")
  docs = make_passages(12, seed=3)
  corpus = root / "docs.tsv"
  long_doc = " ".join(d.text for d in docs)  # > 100 words: split into several passages
  corpus.write_text("".join(f"{d.title}\t{d.text}\n" for d in docs) + f"Long\t{long_doc}\n")
  passages = list(iter_passages(corpus))
  assert len(passages) > 14
  tokenizer = save_tokenizer(root / "ctx", docs)
  tokenizer.save_pretrained(root / "qry")
  cfg = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
             num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
             initializer_range=0.5)  # large weights: passages get clearly distinct embeddings
  torch.manual_seed(1)
  ctx = DPRContextEncoder(DPRConfig(**cfg)).eval()
  qry = DPRQuestionEncoder(DPRConfig(**cfg)).eval()
  ctx.save_pretrained(root / "ctx")
  qry.save_pretrained(root / "qry")
  questions = ["who was king of rome", "music and art in paris 1815", "river"]
  with torch.no_grad():
    p = tokenizer([x.title for x in passages], [x.text for x in passages], truncation=True,
                  max_length=64, padding=True, return_tensors="pt")
    p_emb = ctx(input_ids=p["input_ids"], attention_mask=p["attention_mask"],
                token_type_ids=torch.zeros_like(p["input_ids"])).pooler_output.numpy()
    q = tokenizer(questions, padding=True, return_tensors="pt")
    q_emb = qry(input_ids=q["input_ids"], attention_mask=q["attention_mask"],
                token_type_ids=torch.zeros_like(q["input_ids"])).pooler_output.numpy()
  scores = q_emb @ p_emb.T  # (Q, N) numpy brute force: the oracle
  return root, corpus, passages, questions, scores


def test_build_index_command_then_search(world, tmp_path):
  root, corpus, passages, questions, ref_scores = world
  out = tmp_path / "built"
  cmd = [sys.executable, "-m", "rag_jax.commands.build_index", "--corpus", str(corpus),
         "--encoder", str(root / "ctx"), "--out", str(out), "--index", "exact", "--batch_size",
         "8", "--max_length", "64", "--shard_size", "8", "--quiet"]
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  assert f"built an exact index of {len(passages)} passages x 32" in res.stdout
  for part in ("passages/store.json", "embeddings/manifest.json", "index/index.json", "build.json"):
    assert (out / part).exists()

  buf = io.StringIO()
  assert search.main(["--dir", str(out), "--question_encoder", str(root / "qry"), "--k", "3",
                      *questions], stdout=buf) == 0
  blocks = buf.getvalue().split("Q: ")[1:]
  assert len(blocks) == len(questions)
  for qi, (q, block) in enumerate(zip(questions, blocks, strict=True)):
    assert block.startswith(q + "\n")
    ranked = re.findall(r"^ +(\d+)\. \[ *(-?[\d.]+)\] (.*) \(id (\d+), row (\d+)\)$", block, re.M)
    ref_rows = np.argsort(-ref_scores[qi], kind="stable")[:3]
    assert [int(r[4]) for r in ranked] == ref_rows.tolist()
    assert [r[2] for r in ranked] == [passages[i].title for i in ref_rows]
    np.testing.assert_allclose([float(r[1]) for r in ranked], ref_scores[qi, ref_rows], atol=1e-4)
    assert passages[ref_rows[0]].text[:40] in block.replace("\n      ", " ")


def test_retriever_equals_oracle_for_exact_and_scann(world, tmp_path):
  root, corpus, passages, questions, ref_scores = world
  out = tmp_path / "built"
  cfg = EncodeConfig(batch_size=8, max_length=64, shard_size=8)
  build_from_corpus(corpus, out, encoder=str(root / "ctx"), index_type="scann",
                    encode_config=cfg, progress=False)
  k = 5
  ref_rows = np.argsort(-ref_scores, axis=1, kind="stable")[:, :k]
  for kind in ("scann", "exact"):
    if kind == "exact":  # rebuild: store and embeddings are reused, only the index changes
      mtime = (out / "embeddings" / "shard-00000.npy").stat().st_mtime_ns
      build_from_corpus(corpus, out, encoder=str(root / "ctx"), index_type="exact",
                        encode_config=cfg, progress=False)
      assert (out / "embeddings" / "shard-00000.npy").stat().st_mtime_ns == mtime
    retriever = Retriever.load(out, str(root / "qry"))
    assert retriever.index.kind == kind
    hits = retriever.retrieve(questions, k)
    for qi in range(len(questions)):
      assert [h.row for h in hits[qi]] == ref_rows[qi].tolist()
      np.testing.assert_allclose([h.score for h in hits[qi]], ref_scores[qi, ref_rows[qi]],
                                 rtol=1e-4, atol=1e-4)
      assert [(h.title, h.text) for h in hits[qi]] == [
          (passages[r].title, passages[r].text) for r in ref_rows[qi]]


def test_rebuild_from_another_corpus_is_refused(world, tmp_path):
  root, corpus, *_ = world
  out = tmp_path / "built"
  cfg = EncodeConfig(batch_size=8, max_length=64, shard_size=8)
  build_from_corpus(corpus, out, encoder=str(root / "ctx"), index_type="exact",
                    encode_config=cfg, progress=False)
  other = tmp_path / "other.tsv"
  other.write_text("T\tsome other text\n")
  with pytest.raises(FileExistsError, match="another corpus"):
    build_from_corpus(other, out, encoder=str(root / "ctx"), encode_config=cfg, progress=False)
  with pytest.raises(ValueError, match="--encoder"):
    build_from_corpus(corpus, tmp_path / "x", progress=False)


def test_search_command_checks_questions(world, tmp_path, capsys):
  """A question encoder with 16 positions (the command's budget is 128 tokens): a long question is
  truncated to 16 tokens with one warning (not NaN for the whole call), an empty one is refused
  in one line, unknown tokens are reported."""
  root, corpus, passages, questions, _ = world
  out = tmp_path / "built"
  build_from_corpus(corpus, out, encoder=str(root / "ctx"), index_type="exact",
                    encode_config=EncodeConfig(batch_size=8, max_length=64, shard_size=8),
                    progress=False)
  tokenizer = BertTokenizerFast.from_pretrained(root / "qry")
  torch.manual_seed(2)
  short = DPRQuestionEncoder(DPRConfig(
      vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, max_position_embeddings=16, initializer_range=0.5)).eval()
  short.save_pretrained(tmp_path / "qry16")
  tokenizer.save_pretrained(tmp_path / "qry16")
  long_q = " ".join([questions[1]] * 6)
  assert len(tokenizer(long_q)["input_ids"]) > 16
  asked = [questions[0], long_q]
  with torch.no_grad():
    p = tokenizer([x.title for x in passages], [x.text for x in passages], truncation=True,
                  max_length=64, padding=True, return_tensors="pt")
    ctx = DPRContextEncoder.from_pretrained(root / "ctx").eval()
    p_emb = ctx(input_ids=p["input_ids"], attention_mask=p["attention_mask"],
                token_type_ids=torch.zeros_like(p["input_ids"])).pooler_output.numpy()
    q = tokenizer(asked, truncation=True, max_length=16, padding=True, return_tensors="pt")
    q_emb = short(input_ids=q["input_ids"], attention_mask=q["attention_mask"],
                  token_type_ids=torch.zeros_like(q["input_ids"])).pooler_output.numpy()
  ref_scores = q_emb @ p_emb.T
  args = ["--dir", str(out), "--question_encoder", str(tmp_path / "qry16"), "--k", "3"]
  capsys.readouterr()
  assert search.main([*args, *asked], stdout=(buf := io.StringIO())) == 0
  err = capsys.readouterr().err
  assert "nan" not in buf.getvalue().lower()
  n_long = len(tokenizer(long_q)["input_ids"])
  assert err == ("warning: 1 of 2 questions exceed the question encoder's 16 tokens and were "
                 f"truncated to them (question(s) 2: {n_long} tokens)\n")
  for qi, block in enumerate(buf.getvalue().split("Q: ")[1:]):
    ranked = re.findall(r"^ +\d+\. \[ *(-?[\d.]+)\] .* \(id \d+, row (\d+)\)$", block, re.M)
    ref_rows = np.argsort(-ref_scores[qi], kind="stable")[:3]
    assert [int(r[1]) for r in ranked] == ref_rows.tolist()
    np.testing.assert_allclose([float(r[0]) for r in ranked], ref_scores[qi, ref_rows],
                               atol=1e-4)

  assert search.main([*args, "", questions[0]], stdout=(buf := io.StringIO())) == 1
  assert buf.getvalue() == ""
  assert capsys.readouterr().err == ("error: question(s) [1] of 2 are empty or blank; ask "
                                     "something (no question was answered)\n")

  unknown = "who was king of Ωmega"
  assert tokenizer(unknown)["input_ids"].count(tokenizer.unk_token_id) == 1
  assert search.main([*args, unknown], stdout=io.StringIO()) == 0
  assert capsys.readouterr().err == (
      "warning: question 1: 1 unknown token(s) for the question encoder's tokenizer ('Ωmega'); "
      "retrieval cannot use them (a word glued to punctuation? separate it with a space)\n")
