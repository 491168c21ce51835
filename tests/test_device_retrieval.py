"""Retrieval inside the jitted train step against the host path (retrieval_feed.py: exact index
search, stored embeddings, ContextAssembler rows, itself checked against transformers'
RagRetriever and numpy): the same passage ids and scores (ties included), the same generator
rows (passages that fill the row, questions truncated to nothing), the same losses and
parameters after several optimizer steps, on 1 and 8 devices, for RAG-Sequence and RAG-Token."""

import dataclasses
import functools
import logging
import re

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh

from rag_jax import losses
from rag_jax.data import contexts
from rag_jax.data.passage_table import (
  EncoderTable,
  PassageTable,
  PassageTableMismatch,
  build_passage_table,
  load_or_build,
  question_parts,
)
from rag_jax.data.qa import TokenizedQA
from rag_jax.models import presets
from rag_jax.models.bert import DPREncoder
from rag_jax.models.rag import RagModel
from rag_jax.parallel import global_batch, replicate
from rag_jax.retrieval import device as device_retrieval
from rag_jax.retrieval.device import DeviceRetrieval
from rag_jax.retrieval.exact import ExactConfig, ExactIndex
from rag_jax.training import optimizer
from rag_jax.training.rag_step import make_train_step
from rag_jax.training.retrieval_feed import RetrievalFeed
from rag_jax.training.state import create_train_state
from tests import torch_reference as ref
from tests.test_contexts import QUESTIONS, TEXTS, TITLES

N_PASSAGES, DIM, N_DOCS, B, LQ, T, L = 40, 16, 3, 8, 12, 6, 48


class Store:
  """The PassageStore interface the host feed and the table builder read."""

  def __init__(self, titles, texts):
    self.titles, self.texts = titles, texts

  def title(self, row):
    return self.titles[row]

  def text(self, row):
    return self.texts[row]

  def titles_and_texts(self, start, stop):
    return self.titles[start:stop], self.texts[start:stop]


@pytest.fixture(scope="module")
def world():
  return make_world()


def make_world() -> dict:
  """The tiny RAG model, its parameters, questions and a passage database with exact ties (also
  built by each process of tests/multiprocess_retrieval_worker.py)."""
  titles = [TITLES[i % len(TITLES)] for i in range(N_PASSAGES)]
  texts = [TEXTS[(3 * i) % len(TEXTS)] + ("" if i % 4 == 1 else f" fact {i}.")
           for i in range(N_PASSAGES)]
  questions = [QUESTIONS[i % len(QUESTIONS)] + ("" if i % 3 else f" about {i}")
               for i in range(B)]
  q_tok, g_tok = ref.train_tokenizers(texts + titles + questions, question_vocab=120,
                                      generator_vocab=220)
  cfg = presets.rag_config(
      "tiny", n_docs=N_DOCS, max_combined_length=L,
      question_encoder=dict(vocab_size=len(q_tok), projection_dim=DIM, num_hidden_layers=1),
      generator=dict(vocab_size=len(g_tok), encoder_layers=1, decoder_layers=1, dropout=0.1))
  model = RagModel(cfg)
  rng = np.random.default_rng(0)
  enc = q_tok(questions, padding="max_length", max_length=LQ, truncation=True)
  labels = rng.integers(3, len(g_tok), (B, T)).astype(np.int32)
  labels[:, 0], labels[:, -1] = 0, 2
  data = TokenizedQA(np.asarray(enc["input_ids"], np.int32),
                     np.asarray(enc["attention_mask"], np.int32), labels)
  params = jax.jit(model.init)(
      jax.random.key(0), np.zeros((B * N_DOCS, L), np.int32), np.ones((B * N_DOCS, L), np.int32),
      labels, input_ids=data.input_ids,
      retrieved_doc_embeds=np.zeros((B, N_DOCS, DIM), np.float32))["params"]
  # Every embedding twice (rows 2i and 2i + 1): each retrieval meets exact ties.
  base = rng.standard_normal((N_PASSAGES // 2, DIM)).astype(np.float32)
  db = np.repeat(base, 2, axis=0)
  return dict(model=model, params=params, data=data, q_tok=q_tok, g_tok=g_tok, db=db,
              store=Store(titles, texts), questions=contexts.decode_questions(q_tok,
                                                                              data.input_ids))


def make_context_encoder(world: dict):
  """A context encoder of the world's question-encoder shape, and its initial parameters."""
  config = dataclasses.replace(world["model"].config.question_encoder,
                               architecture="DPRContextEncoder")
  ctx_model = DPREncoder(config)
  ids = np.ones((2, 8), np.int32)
  return ctx_model, jax.jit(ctx_model.init)(jax.random.key(7), ids, ids)["params"]


def mesh_of(n):
  return Mesh(np.array(jax.devices()[:n]), ("data",))


def setup_retrieval(world, mesh, db=None):
  """(host feed, passage table, device retrieval, the questions' batch) on `mesh`."""
  index = ExactIndex.build(world["db"] if db is None else db, ExactConfig(chunk_size=8),
                           mesh=mesh)
  feed = RetrievalFeed(world["model"], index, world["store"], world["q_tok"], world["g_tok"],
                       N_DOCS)
  table = build_passage_table(world["store"].titles_and_texts, N_PASSAGES, feed.assembler,
                              block=7, progress=False)
  retrieval = DeviceRetrieval.build(index, table, N_DOCS)
  q_ids, q_len = question_parts(feed.assembler, world["questions"])
  question_batch = {"input_ids": world["data"].input_ids,
                    "attention_mask": world["data"].attention_mask, "question_tokens": q_ids,
                    "question_lengths": q_len, "labels": world["data"].labels,
                    "weights": np.ones(B, np.float32)}
  return feed, table, retrieval, question_batch


@pytest.mark.parametrize("devices", [1, 8])
def test_retrieved_ids_scores_and_rows_equal_the_host_path(world, devices):
  mesh = mesh_of(devices)
  feed, table, retrieval, question_batch = setup_retrieval(world, mesh)
  rows = np.arange(B)
  host, host_rows = feed.batch(world["params"], world["data"], rows)
  _, host_scores = feed.retrieve(world["params"], world["data"].input_ids,
                                 world["data"].attention_mask)
  complete = jax.jit(lambda p, b, a: retrieval.complete_batch(world["model"], p, b, a))
  dev = jax.device_get(complete(world["params"], question_batch, retrieval.arrays))

  np.testing.assert_array_equal(dev["doc_ids"], host_rows)
  np.testing.assert_allclose(dev["retrieval_scores"], host_scores, rtol=1e-6, atol=1e-6)
  for key in ("context_input_ids", "context_attention_mask", "doc_embeds"):
    np.testing.assert_array_equal(dev[key], host[key], err_msg=key)
  # Ties: every passage has a twin; the smaller row wins (the host path's rule) ...
  pairs = host_rows // 2
  assert (np.diff(pairs, axis=1) == 0).any() and (host_rows[:, -1] % 2 == 0).any()
  # ... and the edge cases occurred: rows filled to the last position, and rows whose passage
  # left no room for any of the question.
  assert (dev["context_attention_mask"].all(axis=-1)).any()
  no_room = table.lengths[host_rows] >= table.spec.width
  assert no_room.any() and (~no_room).any()


def loss_fn(kind: str):
  """The RAG loss of `kind` with label smoothing, as the train-step tests use it."""
  return functools.partial(
      {"rag_sequence": losses.rag_sequence_nll, "rag_token": losses.rag_token_nll}[kind],
      epsilon=0.1, pad_token_id=1)


def train_state(world):
  """A fresh AdamW train state of the world's parameters (on the host)."""
  opt = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=0, num_train_steps=10, lr_end=0.0, lr_power=1.0,
      weight_decay=0.01, max_grad_norm=1.0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-4))
  tx = optimizer.make_optimizer(opt, world["params"])
  return create_train_state(world["model"].apply, world["params"], tx,
                            jax.random.key_data(jax.random.key(1)))


@pytest.mark.parametrize("kind", ["rag_sequence", "rag_token"])
@pytest.mark.parametrize("devices", [1, 8])
def test_train_steps_equal_the_host_path(world, kind, devices):
  mesh = mesh_of(devices)
  model = world["model"]
  feed, _, retrieval, question_batch = setup_retrieval(world, mesh)
  host_step = make_train_step(model, mesh, loss_fn(kind))
  device_step = make_train_step(model, mesh, loss_fn(kind), retrieval=retrieval)
  host_state = replicate(train_state(world), mesh)
  dev_state = replicate(train_state(world), mesh)
  for _ in range(3):
    batch, _ = feed.batch(host_state.params, world["data"], np.arange(B))
    host_state, host_metrics = host_step(host_state, global_batch(batch, mesh))
    dev_state, dev_metrics = device_step(dev_state, global_batch(question_batch, mesh),
                                         retrieval.arrays)
    np.testing.assert_allclose(float(dev_metrics["loss_sum"]), float(host_metrics["loss_sum"]),
                               rtol=1e-6)
  for a, b in zip(jax.tree.leaves(jax.device_get(dev_state.params)),
                  jax.tree.leaves(jax.device_get(host_state.params)), strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  assert device_step._cache_size() == 1


def test_hot_swap_replaces_the_index_without_recompiling(world):
  mesh = mesh_of(8)
  model = world["model"]
  _, _, retrieval, question_batch = setup_retrieval(world, mesh)
  step = jax.jit(lambda p, b, a: retrieval.complete_batch(model, p, b, a))
  before = jax.device_get(step(world["params"], question_batch, retrieval.arrays))
  other = np.random.default_rng(5).standard_normal(world["db"].shape).astype(np.float32)
  feed2, table2, _, _ = setup_retrieval(world, mesh, db=other)
  retrieval.swap(feed2.index, table2)
  after = jax.device_get(step(world["params"], question_batch, retrieval.arrays))
  host2, rows2 = feed2.batch(world["params"], world["data"], np.arange(B))
  np.testing.assert_array_equal(after["doc_ids"], rows2)
  np.testing.assert_array_equal(after["context_input_ids"], host2["context_input_ids"])
  assert not np.array_equal(after["doc_ids"], before["doc_ids"])
  assert step._cache_size() == 1


def test_passage_table_round_trip_and_mismatch_is_named(world, tmp_path):
  feed, table, _, _ = setup_retrieval(world, mesh_of(1))
  table.save(tmp_path / "table")
  loaded = PassageTable.load(tmp_path / "table")
  np.testing.assert_array_equal(loaded.tokens, table.tokens)
  np.testing.assert_array_equal(loaded.lengths, table.lengths)
  assert loaded.spec == table.spec and loaded.tokens.dtype == np.uint16
  loaded.check(feed.assembler, count=N_PASSAGES)
  # Another tokenizer: a different vocabulary size is refused by name.
  _, other_tok = ref.train_tokenizers(TEXTS + QUESTIONS, generator_vocab=180)
  other = contexts.ContextAssembler(other_tok, feed.assembler.fmt)
  with pytest.raises(PassageTableMismatch, match="vocab_size|tokenizer_sha"):
    loaded.check(other)
  # Another max_combined_length: the width no longer matches.
  longer = contexts.ContextAssembler(
      world["g_tok"], contexts.ContextFormat(max_combined_length=L + 8))
  with pytest.raises(PassageTableMismatch, match="width"):
    loaded.check(longer)
  with pytest.raises(PassageTableMismatch, match="index has"):
    loaded.check(feed.assembler, count=N_PASSAGES + 1)
  with pytest.raises(FileNotFoundError, match="no passage table"):
    PassageTable.load(tmp_path / "missing")


def test_load_or_build_keeps_one_table_per_tokenizer(world, tmp_path):
  feed, table, _, _ = setup_retrieval(world, mesh_of(1))
  store = world["store"]
  built = load_or_build(tmp_path, store.titles_and_texts, N_PASSAGES, feed.assembler,
                        progress=False)
  np.testing.assert_array_equal(built.tokens, table.tokens)
  (path,) = tmp_path.iterdir()
  stamp = (path / "tokens.npy").stat().st_mtime_ns
  again = load_or_build(tmp_path, store.titles_and_texts, N_PASSAGES, feed.assembler,
                        progress=False)
  np.testing.assert_array_equal(again.tokens, table.tokens)
  assert (path / "tokens.npy").stat().st_mtime_ns == stamp  # loaded, not rebuilt
  # A second model's tokenizer gets a table of its own beside the first, which stays.
  _, other_tok = ref.train_tokenizers(TEXTS + QUESTIONS + TITLES, generator_vocab=180)
  other = contexts.ContextAssembler(other_tok, feed.assembler.fmt)
  load_or_build(tmp_path, store.titles_and_texts, N_PASSAGES, other, progress=False)
  assert len(list(tmp_path.iterdir())) == 2
  assert (path / "tokens.npy").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("kind", ["passage", "encoder"])
def test_a_damaged_table_cache_is_named_with_its_file(world, tmp_path, kind):
  """A table directory whose table.json is not JSON or whose arrays are cut short (a disk that
  filled, a copy that stopped) is refused naming the file, not with a JSONDecodeError or numpy's
  'mmap length is greater than file size'."""
  if kind == "encoder":
    table = EncoderTable(np.arange(24, dtype=np.uint16).reshape(6, 4),
                         np.full(6, 4, np.int32), 0, "sha", 4)
  else:
    _, table, _, _ = setup_retrieval(world, mesh_of(1))
  cls = type(table)
  for name, damage in (("table.json", b"{"), ("tokens.npy", None), ("lengths.npy", None)):
    path = tmp_path / f"{name}-table"
    table.save(path)
    cls.load(path)  # whole, it loads
    target = path / name
    target.write_bytes(damage if damage is not None else target.read_bytes()[:100])
    with pytest.raises(PassageTableMismatch, match=re.escape(str(target))):
      cls.load(path)


def test_setup_chooses_the_device_where_the_index_fits_and_says_when_not(world, tmp_path,
                                                                         caplog):
  mesh = mesh_of(8)
  feed, table, _, _ = setup_retrieval(world, mesh)
  args = (feed.index, world["store"], feed.assembler, tmp_path / "tables", N_DOCS, mesh)
  chosen = device_retrieval.setup("auto", *args, progress=False)
  assert isinstance(chosen, DeviceRetrieval) and chosen.count == N_PASSAGES
  np.testing.assert_array_equal(
      jax.device_get(chosen.arrays["tokens"])[:N_PASSAGES], table.tokens)
  assert device_retrieval.setup("host", *args) is None
  with caplog.at_level(logging.WARNING):
    assert device_retrieval.setup("auto", *args, memory_fraction=1e-12) is None
  fallbacks = [r for r in caplog.records if "host path" in r.getMessage()]
  assert len(fallbacks) == 1 and "exceeds" in fallbacks[0].getMessage()
  with pytest.raises(ValueError, match="config.retrieval='device' but the index"):
    device_retrieval.setup("device", *args, memory_fraction=1e-12)
  with pytest.raises(ValueError, match="config.retrieval='gpu'"):
    device_retrieval.setup("gpu", *args)
