"""Synthetic sequence transduction (reverse a random token string): a generator-only task that
needs no download, used by the interim default job to train and check the BART stack end to end.

Token ids follow BART's convention: 0 <s>, 1 <pad>, 2 </s>; symbols are 3 .. vocab_size-1.
Batches are a pure function of (seed, index), so a resumed run sees exactly the same data.
"""

from __future__ import annotations

import numpy as np

BOS, PAD, EOS = 0, 1, 2
FIRST_SYMBOL = 3


def reversal_batch(seed: int, index: int, batch_size: int, min_length: int, max_length: int,
                   vocab_size: int) -> dict[str, np.ndarray]:
  """One batch of `x -> reversed(x)` pairs, padded to fixed shapes.

  Returns int32 arrays:
    input_ids, attention_mask: [B, max_length + 2]  (<s> x </s>, then pad)
    decoder_input_ids:         [B, max_length + 2]  (</s> <s> y, BART's shift-right of labels)
    labels:                    [B, max_length + 2]  (<s> y </s>, pad where there is no target)
  """
  if not FIRST_SYMBOL < vocab_size:
    raise ValueError(f"vocab_size {vocab_size} leaves no symbols after the 3 special tokens")
  if not 1 <= min_length <= max_length:
    raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
  rng = np.random.default_rng([seed, index])
  width = max_length + 2
  input_ids = np.full((batch_size, width), PAD, np.int32)
  labels = np.full((batch_size, width), PAD, np.int32)
  lengths = rng.integers(min_length, max_length + 1, batch_size)
  for row, n in enumerate(lengths):
    x = rng.integers(FIRST_SYMBOL, vocab_size, n)
    input_ids[row, :n + 2] = np.concatenate([[BOS], x, [EOS]])
    labels[row, :n + 2] = np.concatenate([[BOS], x[::-1], [EOS]])
  decoder_input_ids = np.concatenate(
      [np.full((batch_size, 1), EOS, np.int32), labels[:, :-1]], axis=1)  # shift right
  return {"input_ids": input_ids, "attention_mask": (input_ids != PAD).astype(np.int32),
          "decoder_input_ids": decoder_input_ids, "labels": labels}
