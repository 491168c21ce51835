"""RAG-Sequence decoding, batched: "thorough" (transformers' rule) and "fast" (the paper's).

Both start the same way: one beam search per passage for the whole batch in one call (B * n
"examples" of the generic search, doc prior ignored), returning k = num_beams hypotheses each
(num_return_sequences = num_beams, as `RagSequenceForGeneration.generate` asks of the
generator; greedy when num_beams == 1), so C = n * k candidates per question, passage-major
(candidate j * k + i is beam i of passage j, transformers' order).

thorough (transformers' `RagSequenceForGeneration.generate` without its Python loop):
  dedup (exact token match, first occurrence kept, when do_deduplication), then a
  teacher-forced pass of every distinct candidate under every passage (encoder states and their
  cross-attention K/V computed once per passage, shared by the candidates) and
  `rag_sequence_nll` with exclude_bos_score=True and the config's label_smoothing; the score is
  -loss and the top num_return_sequences are returned. Each question's distinct candidates are
  packed together and scored `rescore_candidates` per question per pass, so duplicates cost
  (almost) nothing, as in the reference, where they are dropped before its forward pass. The BOS
  exclusion flag is computed per question over its C candidates, as the reference computes it
  over its per-question batch (duplicates do not change it: they equal a kept candidate).
fast (paper section 2.5; ParlAI's `fast_generation`; no transformers equivalent):
  score(y) = logsumexp over passages j whose beam holds y of [log p(z_j|x) + s_j(y)], where
  s_j(y) is the search's sum of processed log-probs of y under passage j (no length penalty);
  a hypothesis missing from passage j's beam gets p(y|x,z_j) = 0. No extra forward pass.

Context masks: transformers 5.x calls `generator.generate(context_input_ids,
attention_mask=None)` and, for an encoder-decoder, v5 no longer infers the mask from pad tokens,
so its per-passage beams attend to the contexts' padding (transformers 4.x inferred the mask).
`mask_beam_contexts=True` (our default) masks padding in the beams; False reproduces 5.23
exactly (the encoder then runs twice, unmasked for the beams and masked for rescoring, as the
reference's two passes do). The two agree when contexts carry no padding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from rag_jax.decoding.bart import (
    decode_step_fn,
    expand_self_attention,
    init_decode_cache,
    repeat_over_beams,
    run_search,
    set_cache_index,
)
from rag_jax.decoding.beam_search import SearchConfig, SearchParams
from rag_jax.decoding.rag_token import generator_of
from rag_jax.losses import (
    rag_sequence_nll_from_token_scores,
    sequence_token_scores,
    shift_targets_left,
)
from rag_jax.models.rag import RagModel

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RagSequenceConfig:
  """Static settings of RAG-Sequence decoding (hashable; part of the compilation key).

  search: the per-passage search (num_beams = k).
  decoding: "thorough" or "fast".
  rescore_candidates: distinct candidates G of each question per teacher-forced rescoring pass
    (None: C / 4 rounded up); a pass holds B * G * n * max_length * V logits, and the passes
    stop once the question with the most distinct candidates is done (ceil(max / G) passes).
    Larger passes keep an accelerator busier; smaller ones waste fewer slots.
  rescore_positions: decoder positions W teacher-forced per call within a pass (None: a quarter
    of the max_length - 1 scored positions, rounded up); a pass stops after the call holding
    its longest hypothesis's last token, so smaller W wastes fewer positions on short answers
    and larger W makes fewer, bigger calls. Its logits are B * G * n * W * V.
  """

  search: SearchConfig
  num_return_sequences: int = 1
  decoding: str = "thorough"
  do_deduplication: bool = True
  mask_beam_contexts: bool = True
  label_smoothing: float = 0.0
  bos_token_id: int | None = 0
  rescore_candidates: int | None = None
  rescore_positions: int | None = None

  def __post_init__(self):
    if self.decoding not in ("thorough", "fast"):
      raise ValueError(f"decoding must be 'thorough' or 'fast', got {self.decoding!r}")
    for name in ("rescore_candidates", "rescore_positions"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"{name} must be None or >= 1, got {value}")


@flax.struct.dataclass
class RagSequenceOutput:
  """sequences [B, R, L] (pad after the end), scores [B, R] (thorough: -loss, i.e. the log
  marginal likelihood with the label-smoothing mix; fast: the merged log-probability),
  lengths [B, R] generated tokens, candidate_lengths [B, C] of every per-passage hypothesis,
  num_candidates [B] the distinct hypotheses (all C without do_deduplication), which thorough
  decoding rescores."""

  sequences: Array
  scores: Array
  lengths: Array
  candidate_lengths: Array
  num_candidates: Array


def _equal_pairs(cands: Array) -> Array:
  """[B, C, L] candidates -> [B, C, C] bool, candidate c equals candidate c' token for token."""
  return jnp.all(cands[:, :, None, :] == cands[:, None, :, :], axis=-1)


def _earlier(c: int) -> Array:
  """[C, C] bool, entry (c, c') is c' < c."""
  return jnp.arange(c)[None, :] < jnp.arange(c)[:, None]


def _rescore(model: RagModel, rcfg: RagSequenceConfig, gparams: Any, cands: Array,
             enc: Array, mask: Array, doc_scores: Array, skip: Array) -> Array:
  """Thorough rescoring. cands [B, C, L], enc [B * n, S, d], mask [B * n, S], doc_scores [B, n],
  skip [B, C] (duplicates) -> loss [B, C] under transformers' get_nll (exclude_bos_score=True);
  skipped candidates' entries are unspecified (the caller masks them).

  Each question's kept candidates are packed to its front (original order) and scored G =
  `rescore_candidates` per question per pass, by a loop that stops once every question's kept
  candidates are done: the work follows the distinct hypotheses, as the reference's
  deduplication makes it. A pass teacher-forces the decoder over B * G * n rows (candidate slot
  i of question b under passage j is row (b * G + i) * n + j) against the passages'
  cross-attention K/V, projected once for all passes and shared by the G slots
  (`grouped_cross_attention`). Within a pass the decoder runs `rescore_positions` columns per
  call through its self-attention cache and stops after the last column whose target is a
  token of one of the pass's hypotheses, so short answers cost what their length needs (the
  reference crops its labels to the longest hypothesis). Every array keeps the question axis
  leading, so a batch split over devices by questions stays split.
  """
  gen = generator_of(model)
  gcfg, pad = model.config.generator, model.config.generator.pad_token_id
  batch, c, length = cands.shape
  n_docs = doc_scores.shape[1]
  group = min(rcfg.rescore_candidates or -(-c // 4), c)
  rows = batch * group * n_docs  # decoder rows of a pass
  passes_max = -(-c // group)
  # Column t is scored against token t + 1, so the last column never counts: L - 1 columns,
  # `width` per decoder call, the last call's start clamped so it ends at column L - 2.
  columns = max(length - 1, 1)
  width = min(rcfg.rescore_positions or -(-columns // 4), columns)
  order = jnp.argsort(skip, axis=1, stable=True)  # [B, C]: kept first, in their order
  order = jnp.pad(order, ((0, 0), (0, passes_max * group - c)))  # [B, P*G]; pads score cand 0
  kept = jnp.sum(~skip, axis=1)  # [B]
  passes = (jnp.max(kept) + group - 1) // group
  # transformers' BOS rule is one flag per rescoring call, i.e. per question over its C
  # candidates (duplicates equal a kept candidate, so they do not change it).
  use_bos = (jnp.all(cands[:, :, 1] == rcfg.bos_token_id, axis=1)
             if rcfg.bos_token_id is not None and length >= 2
             else jnp.zeros((batch,), bool))  # [B]
  # Cross K/V of the B * n passages, projected once; the self-attention buffers are replaced
  # by zeroed ones of B * G * n rows, written from position 0 again in every pass.
  cache = expand_self_attention(
      init_decode_cache(gen, gparams, enc, columns + 1),
      lambda x: jnp.zeros((rows,) + x.shape[1:], x.dtype))
  doc_scores_rows = jnp.repeat(doc_scores, group, axis=0)  # [B*G, n], row b * G + i
  use_bos_rows = jnp.repeat(use_bos, group)  # [B*G]

  def one_pass(p, packed):
    slots = jax.lax.dynamic_slice_in_dim(order, p * group, group, axis=1)  # [B, G]
    target = jnp.take_along_axis(cands, slots[:, :, None], axis=1)  # [B, G, L]
    tgt = shift_targets_left(target.reshape(-1, length), pad)  # [B*G, L]
    # The pass's columns: up to the last scored token of its real (not padding) slots.
    real = (p * group + jnp.arange(group))[None, :] < kept[:, None]  # [B, G]
    scored = (tgt != pad) & real.reshape(-1, 1)  # [B*G, L]
    needed = jnp.max(jnp.where(scored, jnp.arange(length) + 1, 0))
    dec = jnp.repeat(target.reshape(-1, length), n_docs, axis=0)  # [B*G*n, L]
    tgt_rows = jnp.repeat(tgt, n_docs, axis=0)  # [B*G*n, L], row (b * G + i) * n + j

    def one_call(k, carry):
      call_cache, ll, smooth = carry
      begin = jnp.minimum(k * width, columns - width)
      logits, variables = gen.apply(
          {"params": gparams, "cache": set_cache_index(call_cache, begin)},
          jax.lax.dynamic_slice_in_dim(dec, begin, width, axis=1), None, mask, decode=True,
          method=gen.decode, mutable=["cache"], cross_inner_rows=n_docs)  # [B*G*n, W, V]
      ll_k, smooth_k = sequence_token_scores(
          logits, jax.lax.dynamic_slice_in_dim(tgt_rows, begin, width, axis=1))  # [B*G*n, W]
      return (variables["cache"], jax.lax.dynamic_update_slice_in_dim(ll, ll_k, begin, axis=1),
              jax.lax.dynamic_update_slice_in_dim(smooth, smooth_k, begin, axis=1))

    zeros = jnp.zeros((rows, length), jnp.float32)
    _, ll, smooth = jax.lax.fori_loop(0, (needed + width - 1) // width, one_call,
                                      (cache, zeros, zeros))
    loss = rag_sequence_nll_from_token_scores(
        ll, smooth, doc_scores_rows, tgt, gcfg.vocab_size, epsilon=rcfg.label_smoothing,
        exclude_bos_score=True, pad_token_id=pad, bos_token_id=rcfg.bos_token_id,
        use_bos=use_bos_rows)  # [B*G]
    return jax.lax.dynamic_update_slice_in_dim(packed, loss.reshape(batch, group), p * group,
                                               axis=1)

  packed = jax.lax.fori_loop(0, passes, one_pass,
                             jnp.zeros((batch, passes_max * group), jnp.float32))
  question = jnp.arange(batch)[:, None]  # [B, 1]
  return jnp.zeros((batch, c), jnp.float32).at[question, order[:, :c]].set(packed[:, :c])


def _fast_scores(sum_logprobs: Array, finished: Array, equal: Array, doc_scores: Array,
                 beams: int) -> Array:
  """Fast decoding. sum_logprobs, finished [B, C]; equal [B, C, C]; doc_scores [B, n]
  -> merged log p(y|x) [B, C] (-inf for placeholders)."""
  c = sum_logprobs.shape[1]
  prior = jax.nn.log_softmax(doc_scores.astype(jnp.float32), axis=1)  # [B, n]
  passage = jnp.arange(c) // beams  # [C]
  contrib = sum_logprobs + prior[:, passage]  # [B, C]
  same_passage = passage[:, None] == passage[None, :]  # [C, C]
  # A sequence counts once per passage (its first, best, occurrence in that passage's beam).
  repeat_in_passage = jnp.any(equal & (same_passage & _earlier(c))[None], axis=-1)  # [B, C]
  contrib = jnp.where(finished & ~repeat_in_passage, contrib, -jnp.inf)
  return jax.nn.logsumexp(jnp.where(equal, contrib[:, None, :], -jnp.inf), axis=-1)  # [B, C]


def rag_sequence_search(model: RagModel, rcfg: RagSequenceConfig, params: Any,
                        search_params: SearchParams, context_input_ids: Array,
                        context_attention_mask: Array, doc_scores: Array) -> RagSequenceOutput:
  """RAG-Sequence generation. context_* [B * n, S] batch-major, doc_scores [B, n]."""
  gen, gparams, cfg = generator_of(model), params["generator"], rcfg.search
  batch, n_docs = doc_scores.shape
  if context_input_ids.shape[0] != batch * n_docs:
    raise ValueError(f"context_input_ids has {context_input_ids.shape[0]} rows; expected "
                     f"batch {batch} x n_docs {n_docs}")
  beam_mask = (context_attention_mask if rcfg.mask_beam_contexts
               else jnp.ones_like(context_attention_mask))
  enc = gen.apply({"params": gparams}, context_input_ids, beam_mask,
                  method=gen.encode)  # [B*n, S, d]
  cache = repeat_over_beams(init_decode_cache(gen, gparams, enc, cfg.max_length), cfg.num_beams)
  step = decode_step_fn(gen, gparams, beam_mask)  # [B*n, S]: shared by each passage's beams
  out = run_search(step, cache, batch * n_docs, cfg, search_params)  # B*n examples
  k = out.sequences.shape[1]  # num_beams (beam search) or 1 (greedy)
  c = n_docs * k
  cands = out.sequences.reshape(batch, c, cfg.max_length)  # [B, C, L], candidate j*k + i
  lengths = out.lengths.reshape(batch, c)  # [B, C]
  equal = _equal_pairs(cands)  # [B, C, C]
  duplicate = jnp.any(equal & _earlier(c)[None], axis=-1)  # [B, C]
  skip = duplicate if rcfg.do_deduplication else jnp.zeros_like(duplicate)

  if rcfg.decoding == "fast":
    scores = _fast_scores(out.sum_logprobs.reshape(batch, c), out.finished.reshape(batch, c),
                          equal, doc_scores, k)
    scores = jnp.where(duplicate, -jnp.inf, scores)
  else:
    if not rcfg.mask_beam_contexts:  # The reference rescores with the context mask.
      enc = gen.apply({"params": gparams}, context_input_ids, context_attention_mask,
                      method=gen.encode)
    scores = -_rescore(model, rcfg, gparams, cands, enc, context_attention_mask, doc_scores,
                       skip)
    scores = jnp.where(skip, -jnp.inf, scores)
  top_scores, top = jax.lax.top_k(scores, rcfg.num_return_sequences)  # [B, R]
  return RagSequenceOutput(
      sequences=jnp.take_along_axis(cands, top[:, :, None], axis=1),
      scores=top_scores, lengths=jnp.take_along_axis(lengths, top, axis=1),
      candidate_lengths=lengths, num_candidates=jnp.sum(~skip, axis=1))


@functools.lru_cache(maxsize=64)
def compiled_rag_sequence_search(model: RagModel, rcfg: RagSequenceConfig):
  """jit(rag_sequence_search) for one model definition and static setting (cached)."""
  return jax.jit(functools.partial(rag_sequence_search, model, rcfg))
