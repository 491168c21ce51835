"""RAG's marginal-likelihood losses, with transformers' `get_nll` semantics exactly.

Shapes: B questions, n retrieved passages each, T target positions, V vocabulary.
  seq_logits [B*n, T, V]   generator logits, rows batch-major (row b*n + j = question b, doc j)
  doc_scores [B, n]        q(x) . d(z_j), unnormalised
  target     [B, T]        the target ids as fed to the decoder (transformers RAG feeds labels
                           unshifted as decoder_input_ids); scored shifted left by one

Reference facts reproduced (transformers' modeling_rag.py, RagSequenceForGeneration.get_nll and
RagTokenForGeneration.get_nll):
- targets shift left inside the loss: logit t is scored against target t+1, the last position
  against pad; positions whose shifted target is pad count 0 (log-likelihood and smoothing);
- RAG-Sequence adds the doc prior log p(z_j|x) at the SECOND position (t = 1), so that dropping
  the BOS position never drops the prior; `exclude_bos_score` drops position 0 only when every
  row's shifted target starts with BOS (one batch-wide flag, as the reference computes it);
- label smoothing is (1-eps) * nll + eps/V * smooth, where smooth is minus the logsumexp over
  docs of the summed log-mass over all vocabulary entries (not a per-token uniform target);
- reduce_loss sums over the batch (not a mean).
Everything runs in float32 (float64 if given float64) whatever the logits' dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rag_jax.models.layers import at_least_f32

Array = jax.Array


def shift_targets_left(target: Array, pad_token_id: int) -> Array:
  """[B, T] -> [B, T]: target[:, 1:] then one pad column."""
  return jnp.concatenate([target[:, 1:], jnp.full_like(target[:, :1], pad_token_id)], axis=1)


def _per_doc_logprobs(seq_logits: Array, n_docs: int) -> Array:
  """[B*n, T, V] logits -> [B, n, T, V] float32 log-probabilities."""
  logp = jax.nn.log_softmax(at_least_f32(seq_logits), axis=-1)
  return logp.reshape((-1, n_docs) + logp.shape[1:])  # [B, n, T, V]


def _finish(ll: Array, smooth: Array, epsilon: float, vocab: int, reduce_loss: bool) -> Array:
  """ll, smooth [B] (log-likelihoods) -> loss [B] or scalar."""
  nll, smooth_loss = -ll, -smooth
  if reduce_loss:
    nll, smooth_loss = nll.sum(), smooth_loss.sum()
  return (1.0 - epsilon) * nll + (epsilon / vocab) * smooth_loss


def sequence_token_scores(seq_logits: Array, tgt: Array) -> tuple[Array, Array]:
  """The token terms of RAG-Sequence's loss, row by row, before the prior and the marginal.

  seq_logits [R, T, V] (any columns of the generator's output), tgt [R, T] the shifted targets
  of those columns -> ll [R, T] log p(tgt_t) and smooth [R, T] sum_v log p(v), float32. Split
  out so that a caller can score a sequence's columns in pieces (thorough rescoring stops at the
  longest hypothesis) and finish with `rag_sequence_nll_from_token_scores`.
  """
  logp = jax.nn.log_softmax(at_least_f32(seq_logits), axis=-1)  # [R, T, V]
  ll = jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]  # [R, T]
  return ll, logp.sum(axis=-1)


def rag_sequence_nll_from_token_scores(ll: Array, smooth: Array, doc_scores: Array, tgt: Array,
                                       vocab: int, *, epsilon: float = 0.0,
                                       exclude_bos_score: bool = False,
                                       reduce_loss: bool = False, pad_token_id: int = 1,
                                       bos_token_id: int | None = 0,
                                       use_bos: Array | None = None) -> Array:
  """`rag_sequence_nll` from `sequence_token_scores`' terms: ll, smooth [B*n, T] (row b * n + j),
  doc_scores [B, n], tgt [B, T] shifted targets, vocab V -> [B] (or a scalar with reduce_loss).

  Columns whose shifted target is pad count 0, so their terms may hold anything (a caller that
  stopped early leaves them unset)."""
  batch, n_docs = doc_scores.shape
  ll = ll.reshape(batch, n_docs, -1)  # [B, n, T]
  smooth = smooth.reshape(batch, n_docs, -1)  # [B, n, T]
  length = ll.shape[2]
  doc_logp = jax.nn.log_softmax(at_least_f32(doc_scores), axis=1)  # [B, n]
  if length >= 2:  # The prior joins every vocabulary entry of position 1.
    ll = ll.at[:, :, 1].add(doc_logp)
    smooth = smooth.at[:, :, 1].add(vocab * doc_logp)
  keep = (tgt != pad_token_id)[:, None, :]  # [B, 1, T]
  ll, smooth = jnp.where(keep, ll, 0.0), jnp.where(keep, smooth, 0.0)
  ll_sum = ll.sum(axis=2)  # [B, n]
  if exclude_bos_score and bos_token_id is not None:
    if use_bos is None:
      use_bos = jnp.all(tgt[:, 0] == bos_token_id)
    else:
      if use_bos.shape != (batch,):
        raise ValueError(f"use_bos has shape {use_bos.shape}; expected ({batch},), one flag per "
                         "row of target")
      use_bos = use_bos[:, None]  # [B, 1]
    ll_sum = jnp.where(use_bos, ll[:, :, 1:].sum(axis=2), ll_sum)
  return _finish(jax.nn.logsumexp(ll_sum, axis=1), jax.nn.logsumexp(smooth.sum(axis=2), axis=1),
                 epsilon, vocab, reduce_loss)


def rag_sequence_nll(seq_logits: Array, doc_scores: Array, target: Array, *,
                     epsilon: float = 0.0, exclude_bos_score: bool = False,
                     reduce_loss: bool = False, pad_token_id: int = 1,
                     bos_token_id: int | None = 0, use_bos: Array | None = None) -> Array:
  """RAG-Sequence negative log marginal likelihood, -log sum_j p(z_j|x) prod_t p(y_t|x,z_j,y<t).

  Returns [B] (or a scalar with reduce_loss). See the module docstring for the semantics.
  use_bos [B] bool, with exclude_bos_score: the BOS flag per row instead of the batch-wide one,
  for a caller whose rows come from several of the reference's batches (thorough rescoring
  packs the candidates of several questions into one pass).
  """
  n_docs = doc_scores.shape[1]
  tgt = shift_targets_left(target, pad_token_id)  # [B, T]
  ll, smooth = sequence_token_scores(seq_logits, jnp.repeat(tgt, n_docs, axis=0))  # [B*n, T]
  return rag_sequence_nll_from_token_scores(
      ll, smooth, doc_scores, tgt, seq_logits.shape[-1], epsilon=epsilon,
      exclude_bos_score=exclude_bos_score, reduce_loss=reduce_loss, pad_token_id=pad_token_id,
      bos_token_id=bos_token_id, use_bos=use_bos)


def logsumexp_over_docs(x: Array) -> Array:
  """[B, n, ...] -> [B, ...]: logsumexp over the passages (axis 1), as n elementwise terms.

  jax.nn.logsumexp's value to float rounding (the same max shift, held out of the gradient).
  XLA's CPU backend reduces a short non-minor axis of a large array element by element: for
  RAG-Token's [16, 5, 50,265] marginal per decoding step that took 30 ms against 6 ms for the
  five slices, which fuse into one vectorised loop."""
  parts = [x[:, j] for j in range(x.shape[1])]
  top = functools.reduce(jnp.maximum, parts)
  top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0))
  return jnp.log(functools.reduce(jnp.add, [jnp.exp(p - top) for p in parts])) + top


def marginalize(seq_logits: Array, doc_scores: Array) -> Array:
  """RAG-Token per-step marginal: log sum_j p(z_j|x) p(y_t = v|x,z_j,y<t).

  [B*n, T, V] logits, [B, n] scores -> [B, T, V] float32 log-probabilities.
  """
  n_docs = doc_scores.shape[1]
  logp = _per_doc_logprobs(seq_logits, n_docs)  # [B, n, T, V]
  doc_logp = jax.nn.log_softmax(at_least_f32(doc_scores), axis=1)
  return logsumexp_over_docs(logp + doc_logp[:, :, None, None])


def rag_token_nll(seq_logits: Array, doc_scores: Array, target: Array, *,
                  epsilon: float = 0.0, reduce_loss: bool = False,
                  pad_token_id: int = 1) -> Array:
  """RAG-Token negative log-likelihood, -sum_t log sum_j p(z_j|x) p(y_t|x,z_j,y<t).

  Returns [B] (or a scalar with reduce_loss). No BOS exclusion exists for RAG-Token.
  """
  tgt = shift_targets_left(target, pad_token_id)  # [B, T]
  logp = marginalize(seq_logits, doc_scores)  # [B, T, V]
  ll = jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]  # [B, T]
  smooth = logp.sum(axis=-1)  # [B, T]
  keep = tgt != pad_token_id
  ll, smooth = jnp.where(keep, ll, 0.0), jnp.where(keep, smooth, 0.0)
  return _finish(ll.sum(axis=1), smooth.sum(axis=1), epsilon, logp.shape[-1], reduce_loss)


# config.model_type -> its negative log-likelihood (models.rag.MODEL_TYPES names the classes).
MODEL_TYPE_LOSSES = {"rag_sequence": rag_sequence_nll, "rag_token": rag_token_nll}
