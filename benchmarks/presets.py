"""Benchmark shapes: tiny (CI-sized), world (the default job), base (the transformers anchor
shape), paper (the paper's BERT-base + BART-large recipe).

Model sizes are given as transformers config fields (DPRConfig, BartConfig), so both sides build
the same architecture from the same dict; weights are random (speed does not depend on them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512)
BART_IDS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                forced_eos_token_id=2)
BART_BASE = dict(vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
                 encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                 decoder_ffn_dim=3072, max_position_embeddings=1024, **BART_IDS)
BART_LARGE = dict(vocab_size=50265, d_model=1024, encoder_layers=12, decoder_layers=12,
                  encoder_attention_heads=16, decoder_attention_heads=16, encoder_ffn_dim=4096,
                  decoder_ffn_dim=4096, max_position_embeddings=1024, **BART_IDS)
DPR_PASSAGES = 21_015_300  # psgs_w100.tsv: the paper's Wikipedia index.


@dataclasses.dataclass(frozen=True)
class Preset:
  """One benchmark shape. Lengths are tokens; *_accel fields apply on GPU/TPU."""

  name: str
  question_encoder: dict[str, Any]  # transformers DPRConfig fields (BERT shape).
  generator: dict[str, Any]  # transformers BartConfig fields.
  batch: int  # Questions per training step / generation call.
  n_docs: tuple[int, ...]  # Passages per question; each value is timed.
  context_length: int  # Generator input per passage (passage + question, padded).
  question_length: int  # Question-encoder input.
  target_length: int  # Label tokens (training) and generated tokens (decoding).
  num_beams: int  # Beam size of the generation workload.
  index_rows: int  # Passages in the retrieval workload on CPU.
  index_rows_accel: int  # ... and on an accelerator.
  index_dim: int  # Embedding width of the retrieval workload.
  index_queries: int  # Queries per timed retrieval batch.
  encode_batch: int  # Passages per passage-encoding call.
  encode_length: int  # Tokens per passage in the passage-encoding workload.
  encode_corpus: int  # Passages of the mixed-length encoding case (benchmarks/encoding.py).
  encode_mean_length: int  # Their mean token length (DPR's 100-word passages: about 160).
  bf16_on_accel: bool = True  # bf16 compute (fp32 params) on accelerators; fp32 on CPU.

  def retrieval_rows(self, on_accelerator: bool) -> int:
    return self.index_rows_accel if on_accelerator else self.index_rows


_TINY_BERT = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=128)
_TINY_BART = dict(vocab_size=1000, d_model=64, encoder_layers=2, decoder_layers=2,
                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                  decoder_ffn_dim=128, max_position_embeddings=128, **BART_IDS)
_WORLD_BERT = dict(vocab_size=1101, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=512, max_position_embeddings=64)
_WORLD_BART = dict(vocab_size=1101, d_model=128, encoder_layers=2, decoder_layers=2,
                   encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=512,
                   decoder_ffn_dim=512, max_position_embeddings=64, **BART_IDS)

PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", _TINY_BERT, _TINY_BART, batch=2, n_docs=(3,), context_length=32,
                   question_length=8, target_length=8, num_beams=2, index_rows=20_000,
                   index_rows_accel=20_000, index_dim=64, index_queries=64, encode_batch=16,
                   encode_length=32, encode_corpus=64, encode_mean_length=48),
    # The default job (configs/default.py): 32 questions x 5 passages of 21 tokens, 4 labels,
    # greedy decoding of up to 8 tokens, 3,250 passages.
    "world": Preset("world", _WORLD_BERT, _WORLD_BART, batch=32, n_docs=(5,), context_length=21,
                    question_length=10, target_length=4, num_beams=1, index_rows=3_250,
                    index_rows_accel=3_250, index_dim=128, index_queries=600, encode_batch=256,
                    encode_length=24, encode_corpus=512, encode_mean_length=21),
    # transformers' RAG at BERT-base + BART-base: 4 questions x 5 passages x 128 tokens, 25
    # target tokens, beam 4; retrieval over 200k x 768 clustered vectors.
    "base": Preset("base", BERT_BASE, BART_BASE, batch=4, n_docs=(5,), context_length=128,
                   question_length=32, target_length=25, num_beams=4, index_rows=200_000,
                   index_rows_accel=200_000, index_dim=768, index_queries=1000, encode_batch=64,
                   encode_length=128, encode_corpus=256, encode_mean_length=160),
    # The paper: BERT-base question encoder, BART-large, 8 questions per device, 5 and 10
    # passages, max_combined_length 300, 25 target tokens, beam 4; 21M x 768 index (bf16 on an
    # accelerator, 1M rows on CPU); DPR passages of up to 256 tokens.
    "paper": Preset("paper", BERT_BASE, BART_LARGE, batch=8, n_docs=(5, 10), context_length=300,
                    question_length=32, target_length=25, num_beams=4, index_rows=1_000_000,
                    index_rows_accel=DPR_PASSAGES, index_dim=768, index_queries=1024,
                    encode_batch=512, encode_length=256, encode_corpus=1024,
                    encode_mean_length=160),
}


def get(name: str) -> Preset:
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
  return PRESETS[name]
