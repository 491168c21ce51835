"""Logits processors of transformers v5 generation, as masks over static-shape token buffers.

The processors transformers builds for the parity set, applied in its order (see
`GenerationMixin._get_logits_processor`):

  1. NoRepeatNGramLogitsProcessor(no_repeat_ngram_size)
  2. NoBadWordsLogitsProcessor(bad_words_ids)       (a single-token [eos] entry is dropped)
  3. MinLengthLogitsProcessor(min_length, eos)      (length counts the decoder start token)
  4. ForcedBOSTokenLogitsProcessor(forced_bos)      (at cur_len == 1: only that token, score 0)
  5. ForcedEOSTokenLogitsProcessor(max_length, forced_eos)  (at cur_len == max_length - 1)

"cur_len" is the number of tokens already in the sequence, decoder start token included. Every
processor only writes -inf (or, when forcing, replaces the row by -inf with a 0 at the forced
token), so each can be written as a `jnp.where` over a [N, V] mask that depends on the prefix.

The static options (which processors exist and the shapes they imply: n-gram size, the banned
sequences) live in `ProcessorConfig`, hashable so that a compiled search is cached per setting;
the options that change no shape (min_length, forced BOS/EOS ids) are traced values in
`ProcessorParams`, so sweeping them re-uses one compiled search.
"""

from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ProcessorConfig:
  """Static processor settings (part of the compilation key).

  eos_token_ids: the EOS ids (MinLength masks them; bad words equal to one [eos] are dropped).
  no_repeat_ngram_size: 0 disables.
  bad_words_ids: banned token sequences; the last token is banned when the prefix before it
    ends the current sequence (length-1 entries are banned everywhere).
  """

  eos_token_ids: tuple[int, ...] = ()
  no_repeat_ngram_size: int = 0
  bad_words_ids: tuple[tuple[int, ...], ...] = ()

  @staticmethod
  def make(eos_token_ids, no_repeat_ngram_size: int | None,
           bad_words_ids) -> ProcessorConfig:
    """Normalises transformers-style arguments (lists, None) and validates them."""
    eos = tuple(int(e) for e in eos_token_ids)
    n = int(no_repeat_ngram_size or 0)
    if n < 0:
      raise ValueError(f"no_repeat_ngram_size must be >= 0, got {n}")
    bad: tuple[tuple[int, ...], ...] = ()
    if bad_words_ids is not None:
      if not isinstance(bad_words_ids, (list, tuple)) or not bad_words_ids or any(
          not isinstance(w, (list, tuple)) or not w for w in bad_words_ids):
        raise ValueError(f"bad_words_ids must be a non-empty list of non-empty lists, "
                         f"got {bad_words_ids!r}")
      words = [tuple(int(t) for t in w) for w in bad_words_ids]
      if any(t < 0 for w in words for t in w):
        raise ValueError(f"bad_words_ids must hold non-negative ids, got {bad_words_ids!r}")
      # transformers drops a banned sequence equal to a single EOS token.
      bad = tuple(w for w in words if not (len(w) == 1 and w[0] in eos))
    return ProcessorConfig(eos, n, bad)


@flax.struct.dataclass
class ProcessorParams:
  """Traced processor settings: changing them does not recompile.

  min_length: int32 scalar; EOS is banned while cur_len < min_length.
  forced_bos_token_id: int32 scalar, -1 for none.
  forced_eos_mask: [V] bool, the forced EOS ids at cur_len == max_length - 1 (all False: none).
  """

  min_length: Array
  forced_bos_token_id: Array
  forced_eos_mask: Array

  @staticmethod
  def make(vocab_size: int, min_length: int | None, forced_bos_token_id: int | None,
           forced_eos_token_id) -> ProcessorParams:
    forced_eos = ([] if forced_eos_token_id is None else
                  [forced_eos_token_id] if isinstance(forced_eos_token_id, int)
                  else list(forced_eos_token_id))
    if any(not 0 <= int(t) < vocab_size for t in forced_eos):
      raise ValueError(f"forced_eos_token_id {forced_eos_token_id} outside the vocabulary")
    if forced_bos_token_id is not None and not 0 <= forced_bos_token_id < vocab_size:
      raise ValueError(f"forced_bos_token_id {forced_bos_token_id} outside the vocabulary")
    if min_length is not None and min_length < 0:
      raise ValueError(f"min_length must be >= 0, got {min_length}")
    mask = np.zeros((vocab_size,), bool)
    mask[[int(t) for t in forced_eos]] = True
    return ProcessorParams(
        min_length=jnp.asarray(min_length or 0, jnp.int32),
        forced_bos_token_id=jnp.asarray(-1 if forced_bos_token_id is None
                                        else forced_bos_token_id, jnp.int32),
        forced_eos_mask=jnp.asarray(mask))


def _ngram_banned(sequences: Array, cur_len: Array, n: int, vocab: int) -> Array:
  """NoRepeatNGram: [N, L] prefixes (first cur_len valid) -> banned [N, V] bool.

  A window sequences[i:i+n] with i + n <= cur_len whose first n-1 tokens equal the last n-1
  tokens of the prefix bans its last token (n == 1: every token seen so far is banned).
  """
  rows, length = sequences.shape
  starts = jnp.arange(length - n + 1)  # [W]
  windows = sequences[:, starts[:, None] + jnp.arange(n)[None, :]]  # [N, W, n]
  valid = starts <= cur_len - n  # [W]
  prefix = jax.lax.dynamic_slice_in_dim(sequences, jnp.maximum(cur_len - (n - 1), 0), n - 1,
                                        axis=1)  # [N, n-1]
  matches = jnp.all(windows[..., :-1] == prefix[:, None, :], axis=-1) & valid[None, :]  # [N, W]
  # Non-matching windows scatter into a spare column past the vocabulary, as transformers does.
  target = jnp.where(matches, jnp.minimum(windows[..., -1], vocab), vocab)  # [N, W]
  banned = jnp.zeros((rows, vocab + 1), bool).at[jnp.arange(rows)[:, None], target].set(True)
  return banned[:, :vocab] & (cur_len >= n)


def _bad_words_banned(sequences: Array, cur_len: Array, words: tuple[tuple[int, ...], ...],
                      vocab: int) -> Array:
  """NoBadWords: [N, L] prefixes -> banned [N, V] bool (static loop over the banned words)."""
  banned = jnp.zeros((sequences.shape[0], vocab), bool)
  for word in words:
    if word[-1] >= vocab:
      raise ValueError(f"bad word {word} has an id outside the vocabulary ({vocab})")
    prefix_len = len(word) - 1
    if prefix_len == 0:
      hit = jnp.ones((sequences.shape[0],), bool)
    else:
      tail = jax.lax.dynamic_slice_in_dim(sequences, jnp.maximum(cur_len - prefix_len, 0),
                                          prefix_len, axis=1)  # [N, prefix_len]
      hit = jnp.all(tail == jnp.asarray(word[:-1], sequences.dtype), axis=1) & (
          cur_len >= prefix_len)
    banned = banned.at[:, word[-1]].set(banned[:, word[-1]] | hit)
  return banned


def apply_processors(scores: Array, sequences: Array, cur_len: Array, max_length: int,
                     cfg: ProcessorConfig, params: ProcessorParams) -> Array:
  """Processes next-token log-probs of N hypotheses as transformers' processor list does.

  Args:
    scores: [N, V] float32 log-probabilities of the next token.
    sequences: [N, L] token buffers; the first cur_len tokens are the prefixes.
    cur_len: int32 scalar, tokens already in each prefix (decoder start included).
    max_length: the generation's max_length (forced EOS at cur_len == max_length - 1).
  Returns [N, V] float32.
  """
  vocab = scores.shape[-1]
  neg_inf = jnp.array(-jnp.inf, scores.dtype)
  if cfg.no_repeat_ngram_size > 0:
    scores = jnp.where(_ngram_banned(sequences, cur_len, cfg.no_repeat_ngram_size, vocab),
                       neg_inf, scores)
  if cfg.bad_words_ids:
    scores = jnp.where(_bad_words_banned(sequences, cur_len, cfg.bad_words_ids, vocab),
                       neg_inf, scores)
  token = jnp.arange(vocab)
  if cfg.eos_token_ids:
    eos = jnp.isin(token, jnp.asarray(cfg.eos_token_ids))  # [V]
    scores = jnp.where(eos[None, :] & (cur_len < params.min_length), neg_inf, scores)
  bos = params.forced_bos_token_id
  forced_bos_row = jnp.where(token == bos, 0.0, neg_inf).astype(scores.dtype)  # [V]
  scores = jnp.where((bos >= 0) & (cur_len == 1), forced_bos_row[None, :], scores)
  forced_eos_row = jnp.where(params.forced_eos_mask, 0.0, neg_inf).astype(scores.dtype)
  force_eos = jnp.any(params.forced_eos_mask) & (cur_len == max_length - 1)
  return jnp.where(force_eos, forced_eos_row[None, :], scores)
