"""BART generation over the generic search: encoder once, cross-attention K/V projected once.

`bart_search(model, cfg, params, search_params, input_ids, attention_mask)` encodes the B inputs
once, builds the decode cache on those B rows (cross-attention K/V projected once per example)
and repeats it over the beams (rows b * beams + i), then runs `beam_search` (num_beams > 1) or
`greedy_search` (num_beams == 1). Beam reordering gathers only the self-attention buffers: the
cross-attention K/V are equal across an example's beams, so gathering them is a no-op that
transformers nevertheless pays for.

The jitted entry is cached per (model definition, SearchConfig), so a setting compiles once per
input shape; the traced SearchParams (length penalty, early stopping, min length, forced ids)
never recompile.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from rag_jax.decoding.beam_search import (
    DecodingState,
    SearchConfig,
    SearchOutput,
    SearchParams,
    beam_search,
    gather_beams,
    greedy_search,
)
from rag_jax.models.bart import BartForConditionalGeneration

Array = jax.Array

# Cache leaves that are equal across an example's beams (never reordered).
CROSS_ATTENTION_LEAVES = ("cross_key", "cross_value")


def reorder_self_attention(cache: Any, rows: Array) -> Any:
  """Beam reorder of a BART decode cache: self-attention buffers only (see module docstring)."""
  return gather_beams(cache, rows, static_leaves=CROSS_ATTENTION_LEAVES)


def repeat_rows(tree: Any, repeats: int) -> Any:
  """Repeats every non-scalar leaf's rows: [R, ...] -> [R * repeats, ...] (row r * repeats + i)."""
  return jax.tree.map(lambda x: x if x.ndim == 0 else jnp.repeat(x, repeats, axis=0), tree)


def init_decode_cache(model: BartForConditionalGeneration, params: Any, encoder_states: Array,
                      max_length: int) -> Any:
  """The decode cache for generating up to max_length tokens (the last is never fed)."""
  _, variables = model.apply({"params": params}, encoder_states, max_length - 1,
                             method=model.init_cache, mutable=["cache"])
  return variables["cache"]


def decode_step_fn(model: BartForConditionalGeneration, params: Any,
                   encoder_attention_mask: Array | None):
  """tokens_to_logits for BART: one cached decoder step, logits [N, V] float32."""
  def tokens_to_logits(state: DecodingState) -> tuple[Array, Any]:
    logits, variables = model.apply(
        {"params": params, "cache": state.cache}, state.cur_token, None, encoder_attention_mask,
        decode=True, method=model.decode, mutable=["cache"])
    return logits[:, -1], variables["cache"]  # [N, V]
  return tokens_to_logits


def run_search(tokens_to_logits, cache: Any, batch: int, cfg: SearchConfig,
               params: SearchParams, reorder=reorder_self_attention) -> SearchOutput:
  """Greedy search for num_beams == 1, beam search otherwise."""
  if cfg.num_beams == 1:
    return greedy_search(tokens_to_logits, cache, batch, cfg, params)
  return beam_search(tokens_to_logits, cache, batch, cfg, params, reorder)


def bart_search(model: BartForConditionalGeneration, cfg: SearchConfig, params: Any,
                search_params: SearchParams, input_ids: Array,
                attention_mask: Array | None) -> SearchOutput:
  """Generation for input_ids [B, S] (mask [B, S] or None = attend everywhere); see module doc."""
  batch = input_ids.shape[0]
  if attention_mask is None:
    attention_mask = jnp.ones_like(input_ids)
  enc = model.apply({"params": params}, input_ids, attention_mask, method=model.encode)
  cache = repeat_rows(init_decode_cache(model, params, enc, cfg.max_length), cfg.num_beams)
  mask = jnp.repeat(attention_mask, cfg.num_beams, axis=0)  # [B*k, S], row b*k + i
  step = decode_step_fn(model, params, mask)
  return run_search(step, cache, batch, cfg, search_params)


@functools.lru_cache(maxsize=64)
def compiled_bart_search(model: BartForConditionalGeneration, cfg: SearchConfig):
  """jit(bart_search) for one model definition and static setting (cached)."""
  return jax.jit(functools.partial(bart_search, model, cfg))
