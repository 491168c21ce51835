"""Model-agnostic beam search and greedy search under `lax.while_loop`, transformers v5 rules.

The search never sees a model. As in t5x, the model is a function

    tokens_to_logits(state: DecodingState) -> (logits [N, V], new_cache)

that scores the next token of N = batch x beams running hypotheses from the last token
(`state.cur_token`, [N, 1]) and its cache (any pytree), so the search can be driven by BART, by
RAG-Token's per-step marginal or by a fake LM in tests. The search applies `log_softmax` and the
logits processors itself, as `GenerationMixin._beam_search` does.

Shapes are static: every token buffer is [.., max_length] filled with `pad_token_id`, the
loop index is a traced scalar and each step writes one column; a setting compiles once per
(batch, beams, max_length, processors) and the per-call options (length_penalty, early_stopping,
min_length, forced BOS/EOS) are traced (`SearchParams`).

Beam search follows transformers 5.23 `_beam_search` step for step (same constants, same order of
float operations where it matters):
  * the first beam starts at 0, the others at -1e9 (so step 1 expands one beam only);
  * top K = max(2, 1 + #eos) * num_beams continuations over beams x vocab;
  * a continuation "hits a stopping criterion" when it ends in EOS or reaches max_length; those
    get -1e9 in the running set, the top num_beams non-hits keep running;
  * only hits among the first num_beams of the K candidates may finish, scored
    sum_logprobs / generated_len ** length_penalty (generated_len excludes the decoder start);
    no new finished hypotheses once all num_beams are finished and early_stopping is True, or
    once the early-stop heuristic says no improvement is possible; finished = top num_beams of
    old and new;
  * heuristic: best running score / (cur_len - 1) ** lp, or / (max_length - 1) ** lp when
    early_stopping == "never" and lp > 0, must beat the worst finished score;
  * stop when no batch row can improve, or all finished with early_stopping True, or every
    candidate hit a stopping criterion (max_length).
Greedy search follows `_sample` with do_sample=False: argmax of the processed scores, finished
rows continue with pad, stop when every row has finished.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from rag_jax.decoding.processors import ProcessorConfig, ProcessorParams, apply_processors

Array = jax.Array

NEG = -1.0e9  # transformers v5's "very large negative" score for beams that may not be chosen.
PROMPT_LEN = 1  # The decoder prompt is the decoder start token.


@flax.struct.dataclass
class DecodingState:
  """What `tokens_to_logits` sees. N = batch * beams rows, beam-minor (row b * beams + i).

  cur_len: int32 scalar, tokens in every running sequence (the decoder start included); the
    model writes its keys/values for position cur_len - 1.
  sequences: [N, max_length] int32 running sequences (first cur_len valid).
  cur_token: [N, 1] int32, sequences[:, cur_len - 1].
  cache: the model's cache pytree.
  """

  cur_len: Array
  sequences: Array
  cur_token: Array
  cache: Any


TokensToLogits = Callable[[DecodingState], tuple[Array, Any]]
ReorderCache = Callable[[Any, Array], Any]


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Static search settings (hashable; a compiled search is cached per value).

  pad_token_id fills unused positions (transformers' `output_fill_value` for beam search, the pad
  written after EOS for greedy search).
  """

  num_beams: int
  max_length: int
  decoder_start_token_id: int
  pad_token_id: int
  processors: ProcessorConfig = ProcessorConfig()

  def __post_init__(self):
    if self.num_beams < 1:
      raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
    if self.max_length < PROMPT_LEN + 1:
      raise ValueError(f"max_length must be >= 2 (decoder start + one token), "
                       f"got {self.max_length}")


@flax.struct.dataclass
class SearchParams:
  """Traced search settings.

  length_penalty_pows: [max_length + 1] float32, i ** length_penalty computed in float64 on the
    host (as Python computes transformers' denominators) then rounded to float32.
  stop_when_all_finished: bool scalar, early_stopping is True.
  max_length_heuristic: bool scalar, early_stopping == "never" and length_penalty > 0.
  processors: the traced processor settings.
  """

  length_penalty_pows: Array
  stop_when_all_finished: Array
  max_length_heuristic: Array
  processors: ProcessorParams

  @staticmethod
  def make(max_length: int, length_penalty: float, early_stopping: bool | str,
           processors: ProcessorParams) -> SearchParams:
    if early_stopping not in (True, False, "never"):
      raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    lengths = np.arange(max_length + 1, dtype=np.float64)
    lengths[0] = 1.0  # Length 0 is never used (avoids 0 ** negative).
    pows = np.power(lengths, float(length_penalty)).astype(np.float32)  # [max_length + 1]
    return SearchParams(
        length_penalty_pows=jnp.asarray(pows),
        stop_when_all_finished=jnp.asarray(early_stopping is True),
        max_length_heuristic=jnp.asarray(early_stopping == "never" and length_penalty > 0.0),
        processors=processors)


@flax.struct.dataclass
class SearchOutput:
  """Finished hypotheses, best first. B batch rows, R = num_beams (beam) or 1 (greedy).

  sequences: [B, R, max_length] int32, decoder start first, pad after the end.
  scores: [B, R] float32; beam: sum_logprobs / lengths ** length_penalty (transformers'
    sequences_scores); greedy: sum_logprobs.
  sum_logprobs: [B, R] float32, sum of the processed log-probs of the generated tokens.
  lengths: [B, R] int32, generated tokens (EOS included, decoder start excluded).
  finished: [B, R] bool, False for a placeholder slot that never received a hypothesis.
  """

  sequences: Array
  scores: Array
  sum_logprobs: Array
  lengths: Array
  finished: Array


def gather_beams(cache: Any, rows: Array, static_leaves: Sequence[str] = ()) -> Any:
  """Reorders every cache leaf by beam: rows [N] (flat source row per new row) -> new cache.

  A leaf's leading dimension is N * r (r rows per hypothesis, e.g. r = n_docs for RAG-Token);
  the r rows of hypothesis rows[i] move together. Scalar leaves (a cache index) and leaves whose
  name is in `static_leaves` (equal across the beams of an example, e.g. cross-attention K/V)
  are left alone.
  """
  def reorder(path, x):
    name = getattr(path[-1], "key", None) if path else None
    if x.ndim == 0 or name in static_leaves:
      return x
    per_row = x.shape[0] // rows.shape[0]
    if per_row * rows.shape[0] != x.shape[0]:
      raise ValueError(f"cache leaf {jax.tree_util.keystr(path)} has leading dim {x.shape[0]}, "
                       f"not a multiple of {rows.shape[0]} hypotheses")
    index = (rows[:, None] * per_row + jnp.arange(per_row)[None, :]).reshape(-1)  # [N * r]
    return jnp.take(x, index, axis=0)
  return jax.tree_util.tree_map_with_path(reorder, cache)


def _initial_buffer(batch: int, beams: int, cfg: SearchConfig) -> Array:
  """[batch, beams, max_length] pad-filled, the decoder start token in column 0."""
  buf = jnp.full((batch, beams, cfg.max_length), cfg.pad_token_id, jnp.int32)
  return buf.at[:, :, 0].set(cfg.decoder_start_token_id)


def _step_log_probs(tokens_to_logits: TokensToLogits, flat: Array, cur_len: Array, cache: Any,
                    cfg: SearchConfig, params: SearchParams) -> tuple[Array, Any]:
  """flat [N, L] running sequences -> processed log-probs [N, V] float32, new cache."""
  cur_token = jax.lax.dynamic_slice_in_dim(flat, cur_len - 1, 1, axis=1)  # [N, 1]
  logits, cache = tokens_to_logits(DecodingState(cur_len, flat, cur_token, cache))
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return apply_processors(log_probs, flat, cur_len, cfg.max_length, cfg.processors,
                          params.processors), cache


def _take(x: Array, index: Array) -> Array:
  """x [B, M, ...], index [B, K] -> [B, K, ...] (gather along the beam axis)."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


@flax.struct.dataclass
class _BeamState:
  cur_len: Array  # int32 scalar
  running_sequences: Array  # [B, k, L]
  running_scores: Array  # [B, k] accumulated processed log-probs (-1e9 for dead beams)
  sequences: Array  # [B, k, L] finished hypotheses
  scores: Array  # [B, k] finished scores (length-penalised)
  sum_logprobs: Array  # [B, k]
  lengths: Array  # [B, k]
  finished: Array  # [B, k] bool (transformers' is_sent_finished)
  improvable: Array  # [B, 1] bool (transformers' is_early_stop_heuristic_unsatisfied)
  done: Array  # bool scalar
  cache: Any


def beam_search(tokens_to_logits: TokensToLogits, cache: Any, batch_size: int,
                cfg: SearchConfig, params: SearchParams,
                reorder_cache: ReorderCache = gather_beams) -> SearchOutput:
  """Beam search over `batch_size` examples x cfg.num_beams hypotheses (see module docstring).

  Args:
    tokens_to_logits: the model step; receives batch_size * num_beams rows, beam-minor.
    cache: its initial cache, rows laid out like the hypotheses (the same for every beam).
    reorder_cache: (cache, rows [N]) -> cache with hypothesis i taken from old row rows[i].
  Returns all num_beams finished hypotheses per example, best first.
  """
  b, k, length = batch_size, cfg.num_beams, cfg.max_length
  eos = cfg.processors.eos_token_ids
  top = max(2, 1 + len(eos)) * k  # transformers' beams_to_keep
  pows = params.length_penalty_pows
  running = _initial_buffer(b, k, cfg)
  init = _BeamState(
      cur_len=jnp.array(PROMPT_LEN, jnp.int32), running_sequences=running,
      running_scores=jnp.zeros((b, k), jnp.float32).at[:, 1:].set(NEG), sequences=running,
      scores=jnp.full((b, k), NEG, jnp.float32), sum_logprobs=jnp.full((b, k), NEG, jnp.float32),
      lengths=jnp.zeros((b, k), jnp.int32), finished=jnp.zeros((b, k), bool),
      improvable=jnp.ones((b, 1), bool), done=jnp.array(False), cache=cache)

  def body(s: _BeamState) -> _BeamState:
    t = s.cur_len
    flat = s.running_sequences.reshape(b * k, length)  # [B*k, L]
    log_probs, new_cache = _step_log_probs(tokens_to_logits, flat, t, s.cache, cfg, params)
    vocab = log_probs.shape[-1]
    acc = log_probs.reshape(b, k, vocab) + s.running_scores[:, :, None]  # [B, k, V]
    topk_lp, topk_idx = jax.lax.top_k(acc.reshape(b, k * vocab), top)  # [B, K]
    src_beam, token = topk_idx // vocab, (topk_idx % vocab).astype(jnp.int32)
    column = jnp.arange(length) == t  # [L]
    topk_seqs = jnp.where(column, token[:, :, None], _take(s.running_sequences, src_beam))
    hits = (t + 1 >= length) | jnp.isin(token, jnp.asarray(eos, jnp.int32))  # [B, K]

    # Running set for the next step: the best num_beams that did not stop.
    run_lp = topk_lp + hits.astype(jnp.float32) * NEG
    next_idx = jax.lax.top_k(run_lp, k)[1]  # [B, k]
    running_sequences, running_scores = _take(topk_seqs, next_idx), _take(run_lp, next_idx)
    rows = (jnp.arange(b)[:, None] * k + _take(src_beam, next_idx)).reshape(-1)  # [B*k]

    # Finished set: only hits among the first num_beams candidates may enter.
    gen_len = t + 1 - PROMPT_LEN
    just_finished = hits & (jnp.arange(top) < k)[None, :]
    new_scores = topk_lp / pows[gen_len]
    full = jnp.all(s.finished, axis=-1, keepdims=True) & params.stop_when_all_finished
    new_scores = new_scores + full.astype(jnp.float32) * NEG
    new_scores = new_scores + (~s.improvable).astype(jnp.float32) * NEG
    new_scores = new_scores + (~just_finished).astype(jnp.float32) * NEG
    merged_idx = jax.lax.top_k(jnp.concatenate([s.scores, new_scores], axis=1), k)[1]
    merge = lambda old, new: _take(jnp.concatenate([old, new], axis=1), merged_idx)  # noqa: E731
    sequences = merge(s.sequences, topk_seqs)
    scores = merge(s.scores, new_scores)
    sum_logprobs = merge(s.sum_logprobs, topk_lp)
    lengths = merge(s.lengths, jnp.full((b, top), gen_len, jnp.int32))
    finished = merge(s.finished, just_finished)

    # Early-stop heuristic at the new length, then the loop's stopping condition.
    hyp_len = jnp.where(params.max_length_heuristic, length - PROMPT_LEN, gen_len)
    best_running = running_scores[:, :1] / pows[hyp_len]
    worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), NEG)
    improvable = s.improvable & jnp.any(best_running > worst_finished, axis=-1, keepdims=True)
    all_full = jnp.all(finished) & params.stop_when_all_finished
    done = ~(jnp.any(improvable) & ~all_full & ~jnp.all(hits))
    return _BeamState(t + 1, running_sequences, running_scores, sequences, scores, sum_logprobs,
                      lengths, finished, improvable, done, reorder_cache(new_cache, rows))

  out = jax.lax.while_loop(lambda s: ~s.done & (s.cur_len < length), body, init)
  return SearchOutput(out.sequences, out.scores, out.sum_logprobs, out.lengths, out.finished)


@flax.struct.dataclass
class _GreedyState:
  cur_len: Array  # int32 scalar
  sequences: Array  # [B, L]
  unfinished: Array  # [B] bool
  sum_logprobs: Array  # [B]
  lengths: Array  # [B]
  done: Array  # bool scalar
  cache: Any


def greedy_search(tokens_to_logits: TokensToLogits, cache: Any, batch_size: int,
                  cfg: SearchConfig, params: SearchParams) -> SearchOutput:
  """Greedy decoding (transformers `_sample`, do_sample=False) of batch_size rows.

  The argmax of the processed log-probs equals transformers' argmax of the processed logits (the
  processors only write -inf or force a token). Scores are the sums of the processed
  log-probs of the generated tokens. Returns R = 1 hypothesis per example.
  """
  if cfg.num_beams != 1:
    raise ValueError("greedy_search needs num_beams == 1")
  b, length = batch_size, cfg.max_length
  eos = jnp.asarray(cfg.processors.eos_token_ids, jnp.int32)
  has_eos = bool(cfg.processors.eos_token_ids)
  init = _GreedyState(
      cur_len=jnp.array(PROMPT_LEN, jnp.int32), sequences=_initial_buffer(b, 1, cfg)[:, 0],
      unfinished=jnp.ones((b,), bool), sum_logprobs=jnp.zeros((b,), jnp.float32),
      lengths=jnp.zeros((b,), jnp.int32), done=jnp.array(False), cache=cache)

  def body(s: _GreedyState) -> _GreedyState:
    t = s.cur_len
    log_probs, new_cache = _step_log_probs(tokens_to_logits, s.sequences, t, s.cache, cfg,
                                           params)  # [B, V]
    token = jnp.argmax(log_probs, axis=-1).astype(jnp.int32)  # [B]
    gained = jnp.take_along_axis(log_probs, token[:, None], axis=1)[:, 0]
    if has_eos:  # Finished rows continue with pad (transformers' has_eos_stopping_criteria).
      token = jnp.where(s.unfinished, token, cfg.pad_token_id)
    sequences = jnp.where(jnp.arange(length) == t, token[:, None], s.sequences)
    sum_logprobs = s.sum_logprobs + jnp.where(s.unfinished, gained, 0.0)
    lengths = s.lengths + s.unfinished.astype(jnp.int32)
    unfinished = s.unfinished & ~((t + 1 >= length) | jnp.isin(token, eos))
    return _GreedyState(t + 1, sequences, unfinished, sum_logprobs, lengths,
                        ~jnp.any(unfinished), new_cache)

  out = jax.lax.while_loop(lambda s: ~s.done & (s.cur_len < length), body, init)
  ones = jnp.ones((b, 1), bool)
  return SearchOutput(out.sequences[:, None, :], out.sum_logprobs[:, None],
                      out.sum_logprobs[:, None], out.lengths[:, None], ones)
