"""The reversal experiment (configs/reversal.py): a tiny BART learns to reverse random token
strings, the generator stack alone (rag_jax.training.seq2seq), with no download.

Token ids follow BART's convention: 0 <s>, 1 <pad>, 2 </s>; symbols are 3 .. vocab_size-1.
Batches are a pure function of (seed, index), so a resumed run sees exactly the same data.
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from rag_jax.models import presets
from rag_jax.models.bart import BartForConditionalGeneration
from rag_jax.training import config_check, seq2seq

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


def build_model(config: ml_collections.ConfigDict) -> BartForConditionalGeneration:
  """A BART preset sized for the task's vocabulary and lengths."""
  gen = presets.generator_config(config.model.preset, vocab_size=config.task.vocab_size,
                                 dropout=config.model.dropout,
                                 max_position_embeddings=max(64, config.task.max_length + 2))
  return BartForConditionalGeneration(gen, dtype=jnp.dtype(config.model.dtype))


def reversal_task(config: ml_collections.ConfigDict) -> seq2seq.Seq2SeqTask:
  """The built-in reversal task of configs/reversal.py."""
  t = config.task

  def batch(split: str, index: int) -> dict[str, np.ndarray]:
    seed = config.seed if split == "train" else config.seed + 1_000_003
    return reversal_batch(seed, index, config.batch_size, t.min_length,
                                       t.max_length, t.vocab_size)

  return seq2seq.Seq2SeqTask(build_model(config), functools.partial(batch, "train"),
                     lambda: [batch("eval", i) for i in range(config.eval_batches)],
                     "reverse a random token string (held-out batches, teacher forced)")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after: int | None = None) -> dict[str, Any] | None:
  """train.py's entry for configs/reversal.py (see rag_jax.training.seq2seq.train_and_evaluate)."""
  config_check.validate(config, "reversal")
  return seq2seq.train_and_evaluate(config, workdir, reversal_task(config), stop_after)
