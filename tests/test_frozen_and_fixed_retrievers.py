"""The paper's Table 6 switches in the RAG train step: a frozen question encoder (the optimizer's
"frozen" group: every question-encoder parameter bit-identical after steps while the generator
moves) and a fixed BM25 retriever (doc_scores given in the batch: no gradient reaches the question
encoder); and DPR's hard negatives in the retriever's loss, against numpy."""

import jax
import numpy as np
import optax

from rag_jax.parallel import data_mesh, replicate
from rag_jax.training import optimizer
from rag_jax.training.rag_step import make_train_step
from rag_jax.training.retriever_trainer import in_batch_loss
from rag_jax.training.state import create_train_state
from tests.test_rag_train_step import (
  GROUP_LEARNING_RATES,
  LOSS,
  B,
  L,
  N,
  _batch,
  _model,
  _opt_config,
)


def _init(model):
  batch = _batch()
  return jax.jit(model.init)(
      jax.random.key(0), batch["context_input_ids"].reshape(B * N, L),
      batch["context_attention_mask"].reshape(B * N, L), batch["labels"],
      input_ids=batch["input_ids"], retrieved_doc_embeds=batch["doc_embeds"])["params"]


def _max_moves(before, after):
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                       after, before)
  return {k: max(jax.tree.leaves(v)) for k, v in moved.items()}


def _bitwise_equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _run(model, params, tx, batches, fixed_doc_scores=False):
  mesh = data_mesh(jax.devices()[:1])
  state = replicate(create_train_state(model.apply, params, tx,
                                       jax.random.key_data(jax.random.key(1))), mesh)
  step = make_train_step(model, mesh, LOSS, donate=False, fixed_doc_scores=fixed_doc_scores)
  for batch in batches:
    state, _ = step(state, batch)
  return jax.device_get(state.params)


def test_frozen_group_keeps_the_question_encoder_bit_identical():
  model = _model()
  params = jax.device_get(_init(model))
  batches = [_batch(seed=i) for i in range(3)]  # With dropout and weight decay 0.01.
  frozen = _run(model, params, optimizer.make_optimizer(
      _opt_config(), params, group_learning_rates=GROUP_LEARNING_RATES,
      frozen_groups=("question_encoder",)), batches)
  assert _bitwise_equal(frozen["question_encoder"], params["question_encoder"])
  assert _max_moves(params, frozen)["generator"] > 1e-4
  # The same steps without the switch do move it (so the check above can fail).
  trained = _run(model, params, optimizer.make_optimizer(
      _opt_config(), params, group_learning_rates=GROUP_LEARNING_RATES), batches)
  assert _max_moves(params, trained)["question_encoder"] > 1e-6


def test_fixed_doc_scores_put_no_gradient_into_the_question_encoder():
  """With plain SGD (update = -lr * gradient) a BM25-retriever step leaves the question encoder
  bit-identical; the loss it reports is the one computed from the given doc_scores."""
  model = _model()
  params = jax.device_get(_init(model))
  rng = np.random.default_rng(5)
  batch = _batch(seed=1)
  del batch["doc_embeds"]
  batch["doc_scores"] = rng.normal(size=(B, N)).astype(np.float32) * 3
  mesh = data_mesh(jax.devices()[:1])
  state = replicate(create_train_state(model.apply, params, optax.sgd(1.0),
                                       jax.random.key_data(jax.random.key(1))), mesh)
  step = make_train_step(model, mesh, LOSS, deterministic=True, donate=False,
                         fixed_doc_scores=True)
  new_state, metrics = step(state, batch)
  new = jax.device_get(new_state.params)
  assert _bitwise_equal(new["question_encoder"], params["question_encoder"])
  assert _max_moves(params, new)["generator"] > 1e-4
  out = model.apply({"params": params}, batch["context_input_ids"].reshape(B * N, L),
                    batch["context_attention_mask"].reshape(B * N, L), batch["labels"],
                    doc_scores=batch["doc_scores"])
  np.testing.assert_allclose(metrics["loss_sum"], LOSS(out.logits, out.doc_scores,
                                                       batch["labels"]).sum(), rtol=1e-5)


def test_hard_negative_loss_against_numpy():
  rng = np.random.default_rng(0)
  q, d, neg = (rng.normal(size=(4, 8)).astype(np.float32) for _ in range(3))
  pid = np.array([0, 1, 1, 2], np.int32)  # Pairs 1 and 2 share a positive passage.
  nid = np.array([7, 8, 0, 9], np.int32)  # Pair 2's negative is pair 0's positive passage.
  got = float(in_batch_loss(q, d, pid, neg, nid))
  cands, ids = np.concatenate([d, neg]), np.concatenate([pid, nid])
  want = 0.0
  for i in range(4):
    logits = [float(q[i] @ cands[j]) for j in range(8) if j == i or ids[j] != pid[i]]
    target = float(q[i] @ d[i])
    want += -(target - np.log(np.sum(np.exp(logits))))
  np.testing.assert_allclose(got, want / 4, rtol=1e-5)
  # A pair whose own positive comes back as its "negative" does not count it against itself.
  same = float(in_batch_loss(q[:1], d[:1], pid[:1], d[:1], pid[:1]))
  np.testing.assert_allclose(same, 0.0, atol=1e-6)
