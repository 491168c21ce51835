"""Model size presets: tiny (tests, CPU demos), base (BERT-base / BART-base), large (the paper's
BERT-base question encoder + BART-large generator).

The base/large shapes are those of the public checkpoints (facebook/dpr-question_encoder-*-base,
facebook/bart-base, facebook/bart-large), so a preset-built model loads their weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rag_jax.models.bart import BartConfig
from rag_jax.models.bert import BertConfig
from rag_jax.models.rag import RagConfig

PRESETS = ("tiny", "base", "large")

_BERT = {
    "tiny": dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, max_position_embeddings=128),
    "base": dict(),  # BertConfig defaults are BERT-base (DPR's encoders).
    "large": dict(),  # The paper keeps BERT-base for the retriever.
}

_BART = {
    "tiny": dict(vocab_size=1000, d_model=64, encoder_layers=2, decoder_layers=2,
                 encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                 decoder_ffn_dim=128, max_position_embeddings=128, dropout=0.1),
    "base": dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                 decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072),
    "large": dict(),  # BartConfig defaults are BART-large.
}


def _check(preset: str) -> None:
  if preset not in PRESETS:
    raise ValueError(f"unknown model preset {preset!r}; choose one of {PRESETS}")


def question_encoder_config(preset: str, **overrides: Any) -> BertConfig:
  """The DPR question/context encoder config of a preset, with field overrides."""
  _check(preset)
  return BertConfig(**{**_BERT[preset], **overrides})


def generator_config(preset: str, **overrides: Any) -> BartConfig:
  """The BART generator config of a preset, with field overrides."""
  _check(preset)
  return BartConfig(**{**_BART[preset], **overrides})


def rag_config(preset: str, question_encoder: dict | None = None, generator: dict | None = None,
               **overrides: Any) -> RagConfig:
  """A RagConfig from a preset; `question_encoder` / `generator` override the nested configs."""
  q = question_encoder_config(preset, **(question_encoder or {}))
  g = generator_config(preset, **(generator or {}))
  return dataclasses.replace(RagConfig(question_encoder=q, generator=g,
                                       retrieval_vector_size=q.embedding_dim), **overrides)
