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
from rag_jax.parallel import data_mesh, replicate
from rag_jax.training.rag_step import (
  BatchShapeError,
  make_train_step,
  without_context_encoder,
)
from rag_jax.training.state import create_train_state
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
