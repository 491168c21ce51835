"""Training the context encoder with the generator: the train step's gradients with respect to
every context-encoder and question-encoder parameter against transformers' RAG with
`set_context_encoder_for_training` (its own forward re-encodes the retrieved docs with the
context encoder, then its loss and autograd), on 1 and 8 devices; and, with device retrieval,
doc scores from a fresh encoding of the retrieved rows, against a brute-force recomputation.

The gradient comparison runs in float64 on both sides: some encoder gradients are zero in exact
arithmetic (the context encoder's projection bias moves every doc score of a question by the
same amount, and p(z|x) is a softmax), and in float32 they hold rounding noise of the size of
the terms that cancel, about 1e-7 of the largest gradient on either side."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from rag_jax import losses
from rag_jax.checkpoints import load_pretrained, to_hf_state_dict
from rag_jax.data.passage_table import (
  build_encoder_table,
  encoder_rows,
  load_or_build_encoder_table,
)
from rag_jax.models.rag import embed_documents
from rag_jax.parallel import data_mesh, global_batch, replicate
from rag_jax.retrieval.device import DeviceRetrieval
from rag_jax.training.rag_step import (
  BatchShapeError,
  make_train_step,
  without_context_encoder,
)
from rag_jax.training.state import create_train_state
from tests import test_device_retrieval
from tests import torch_reference as ref

B, N, LQ, L, LC = 8, 3, 7, 12, 10
# SGD scaled by 2^20: new = p - 2^20 g, so (p - new) / 2^20 is the step's gradient to within
# float32 rounding of g itself (an unscaled step would lose it in the rounding of p).
SCALE = 2.0**20


class StandInRetriever:
  """What transformers' RagModel.forward reads from a RagRetriever with a context-encoder
  tokenizer set (retrieval_rag.RagRetriever.__call__'s output): fixed retrieved passages."""

  def __init__(self, ctx, ctx_mask, doc_ids, doc_mask):
    self.out = {"context_input_ids": ref.to_torch(ctx),
                "context_attention_mask": ref.to_torch(ctx_mask),
                "retrieved_doc_embeds": torch.zeros(B, N, 8, dtype=torch.float64),  # Unread.
                "doc_ids": torch.zeros(B, N, dtype=torch.long),
                "tokenized_doc_ids": ref.to_torch(doc_ids),
                "tokenized_doc_attention_mask": ref.to_torch(doc_mask)}

  def __call__(self, input_ids, question_hidden_states, prefix=None, n_docs=None,
               return_tensors=None):
    return self.out


def _inputs(seed=4):
  rng = np.random.default_rng(seed)
  q_ids, q_mask = ref.padded_batch(rng, B, LQ, 80, pad=0, right={1: 2, 5: 3})
  ctx, ctx_mask = ref.padded_batch(rng, B * N, L, 64, pad=1, right={0: 3, 4: 5, 10: 2})
  # The context tokenizer pads on the right with [PAD] = 0; rows of several lengths.
  doc_ids, doc_mask = ref.padded_batch(rng, B * N, LC, 80, pad=0,
                                       right={i: i % 6 for i in range(B * N)})
  labels = rng.integers(3, 64, (B, 6))
  labels[:, 0], labels[:, -1] = 0, 2
  labels[1, 3:], labels[6, 2:] = [2, 1, 1], [2, 1, 1, 1]  # Padded targets.
  return q_ids, q_mask, ctx, ctx_mask, doc_ids, doc_mask, labels


@pytest.fixture(scope="module", params=["sequence", "token"])
def reference(request, tmp_path_factory):
  """transformers' gradients (loss summed over the batch, divided by B: the step's mean)."""
  kind, tmp = request.param, tmp_path_factory.mktemp(request.param)
  torch_model, path = ref.rag(tmp, kind, n_docs=N, projection_dim=8, init_std=0.2)
  torch_ctx, ctx_path = ref.dpr(tmp, "context", projection_dim=8, seed=1, init_std=0.2)
  torch_model, torch_ctx = torch_model.double(), torch_ctx.double()
  q_ids, q_mask, ctx, ctx_mask, doc_ids, doc_mask, labels = _inputs()
  torch_model.config.label_smoothing = 0.1
  torch_model.set_retriever(StandInRetriever(ctx, ctx_mask, doc_ids, doc_mask))
  torch_model.set_context_encoder_for_training(torch_ctx)
  out = torch_model(input_ids=ref.to_torch(q_ids), attention_mask=ref.to_torch(q_mask),
                    labels=ref.to_torch(labels), decoder_input_ids=ref.to_torch(labels),
                    reduce_loss=True, n_docs=N)
  (out.loss / B).backward()
  grads = {f"rag.{k}": p.grad.double().numpy() for k, p in torch_ctx.named_parameters()}
  grads.update({k: p.grad.double().numpy() for k, p in torch_model.named_parameters()
                if k.startswith("rag.question_encoder") and p.grad is not None})
  batch = {"input_ids": q_ids, "attention_mask": q_mask,
           "context_input_ids": ctx.reshape(B, N, L), "context_attention_mask":
           ctx_mask.reshape(B, N, L), "doc_input_ids": doc_ids.reshape(B, N, LC),
           "doc_attention_mask": doc_mask.reshape(B, N, LC), "labels": labels,
           "weights": np.ones(B, np.float32)}
  batch = {k: v.astype(np.float32 if k == "weights" else np.int32) for k, v in batch.items()}
  return dict(kind=kind, path=path, ctx_path=ctx_path, grads=grads, batch=batch,
              loss=out.loss.item() / B)


@pytest.mark.parametrize("devices", [1, 8])
def test_encoder_gradients_equal_transformers(reference, devices):
  with jax.enable_x64(True):
    _compare_gradients(reference, devices)


def _compare_gradients(reference, devices):
  f64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
  model, params = load_pretrained(reference["path"], **f64)
  ctx_model, ctx_params = load_pretrained(reference["ctx_path"], **f64)
  params = {**params, "ctx_encoder": ctx_params}
  fn = losses.rag_sequence_nll if reference["kind"] == "sequence" else losses.rag_token_nll
  loss_fn = functools.partial(fn, epsilon=0.1, pad_token_id=1)
  mesh = data_mesh(jax.devices()[:devices])
  state = replicate(create_train_state(model.apply, params, optax.sgd(SCALE),
                                       jax.random.key_data(jax.random.key(0))), mesh)
  step = make_train_step(model, mesh, loss_fn, deterministic=True, donate=False,
                         context_encoder=ctx_model)
  new_state, metrics = step(state, reference["batch"])
  np.testing.assert_allclose(metrics["loss_sum"] / metrics["examples"], reference["loss"],
                             rtol=1e-9)
  grads = jax.tree.map(lambda a, b: (np.asarray(a, np.float64) - np.asarray(b, np.float64))
                       / SCALE, jax.device_get(state.params), jax.device_get(new_state.params))
  ours = to_hf_state_dict(model, without_context_encoder(grads), dtype=np.float64)
  ours.update({f"rag.{k}": v for k, v in
               to_hf_state_dict(ctx_model, grads["ctx_encoder"], dtype=np.float64).items()})
  theirs = reference["grads"]
  assert any(k.startswith("rag.ctx_encoder.") for k in theirs)
  assert any(k.startswith("rag.question_encoder.") for k in theirs)
  # Each tensor relative to its largest entry, floored at 1e-3 of the largest gradient of the
  # encoders (for the gradients that are zero in exact arithmetic).
  floor = 1e-3 * max(np.abs(g).max() for g in theirs.values())
  for name, g in theirs.items():
    scale = max(np.abs(g).max(), floor)
    assert np.abs(ours[name] - g).max() <= 1e-6 * scale, name
  # The context encoder got a gradient: it would not if the step used stale embeddings.
  assert max(np.abs(g).max() for k, g in theirs.items() if k.startswith("rag.ctx_")) > 1e-4


def test_a_batch_without_the_context_encoder_inputs_is_named(reference):
  model, params = load_pretrained(reference["path"])
  ctx_model, ctx_params = load_pretrained(reference["ctx_path"])
  mesh = data_mesh(jax.devices()[:1])
  state = create_train_state(model.apply, {**params, "ctx_encoder": ctx_params}, optax.sgd(1.0),
                             jax.random.key_data(jax.random.key(0)))
  step = make_train_step(model, mesh, losses.rag_sequence_nll, donate=False,
                         context_encoder=ctx_model)
  batch = dict(reference["batch"])
  batch["doc_attention_mask"] = batch["doc_attention_mask"][:, :, :-1]
  with pytest.raises(BatchShapeError, match=r"doc_attention_mask'\] has shape \(8, 3, 9\)"):
    step(state, batch)
  del batch["doc_input_ids"]
  with pytest.raises(BatchShapeError, match=r"missing \['doc_input_ids'\]"):
    step(state, batch)


@pytest.fixture(scope="module")
def world():
  return test_device_retrieval.make_world()


@pytest.mark.parametrize("devices", [pytest.param(1, marks=pytest.mark.slow), 8])
def test_device_retrieval_scores_use_the_fresh_encoding(world, devices):
  """The index is encoded by the initial context encoder; the step retrieves with it (stale) and
  scores the retrieved passages with the current context encoder (fresh). Each step's loss and
  prior equal a recomputation from the host's encoder-table rows of the passages it retrieved,
  encoded by the context encoder's own forward; after one step the fresh scores differ from the
  index's (the check can fail)."""
  mesh = test_device_retrieval.mesh_of(devices)
  model, loss = world["model"], test_device_retrieval.loss_fn("rag_sequence")
  ctx_model, ctx_params = test_device_retrieval.make_context_encoder(world)
  enc_table = build_encoder_table(world["store"].titles_and_texts,
                                  test_device_retrieval.N_PASSAGES, world["q_tok"],
                                  max_length=24, block=7, progress=False)
  assert len(set(enc_table.lengths.tolist())) > 3  # Rows of several lengths (padding masked).
  db = np.asarray(embed_documents(ctx_model, ctx_params,
                                  *encoder_rows(enc_table.tokens, enc_table.lengths)))
  feed, table, _, question_batch = test_device_retrieval.setup_retrieval(world, mesh, db=db)
  retrieval = DeviceRetrieval.build(feed.index, table, N, enc_table)
  assert set(retrieval.arrays) == {"embeddings", "tokens", "lengths", "doc_tokens",
                                   "doc_lengths"}
  state = replicate(create_train_state(
      model.apply, {**world["params"], "ctx_encoder": ctx_params}, optax.adam(1e-2),
      jax.random.key_data(jax.random.key(1))), mesh)
  step = make_train_step(model, mesh, loss, deterministic=True, donate=False,
                         retrieval=retrieval, context_encoder=ctx_model)
  complete = jax.jit(lambda p, b, a: retrieval.complete_batch(model, p, b, a))
  batch = global_batch(question_batch, mesh)
  labels = question_batch["labels"]
  for i in range(2):
    params = jax.device_get(state.params)
    state, metrics = step(state, batch, retrieval.arrays)
    rag_params = without_context_encoder(params)
    got = jax.device_get(complete(rag_params, question_batch, retrieval.arrays))
    # Retrieval: the exact top-n of q(x) . (the index's stale embeddings).
    q = np.asarray(model.apply({"params": rag_params}, question_batch["input_ids"],
                               question_batch["attention_mask"], method=model.embed_questions))
    top = -np.sort(-(q @ db.T), axis=1)[:, :N]
    np.testing.assert_allclose(got["retrieval_scores"], top, rtol=1e-5, atol=1e-5)
    # The retrieved rows, re-encoded on the host from the encoder table by the context encoder.
    rows = got["doc_ids"].reshape(-1)
    ids = enc_table.tokens[rows].astype(np.int32)
    mask = (np.arange(enc_table.width) < enc_table.lengths[rows][:, None]).astype(np.int32)
    fresh = np.asarray(ctx_model.apply({"params": params["ctx_encoder"]}, ids, mask)
                       .pooler_output).reshape(B, N, -1)
    scores = np.einsum("bd,bnd->bn", q, fresh)
    out = model.apply({"params": rag_params}, got["context_input_ids"].reshape(B * N, -1),
                      got["context_attention_mask"].reshape(B * N, -1), labels,
                      doc_scores=scores)
    np.testing.assert_allclose(metrics["loss_sum"], loss(out.logits, out.doc_scores, labels).sum(),
                               rtol=1e-5)
    prior = np.exp(scores - scores.max(1, keepdims=True))
    np.testing.assert_allclose(metrics["top_doc_prior_sum"],
                               (prior.max(1) / prior.sum(1)).sum(), rtol=1e-5)
    stale = got["doc_embeds"]
    if i == 0:  # The index was encoded by these parameters: fresh and stale agree.
      np.testing.assert_allclose(fresh, stale, atol=1e-5, rtol=0)
    else:  # One step later they do not.
      assert np.abs(fresh - stale).max() > 1e-3
      assert np.abs(scores - np.einsum("bd,bnd->bn", q, stale)).max() > 1e-3


def test_encoder_table_rows_are_the_context_tokenizers(world, tmp_path):
  """Each row is the context tokenizer's pair encoding of (title, text) as transformers'
  RagRetriever makes it for the context encoder (truncation, padding="longest"); the table is
  saved once per (tokenizer, max_length) and loaded back unchanged."""
  store, tok = world["store"], world["q_tok"]
  count = test_device_retrieval.N_PASSAGES
  titles, texts = store.titles_and_texts(0, count)
  for max_length in (24, 9):  # 9: truncation, longest first.
    expected = tok(titles, texts, truncation=True, max_length=max_length, padding="longest")
    table = load_or_build_encoder_table(tmp_path, store.titles_and_texts, count, tok,
                                        max_length, progress=False)
    ids, mask = encoder_rows(table.tokens, table.lengths)
    np.testing.assert_array_equal(ids, expected["input_ids"])
    np.testing.assert_array_equal(mask, expected["attention_mask"])
    again = load_or_build_encoder_table(tmp_path, None, count, tok, max_length)
    np.testing.assert_array_equal(again.tokens, table.tokens)
  assert len(list(tmp_path.glob("encoder-*/table.json"))) == 2
