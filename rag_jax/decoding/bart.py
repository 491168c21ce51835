"""BART generation over the generic search: encoder once, cross-attention K/V projected once.

`bart_search(model, cfg, params, search_params, input_ids, attention_mask)` encodes the B inputs
once, builds the decode cache on those B rows (cross-attention K/V projected once per example),
repeats its self-attention buffers over the beams (rows b * beams + i), then runs `beam_search`
(num_beams > 1) or `greedy_search` (num_beams == 1). The cross-attention K/V stay one copy per
example, shared by its beams (`grouped_cross_attention` in rag_jax/models/bart.py): each step
reads them once per example instead of once per beam, and beam reordering never touches them
(transformers repeats and gathers them every step).

The jitted entry is cached per (model definition, SearchConfig), so a setting compiles once per
input shape; the traced SearchParams (length penalty, early stopping, min length, forced ids)
never recompile.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
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


def expand_self_attention(cache: Any, expand: Callable[[Array], Array]) -> Any:
  """Applies `expand` (a row expansion over the beams) to the self-attention buffers of a decode
  cache; the cross-attention K/V and the scalar index are left as they are (shared rows)."""
  def leaf(path, x):
    name = getattr(path[-1], "key", None) if path else None
    return x if x.ndim == 0 or name in CROSS_ATTENTION_LEAVES else expand(x)
  return jax.tree_util.tree_map_with_path(leaf, cache)


def set_cache_index(cache: Any, index: Array | int) -> Any:
  """The decode cache with its write position (`cache_index`) set to `index`: the next call
  writes its tokens there and attends to the positions before it (later ones are masked, so
  stale entries need no clearing)."""
  def leaf(path, x):
    name = getattr(path[-1], "key", None) if path else None
    return jnp.asarray(index, x.dtype) if name == "cache_index" else x
  return jax.tree_util.tree_map_with_path(leaf, cache)


def repeat_over_beams(cache: Any, beams: int) -> Any:
  """Self-attention buffers [R, ...] -> [R * beams, ...] (row r * beams + i); cross K/V shared."""
  return expand_self_attention(cache, lambda x: jnp.repeat(x, beams, axis=0))


def init_decode_cache(model: BartForConditionalGeneration, params: Any, encoder_states: Array,
                      max_length: int) -> Any:
  """The decode cache for generating up to max_length tokens (the last is never fed)."""
  _, variables = model.apply({"params": params}, encoder_states, max_length - 1,
                             method=model.init_cache, mutable=["cache"])
  return variables["cache"]


def decode_step_fn(model: BartForConditionalGeneration, params: Any,
                   encoder_attention_mask: Array | None):
  """tokens_to_logits for BART: one cached decoder step, logits [N, V] float32.

  encoder_attention_mask has the cross cache's rows (one per example, shared by its beams)."""
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
  cache = repeat_over_beams(init_decode_cache(model, params, enc, cfg.max_length), cfg.num_beams)
  step = decode_step_fn(model, params, attention_mask)  # [B, S]: shared by each example's beams
  return run_search(step, cache, batch, cfg, search_params)


@functools.lru_cache(maxsize=64)
def compiled_bart_search(model: BartForConditionalGeneration, cfg: SearchConfig):
  """jit(bart_search) for one model definition and static setting (cached)."""
  return jax.jit(functools.partial(bart_search, model, cfg))
