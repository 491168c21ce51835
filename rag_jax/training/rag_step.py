"""The RAG training step: marginal likelihood, data parallel with pmap semantics via shard_map.

One step for a global batch of B questions, each with its n retrieved passages:

    batch = {
      "input_ids", "attention_mask":                 [B, Lq]    question (question-encoder ids)
      "context_input_ids", "context_attention_mask": [B, n, L]  generator inputs per passage
      "doc_embeds":                                  [B, n, D]  frozen passage embeddings d(z)
      "labels":                                      [B, T]     targets, fed unshifted as the
                                                                decoder input (the reference)
      "weights":                                     [B]        1 real example, 0 padding
    }

With a fixed retriever (BM25, the paper's "RAG-*-BM25" rows; `fixed_doc_scores=True`) the batch
holds "doc_scores" [B, n] (the retriever's scores, taken as the logits of p(z|x)) in place of
"doc_embeds": the question encoder is not run, so no gradient reaches it.

Training the context encoder too (`context_encoder=`, transformers'
`set_context_encoder_for_training`): the batch holds the retrieved passages as the context
encoder reads them, "doc_input_ids" and "doc_attention_mask" [B, n, Lc] (ENCODER_BATCH_KEYS), in
place of "doc_embeds"; the step re-encodes them with the parameters under params["ctx_encoder"]
(models.rag.embed_documents), so doc_scores = q(x) . d(z) carry gradients into both encoders.
Which passages were retrieved is still decided by the index's (possibly stale) embeddings.

Inside `jax.shard_map` over the mesh's "data" axis each device runs the question encoder,
doc_scores = q(x) . d(z) (the only path by which gradients reach the question encoder; the
passage encoder and index stay frozen, as in the paper, unless the context encoder is trained as
above), the generator on its n passages per
question, and the loss on its shard of the batch. Gradients are then summed across devices with
an explicit `lax.psum` (check_vma=False: the pmap discipline, nothing reduced implicitly), each
device having divided its summed loss by the global number of real examples, so the result is
the gradient of the global mean loss whatever the number of devices; 8 devices and 1 device
give the same step. Dropout keys are fold_in(fold_in(key, step), device index).

The objective is the mean over questions of the per-question loss (the reference's reduce_loss
sums over each GPU's batch and DDP averages over GPUs, i.e. our objective times the per-device
batch size; with AdamW that changes only the effective clipping threshold and epsilon).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rag_jax.models.bert import DPREncoder
from rag_jax.models.rag import CTX_ENCODER, RagModel, embed_documents
from rag_jax.retrieval.device import DeviceRetrieval
from rag_jax.retrieval.refresh import (
  INDEX_STATE_KEYS,
  Refresh,
  rerank_search,
  rolling_refresh,
  staleness_sums,
)
from rag_jax.training.state import TrainState
from rag_jax.utils.errors import UserError

Array = jax.Array
LossFn = Callable[..., Array]  # (seq_logits, doc_scores, target, reduce_loss=False) -> [B]

BATCH_KEYS = ("input_ids", "attention_mask", "context_input_ids", "context_attention_mask",
              "doc_embeds", "labels", "weights")
# A fixed retriever's batch (BM25): its scores instead of the passage embeddings.
SCORE_BATCH_KEYS = tuple("doc_scores" if k == "doc_embeds" else k for k in BATCH_KEYS)
# A trained context encoder's batch: the passages' context-encoder inputs, re-encoded in the step.
ENCODER_BATCH_KEYS = tuple(k for key in BATCH_KEYS for k in (
    ("doc_input_ids", "doc_attention_mask") if key == "doc_embeds" else (key,)))


def batch_keys(fixed_doc_scores: bool, train_context_encoder: bool = False) -> tuple[str, ...]:
  """The train step's batch keys: SCORE_BATCH_KEYS for a fixed retriever, ENCODER_BATCH_KEYS
  when the context encoder is trained, else BATCH_KEYS."""
  if fixed_doc_scores:
    return SCORE_BATCH_KEYS
  return ENCODER_BATCH_KEYS if train_context_encoder else BATCH_KEYS


def without_context_encoder(params: Any) -> Any:
  """The RagModel's own parameters (question encoder, generator) of a train state's tree."""
  return {k: v for k, v in params.items() if k != CTX_ENCODER}


class BatchShapeError(UserError, ValueError):
  """A batch tensor whose shape disagrees with the model config; the message names it."""


def check_batch(batch: dict[str, Any], model: RagModel,
                context_encoder: DPREncoder | None = None) -> None:
  """Raises BatchShapeError naming the first tensor that disagrees with the layout above.

  Looks at shapes only (at trace time under jit), so it costs nothing per step. n must be
  config.n_docs and D the question encoder's width; B and Lq come from input_ids, L from
  context_input_ids, T from labels, Lc from doc_input_ids (with a context encoder), and the
  lengths must fit the position tables (a JAX gather past the end of a table would silently
  clamp, not fail).
  """
  keys = batch_keys("doc_scores" in batch, context_encoder is not None)
  missing = [k for k in keys if k not in batch]
  if missing:
    raise BatchShapeError(f"batch is missing {missing} (expected keys {list(keys)})")
  cfg = model.config
  n, dim = cfg.n_docs, cfg.question_encoder.embedding_dim
  ranks = (("input_ids", 2), ("context_input_ids", 3), ("labels", 2))
  if context_encoder is not None:
    ranks += (("doc_input_ids", 3),)
  for key, rank in ranks:
    if batch[key].ndim != rank:
      raise BatchShapeError(f"batch[{key!r}] has shape {tuple(batch[key].shape)}, expected "
                            f"rank {rank}")
  b, lq = batch["input_ids"].shape
  length, t = batch["context_input_ids"].shape[2], batch["labels"].shape[1]
  expected = {
      "input_ids": ((b, lq), "[B, Lq]"), "attention_mask": ((b, lq), "[B, Lq]"),
      "context_input_ids": ((b, n, length), "[B, n_docs, L]"),
      "context_attention_mask": ((b, n, length), "[B, n_docs, L]"),
      "doc_embeds": ((b, n, dim), "[B, n_docs, retrieval dim]"),
      "labels": ((b, t), "[B, T]"), "weights": ((b,), "[B]"),
  }
  if "doc_scores" in batch:
    del expected["doc_embeds"]
    expected["doc_scores"] = ((b, n), "[B, n_docs]")
  limits = [("input_ids", lq, cfg.question_encoder.max_position_embeddings),
            ("context_input_ids", length, cfg.generator.max_position_embeddings),
            ("labels", t, cfg.generator.max_position_embeddings)]
  if context_encoder is not None:
    del expected["doc_embeds"]
    lc = batch["doc_input_ids"].shape[2]
    expected["doc_input_ids"] = ((b, n, lc), "[B, n_docs, Lc]")
    expected["doc_attention_mask"] = ((b, n, lc), "[B, n_docs, Lc]")
    limits.append(("doc_input_ids", lc, context_encoder.config.max_position_embeddings))
  for key, (want, layout) in expected.items():
    got = tuple(batch[key].shape)
    if got != want:
      raise BatchShapeError(
          f"batch[{key!r}] has shape {got}, expected {layout} = {want} (config: n_docs={n}, "
          f"retrieval dim={dim}; B={b} from input_ids)")
  for key, size, limit in limits:
    if size > limit:
      raise BatchShapeError(f"batch[{key!r}] has length {size} > max_position_embeddings "
                            f"{limit} of the model that reads it")


def _per_example_loss(params: Any, batch: dict[str, Array], key: Array, *, model: RagModel,
                      loss_fn: LossFn, deterministic: bool,
                      context_encoder: DPREncoder | None = None) -> tuple[Array, Array]:
  """(per-question loss [b], doc_scores [b, n]) for one device's shard of the batch."""
  b, n, length = batch["context_input_ids"].shape
  if "doc_scores" in batch:  # A fixed retriever: its scores, no question encoder.
    prior: dict[str, Array] = {"doc_scores": batch["doc_scores"].astype(jnp.float32)}
  elif context_encoder is not None:  # Fresh d(z) of the retrieved passages, differentiable.
    doc_embeds = embed_documents(
        context_encoder, params[CTX_ENCODER], batch["doc_input_ids"],
        batch["doc_attention_mask"], deterministic=deterministic,
        rngs={"dropout": jax.random.fold_in(key, 1)})  # [b, n, D]
    prior = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
             "retrieved_doc_embeds": doc_embeds}
  else:
    prior = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
             "retrieved_doc_embeds": batch["doc_embeds"]}
  out = model.apply(
      {"params": without_context_encoder(params)},
      batch["context_input_ids"].reshape(b * n, length),  # [b, n, L] -> [b*n, L]
      batch["context_attention_mask"].reshape(b * n, length),
      batch["labels"], deterministic=deterministic, rngs={"dropout": key}, **prior)
  return loss_fn(out.logits, out.doc_scores, batch["labels"], reduce_loss=False), out.doc_scores


def _metric_sums(per_example: Array, doc_scores: Array, batch: dict[str, Array],
                 pad_token_id: int) -> dict[str, Array]:
  """Sums over all devices (divide on the host): loss, examples, scored target tokens, and the
  prior probability of the top passage (a retrieval-collapse gauge)."""
  weights = batch["weights"].astype(jnp.float32)
  prior = jax.nn.softmax(doc_scores, axis=-1)  # [b, n]
  target_tokens = (batch["labels"][:, 1:] != pad_token_id).sum(axis=1)  # scored positions
  metrics = {
      "loss_sum": (per_example * weights).sum(),
      "examples": weights.sum(),
      "target_tokens": (target_tokens * weights).sum().astype(jnp.float32),
      "top_doc_prior_sum": (prior.max(axis=-1) * weights).sum(),
  }
  return jax.tree.map(lambda x: jax.lax.psum(x, "data"), metrics)


def _per_device_grads(params: Any, batch: dict[str, Array], step: Array, dropout_key: Array, *,
                      model: RagModel, loss_fn: LossFn, pad_token_id: int, deterministic: bool,
                      context_encoder: DPREncoder | None) -> tuple[Any, dict[str, Array]]:
  """Runs on one device's shard; returns the psum'd gradient and metric sums."""
  device = jax.lax.axis_index("data")
  key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(dropout_key), step),
                           device)
  weights = batch["weights"].astype(jnp.float32)
  total = jnp.maximum(jax.lax.psum(weights.sum(), "data"), 1.0)  # real examples, all devices

  def objective(p):
    per_example, doc_scores = _per_example_loss(p, batch, key, model=model, loss_fn=loss_fn,
                                                deterministic=deterministic,
                                                context_encoder=context_encoder)
    return (per_example * weights).sum() / total, (per_example, doc_scores)

  (_, (per_example, doc_scores)), grads = jax.value_and_grad(objective, has_aux=True)(params)
  if jax.lax.axis_size("data") > 1:  # On one device XLA would copy the whole gradient tree.
    grads = jax.lax.psum(grads, "data")
  metrics = _metric_sums(per_example, doc_scores, batch, pad_token_id)
  metrics["grad_norm"] = optax.global_norm(grads)  # Of the global gradient (already summed).
  return grads, metrics


def _check_context_encoder(model: RagModel, context_encoder: DPREncoder | None,
                           fixed_doc_scores: bool) -> None:
  if context_encoder is None:
    return
  if fixed_doc_scores:
    raise ValueError("a fixed retriever's scores have no context encoder to train")
  q_dim, c_dim = model.config.question_encoder.embedding_dim, context_encoder.config.embedding_dim
  if q_dim != c_dim:
    raise ValueError(f"the context encoder embeds into {c_dim} dims, the question encoder "
                     f"into {q_dim}: their inner product is the retrieval score")


def make_train_step(model: RagModel, mesh: Mesh, loss_fn: LossFn, *,
                    deterministic: bool = False, donate: bool = True,
                    retrieval: DeviceRetrieval | None = None,
                    fixed_doc_scores: bool = False,
                    context_encoder: DPREncoder | None = None,
                    refresh: Refresh | None = None) -> Callable[..., Any]:
  """A jitted `train_step(state, batch) -> (state, metrics)` over `mesh` (axis "data").

  loss_fn: e.g. functools.partial(losses.rag_sequence_nll, epsilon=0.1, pad_token_id=1).
  The state is replicated, the batch sharded on its leading axis (B must divide by the number
  of devices); metrics are sums (loss_sum, examples, target_tokens, top_doc_prior_sum) to divide
  on the host, and grad_norm (the global gradient's norm before clipping; a non-finite value is
  what the trainers stop on). A batch whose shapes disagree with the config raises
  BatchShapeError when the step is traced. The state argument is donated.

  With `retrieval` (rag_jax.retrieval.device) the step is
  `train_step(state, batch, index_arrays)`: the batch holds only the questions (QUESTION_KEYS)
  and the step retrieves with the current question encoder, on the devices, before the loss.
  With `fixed_doc_scores` the batch holds a fixed retriever's "doc_scores" (SCORE_BATCH_KEYS).
  With `context_encoder` (a DPREncoder whose parameters are state.params["ctx_encoder"]) the
  batch holds the passages' context-encoder inputs (ENCODER_BATCH_KEYS; device retrieval
  gathers them from its encoder table) and both encoders are trained.
  With `refresh` (rag_jax.retrieval.refresh; needs `retrieval` and `context_encoder`) the step
  is `train_step(state, batch, arrays, index) -> (state, index, metrics)`: `index` is the
  refreshed index state {"embeddings", "encoded_at"} (donated), `arrays` the rest of the device
  index; a rolling refresh re-encodes its slice with the step's context-encoder parameters
  before retrieving, a rerank rescores its candidates with them; the metrics add the staleness
  of the retrieved rows (staleness_sum, retrieved, staleness_max).
  """
  if fixed_doc_scores and retrieval is not None:
    raise ValueError("a fixed retriever's scores come from the host: no device retrieval")
  _check_context_encoder(model, context_encoder, fixed_doc_scores)
  if refresh is not None:
    if retrieval is None or context_encoder is None:
      raise ValueError("an index refresh needs device retrieval and a trained context encoder")
    refresh.check(retrieval)
  keys = batch_keys(fixed_doc_scores, context_encoder is not None)
  body = functools.partial(_per_device_grads, model=model, loss_fn=loss_fn,
                           pad_token_id=model.config.generator.pad_token_id,
                           deterministic=deterministic, context_encoder=context_encoder)
  sharded = jax.shard_map(body, mesh=mesh,
                          in_specs=(P(), {k: P("data") for k in keys}, P(), P()),
                          out_specs=(P(), P()), check_vma=False)

  def train_step(state: TrainState, batch: dict[str, Array], index: Any = None):
    if retrieval is not None:
      batch = retrieval.complete_batch(model, without_context_encoder(state.params), batch,
                                       index)
    check_batch(batch, model, context_encoder)
    grads, metrics = sharded(state.params, {k: batch[k] for k in keys}, state.step,
                             state.dropout_key)
    return state.apply_gradients(grads=grads), metrics

  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  if retrieval is None:
    return jax.jit(lambda state, batch: train_step(state, batch),
                   in_shardings=(replicated, data), out_shardings=(replicated, replicated),
                   donate_argnums=0 if donate else ())
  if refresh is None:
    return jax.jit(train_step, in_shardings=(replicated, data, retrieval.shardings),
                   out_shardings=(replicated, replicated), donate_argnums=0 if donate else ())

  roll = (rolling_refresh(retrieval, context_encoder, refresh.rows_per_step)
          if refresh.mode == "rolling" else None)

  def refresh_step(state: TrainState, batch: dict[str, Array], arrays: dict[str, Array],
                   index: dict[str, Array]):
    ctx_params = state.params[CTX_ENCODER]
    if roll is not None:
      index = roll(ctx_params, {**arrays, **index}, state.step)
    search = (rerank_search(retrieval, context_encoder, ctx_params, refresh.candidates)
              if refresh.mode == "rerank" else None)
    full = retrieval.complete_batch(model, without_context_encoder(state.params), batch,
                                    {**arrays, **index}, search)
    check_batch(full, model, context_encoder)
    grads, metrics = sharded(state.params, {k: full[k] for k in keys}, state.step,
                             state.dropout_key)
    metrics.update(staleness_sums(state.step, full["doc_encoded_at"], full["weights"]))
    return state.apply_gradients(grads=grads), index, metrics

  rows = retrieval.shardings["tokens"]
  index_shardings = {k: rows for k in INDEX_STATE_KEYS}
  array_shardings = {k: v for k, v in retrieval.shardings.items() if k not in INDEX_STATE_KEYS}
  return jax.jit(refresh_step, in_shardings=(replicated, data, array_shardings, index_shardings),
                 out_shardings=(replicated, index_shardings, replicated),
                 donate_argnums=(0, 3) if donate else ())


def make_eval_step(model: RagModel, mesh: Mesh, loss_fn: LossFn, *,
                   retrieval: DeviceRetrieval | None = None,
                   fixed_doc_scores: bool = False,
                   context_encoder: DPREncoder | None = None,
                   refresh: Refresh | None = None) -> Callable[..., Any]:
  """A jitted `eval_step(params, batch) -> metric sums` (no dropout, no gradient).

  With `retrieval`: `eval_step(params, batch, index_arrays) -> (metric sums, doc_ids [B, n])`,
  the batch holding only the questions, as in make_train_step; `fixed_doc_scores` and
  `context_encoder` as there; a rerank `refresh` retrieves as the train step does.
  """
  _check_context_encoder(model, context_encoder, fixed_doc_scores)
  keys = batch_keys(fixed_doc_scores, context_encoder is not None)

  def body(params, batch):
    check_batch(batch, model, context_encoder)
    per_example, doc_scores = _per_example_loss(params, batch, jax.random.key(0), model=model,
                                                loss_fn=loss_fn, deterministic=True,
                                                context_encoder=context_encoder)
    return _metric_sums(per_example, doc_scores, batch, model.config.generator.pad_token_id)

  sharded = jax.shard_map(body, mesh=mesh, in_specs=(P(), {k: P("data") for k in keys}),
                          out_specs=P(), check_vma=False)
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  if retrieval is None:
    return jax.jit(lambda params, batch: sharded(params, {k: batch[k] for k in keys}),
                   in_shardings=(replicated, data), out_shardings=replicated)

  def eval_step(params, batch, index):
    search = (rerank_search(retrieval, context_encoder, params[CTX_ENCODER], refresh.candidates)
              if refresh is not None and refresh.mode == "rerank" else None)
    full = retrieval.complete_batch(model, without_context_encoder(params), batch, index, search)
    return sharded(params, {k: full[k] for k in keys}), full["doc_ids"]

  return jax.jit(eval_step, in_shardings=(replicated, data, retrieval.shardings),
                 out_shardings=(replicated, replicated))
