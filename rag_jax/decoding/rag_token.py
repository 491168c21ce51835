"""RAG-Token decoding: one beam search over the per-step marginal over the retrieved passages.

    p(y_t | x, y_<t) = sum_j p(z_j | x) p(y_t | x, z_j, y_<t)

transformers' `RagTokenForGeneration.generate` semantics: the generator encoder runs once over
the B * n contexts; the decode cache's self-attention buffers are laid out batch -> beam ->
doc (row (b * beams + i) * n + j), its cross-attention K/V and the context mask stay one row
per context (b * n + j), shared by the beams; each step feeds every hypothesis' last token to its n
passages, marginalises with the doc prior (`rag_jax.losses.marginalize`, log_softmax of the doc
scores) and hands the [B * beams, V] marginal log-probs to the generic search, which applies
log_softmax again and the logits processors as transformers' `_beam_search` / `_sample` do.
Beam reordering moves the n rows of a hypothesis together (`gather_beams` with r = n); the
cross-attention K/V are equal across an example's beams and are not reordered.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from rag_jax.decoding.bart import (
    expand_self_attention,
    init_decode_cache,
    reorder_self_attention,
    run_search,
)
from rag_jax.decoding.beam_search import DecodingState, SearchConfig, SearchOutput, SearchParams
from rag_jax.losses import marginalize
from rag_jax.models.bart import BartForConditionalGeneration
from rag_jax.models.rag import RagModel

Array = jax.Array


def generator_of(model: RagModel) -> BartForConditionalGeneration:
  """The RAG generator as a standalone module (its params are params["generator"])."""
  return BartForConditionalGeneration(model.config.generator, model.dtype, model.param_dtype)


def expand_over_beams(tree: Any, batch: int, n_docs: int, beams: int) -> Any:
  """Non-scalar leaves [B * n, ...] (row b * n + j) -> [B * beams * n, ...] (row (b*k+i)*n + j)."""
  def expand(x):
    if x.ndim == 0:
      return x
    y = x.reshape((batch, 1, n_docs) + x.shape[1:])  # [B, 1, n, ...]
    y = jnp.broadcast_to(y, (batch, beams, n_docs) + x.shape[1:])  # [B, k, n, ...]
    return y.reshape((batch * beams * n_docs,) + x.shape[1:])  # [B*k*n, ...]
  return jax.tree.map(expand, tree)


def rag_token_search(model: RagModel, cfg: SearchConfig, params: Any,
                     search_params: SearchParams, context_input_ids: Array,
                     context_attention_mask: Array, doc_scores: Array) -> SearchOutput:
  """RAG-Token generation.

  Args:
    context_input_ids, context_attention_mask: [B * n, S] generator inputs, batch-major.
    doc_scores: [B, n] retrieval scores (their log_softmax is the doc prior).
  Returns SearchOutput over B examples (see beam_search.SearchOutput).
  """
  gen, gparams = generator_of(model), params["generator"]
  batch, n_docs = doc_scores.shape
  beams = cfg.num_beams
  if context_input_ids.shape[0] != batch * n_docs:
    raise ValueError(f"context_input_ids has {context_input_ids.shape[0]} rows; expected "
                     f"batch {batch} x n_docs {n_docs}")
  enc = gen.apply({"params": gparams}, context_input_ids, context_attention_mask,
                  method=gen.encode)  # [B*n, S, d]
  # Self-attention buffers [B*k*n, ...]; the cross K/V stay [B*n, ...], row b*n + j shared by
  # the k beams of question b (decoder rows (b*k + i)*n + j: cross_inner_rows = n).
  cache = expand_self_attention(init_decode_cache(gen, gparams, enc, cfg.max_length),
                                lambda x: expand_over_beams(x, batch, n_docs, beams))
  prior_scores = jnp.repeat(doc_scores, beams, axis=0)  # [B*k, n], row b*k + i

  def tokens_to_logits(state: DecodingState) -> tuple[Array, Any]:
    tokens = jnp.repeat(state.cur_token, n_docs, axis=0)  # [B*k*n, 1]
    logits, variables = gen.apply(
        {"params": gparams, "cache": state.cache}, tokens, None, context_attention_mask,
        decode=True, method=gen.decode, mutable=["cache"],
        cross_inner_rows=n_docs)  # [B*k*n, 1, V]
    return marginalize(logits, prior_scores)[:, -1], variables["cache"]  # [B*k, V]

  return run_search(tokens_to_logits, cache, batch, cfg, search_params, reorder_self_attention)


@functools.lru_cache(maxsize=64)
def compiled_rag_token_search(model: RagModel, cfg: SearchConfig):
  """jit(rag_token_search) for one model definition and static setting (cached)."""
  return jax.jit(functools.partial(rag_token_search, model, cfg))
