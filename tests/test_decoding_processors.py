"""Logits processors against transformers' own processor classes, at every prefix length."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as lp

from rag_jax.decoding import ProcessorConfig, ProcessorParams, apply_processors

VOCAB, MAX_LENGTH, ROWS, EOS = 6, 9, 16, 2


def _transformers_list(n: int, bad, min_length: int, bos, eos_forced):
  """The processors transformers' `_get_logits_processor` builds, in its order."""
  procs = lp.LogitsProcessorList()
  if n:
    procs.append(lp.NoRepeatNGramLogitsProcessor(n))
  if bad:
    procs.append(lp.NoBadWordsLogitsProcessor(bad, EOS))
  if min_length:
    procs.append(lp.MinLengthLogitsProcessor(min_length, EOS))
  if bos is not None:
    procs.append(lp.ForcedBOSTokenLogitsProcessor(bos))
  if eos_forced is not None:
    procs.append(lp.ForcedEOSTokenLogitsProcessor(MAX_LENGTH, eos_forced))
  return procs


@pytest.mark.parametrize("n,bad,min_length,bos,eos_forced", [
    (1, None, 0, None, None),
    (2, [[3], [2], [1, 4], [0, 0, 5]], 4, 0, 2),
    (3, [[4, 4]], 0, None, 2),
    (0, [[5], [3, 3, 3]], 6, 1, None),
])
def test_processors_match_transformers_at_every_length(n, bad, min_length, bos, eos_forced):
  cfg = ProcessorConfig.make((EOS,), n, bad)
  params = ProcessorParams.make(VOCAB, min_length, bos, eos_forced)
  run = jax.jit(functools.partial(apply_processors, max_length=MAX_LENGTH, cfg=cfg,
                                  params=params))
  rng = np.random.default_rng(n)
  # A small alphabet so that n-grams and banned prefixes recur often.
  sequences = rng.integers(0, 4, (ROWS, MAX_LENGTH)).astype(np.int32)
  sequences[:, 0] = EOS  # The decoder start token.
  reference = _transformers_list(n, bad, min_length, bos, eos_forced)
  for cur_len in range(1, MAX_LENGTH):
    scores = rng.normal(size=(ROWS, VOCAB)).astype(np.float32)
    expected = reference(torch.from_numpy(sequences[:, :cur_len].astype(np.int64)),
                         torch.from_numpy(scores.copy())).numpy()
    # Positions past cur_len hold junk: the processors must ignore them.
    got = np.asarray(run(jnp.asarray(scores), jnp.asarray(sequences), jnp.int32(cur_len)))
    np.testing.assert_array_equal(got, expected, err_msg=f"cur_len={cur_len}")


def test_invalid_processor_arguments_are_rejected():
  with pytest.raises(ValueError, match="bad_words_ids"):
    ProcessorConfig.make((EOS,), 0, [[]])
  with pytest.raises(ValueError, match="no_repeat_ngram_size"):
    ProcessorConfig.make((EOS,), -1, None)
  with pytest.raises(ValueError, match="forced_eos_token_id"):
    ProcessorParams.make(VOCAB, 0, None, VOCAB)
  # A banned sequence equal to a single EOS is dropped, as transformers drops it.
  assert ProcessorConfig.make((EOS,), 0, [[EOS], [1, EOS]]).bad_words_ids == ((1, EOS),)
