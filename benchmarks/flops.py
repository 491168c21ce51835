"""Hand counts of the matmul FLOPs of each workload (2 per multiply-add).

Counted: every dense projection, the attention score (QK^T) and value (PV) products, the LM
head. Not counted: embeddings (gathers), layer norms, softmax, activations, the loss and the
optimizer (a few FLOPs per element each). A training step is 3x its forward (the backward pass
computes gradients of activations and of weights, each a matmul of the forward's size). XLA's
cost analysis counts everything, so it should come out a few percent above these counts;
benchmark.py reports both and their ratio.
"""

from __future__ import annotations

from typing import Any


def bert_forward(cfg: dict[str, Any], sequences: int, length: int) -> float:
  """A BERT (DPR encoder) forward over `sequences` of `length` tokens; the [CLS] vector is
  the output (DPR has no pooler matmul unless projection_dim > 0)."""
  h, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
  per_layer = 8 * length * h * h + 4 * length * h * f + 4 * length * length * h
  proj = 2 * h * cfg.get("projection_dim", 0)
  return float(sequences * (layers * per_layer + proj))


def dpr_pooled_forward(cfg: dict[str, Any], sequences: int, length: int) -> float:
  """DPR's pooler_output as rag_jax's passage encoder computes it: every layer but the last on
  all `length` tokens; the last one's keys and values on all tokens, the rest ([CLS] query,
  its attention, output projection, feed-forward) on the [CLS] row alone."""
  h, f, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
  last = 4 * length * h * h + 4 * h * h + 4 * length * h + 4 * h * f
  head = bert_forward(dict(cfg, num_hidden_layers=layers - 1), sequences, length)
  return head + float(sequences * last)


def bart_encoder_forward(cfg: dict[str, Any], rows: int, length: int) -> float:
  d, f = cfg["d_model"], cfg["encoder_ffn_dim"]
  per_layer = 8 * length * d * d + 4 * length * d * f + 4 * length * length * d
  return float(rows * cfg["encoder_layers"] * per_layer)


def bart_decoder_forward(cfg: dict[str, Any], rows: int, target: int, source: int,
                         kv_length: int | None = None, cross_kv: bool = True) -> float:
  """Decoder + LM head over `target` positions per row. kv_length: self-attention width per
  position (the target length when teacher-forced; the cache length in incremental decoding);
  cross_kv: include the projection of the encoder states into cross-attention K/V."""
  d, f, v = cfg["d_model"], cfg["decoder_ffn_dim"], cfg["vocab_size"]
  kv = target if kv_length is None else kv_length
  per_layer = (8 * target * d * d  # self-attention Q, K, V, O
               + 4 * target * d * d  # cross-attention Q, O
               + (4 * source * d * d if cross_kv else 0)  # cross-attention K, V
               + 4 * target * kv * d  # self-attention scores and values
               + 4 * target * source * d  # cross-attention scores and values
               + 4 * target * d * f)  # feed-forward
  return float(rows * (cfg["decoder_layers"] * per_layer + 2 * target * d * v))


def rag_train_step(question_encoder: dict[str, Any], generator: dict[str, Any], batch: int,
                   n_docs: int, question_length: int, context_length: int,
                   target_length: int) -> float:
  """Forward + backward of the question encoder (B questions) and the generator (B x n rows)."""
  rows = batch * n_docs
  forward = (bert_forward(question_encoder, batch, question_length)
             + bart_encoder_forward(generator, rows, context_length)
             + bart_decoder_forward(generator, rows, target_length, context_length))
  return 3.0 * forward


def beam_decode(generator: dict[str, Any], rows: int, beams: int, max_length: int,
                source: int) -> float:
  """Encoder once per row, then max_length - 1 incremental decoder steps (the sequences hold
  the decoder start token and max_length - 1 generated tokens) for rows x beams hypotheses,
  self-attention over the cache (counted at its full max_length width, as a static-shape cache
  is read whole), cross-attention K/V projected once per row."""
  encoder = bart_encoder_forward(generator, rows, source)
  cross_kv = rows * generator["decoder_layers"] * 4 * source * generator["d_model"] ** 2
  step = bart_decoder_forward(generator, rows * beams, 1, source, kv_length=max_length,
                              cross_kv=False)
  return float(encoder + cross_kv + (max_length - 1) * step)


def rag_generate(generator: dict[str, Any], batch: int, n_docs: int, beams: int,
                 max_length: int, source: int, mode: str, candidates: int | None = None) -> float:
  """RAG-Token: one beam search over the marginal (every hypothesis on all n passages).
  RAG-Sequence: a beam search per passage; "thorough" adds a teacher-forced pass scoring the
  batch's `candidates` distinct hypotheses (None: all n x beams per question) under each of
  their question's n passages, at the max_length - 1 positions that have a token to score (the
  work the result needs: duplicates are scored once, the decoder start token is not scored;
  transformers' pass feeds all max_length positions)."""
  total = beam_decode(generator, batch * n_docs, beams, max_length, source)
  if mode == "thorough":
    candidates = (batch * n_docs * beams if candidates is None else candidates) * n_docs
    total += bart_decoder_forward(generator, candidates, max_length - 1, source, cross_kv=False)
  return total


def retrieval(queries: int, rows: int, dim: int) -> float:
  return 2.0 * queries * rows * dim
