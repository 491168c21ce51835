"""The RAG model: a DPR question encoder and a BART generator under one parameter tree.

Parameters: {"question_encoder": <DPREncoder params>, "generator": <BART params>}, the layout of
transformers' RagSequenceForGeneration / RagTokenForGeneration (`rag.question_encoder.*`,
`rag.generator.*`). Retrieval happens outside the model (the index lives on the host or is
sharded over devices); the model receives the retrieved passages' embeddings or their scores
and the generator inputs built from them, as transformers' RAG does when `context_input_ids`
are passed in.

When the context encoder is trained too (transformers' `set_context_encoder_for_training`), its
DPREncoder parameters sit beside those two under CTX_ENCODER, and `embed_documents` re-encodes
the retrieved passages with them; the resulting d(z) is passed in as `retrieved_doc_embeds`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from rag_jax.models import layers
from rag_jax.models.bart import BartConfig, BartForConditionalGeneration
from rag_jax.models.bert import BertConfig, DPREncoder, cls_pooler_output

Array = jax.Array

# The context encoder's subtree in a train state's parameters (transformers: `rag.ctx_encoder`).
CTX_ENCODER = "ctx_encoder"

# A RAG model's kind (config.model_type, a decoder's kind) -> the transformers class it is trained,
# exported and decoded as: the loss, the generate() it reproduces, its config.json architectures.
MODEL_TYPES = {"rag_sequence": "RagSequenceForGeneration", "rag_token": "RagTokenForGeneration"}


def architecture_of(model_type: str) -> str:
  """config.model_type ("rag_sequence" or "rag_token") -> its transformers class name."""
  if model_type not in MODEL_TYPES:
    raise ValueError(f"config.model_type {model_type!r}: expected one of {sorted(MODEL_TYPES)}")
  return MODEL_TYPES[model_type]


def model_type_of(architecture: str) -> str:
  """A RAG checkpoint's transformers class name -> its model_type; ValueError for another class
  (RagModel, which holds no objective)."""
  for model_type, name in MODEL_TYPES.items():
    if name == architecture:
      return model_type
  raise ValueError(f"cannot tell RAG-Token from RAG-Sequence for architecture {architecture!r}; "
                   f"pass architecture= one of {sorted(MODEL_TYPES.values())}")


_RAG_FIELDS = (
    "n_docs", "max_combined_length", "title_sep", "doc_sep", "prefix", "label_smoothing",
    "exclude_bos_score", "do_marginalize", "reduce_loss", "do_deduplication",
    "retrieval_vector_size", "bos_token_id", "pad_token_id", "eos_token_id",
    "decoder_start_token_id")


@dataclasses.dataclass(frozen=True)
class RagConfig:
  """transformers' RagConfig fields that change numbers, plus the two nested model configs."""

  question_encoder: BertConfig = BertConfig()  # The DPR question encoder q(x).
  generator: BartConfig = BartConfig()  # The BART generator.
  n_docs: int = 5  # Passages retrieved per question.
  max_combined_length: int = 300  # Generator input length (passage + question, padded).
  title_sep: str = " / "  # Between a passage's title and its text.
  doc_sep: str = " // "  # Between the passage text and the question.
  prefix: str | None = None  # Unused by the model (the generator config's prefix is used).
  label_smoothing: float = 0.0  # Epsilon of the losses (also used in RAG-Sequence rescoring).
  exclude_bos_score: bool = False  # RAG-Sequence loss: drop the BOS position's log-prob.
  do_marginalize: bool = False  # RAG-Token forward returns marginalised log-probs.
  reduce_loss: bool = False  # Sum the loss over the batch.
  do_deduplication: bool = True  # RAG-Sequence generation: deduplicate hypotheses.
  retrieval_vector_size: int = 768  # Passage embedding width.
  bos_token_id: int | None = None  # Loss fallbacks go to the generator's ids when None.
  pad_token_id: int | None = None
  eos_token_id: int | None = None
  decoder_start_token_id: int | None = None
  architecture: str = MODEL_TYPES["rag_sequence"]  # Or RagTokenForGeneration / RagModel.
  hf_extra: str = "{}"  # JSON of the other config.json fields, written back on export.

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> RagConfig:
    """Builds the config from a transformers RagConfig dict (config.json)."""
    for key in ("question_encoder", "generator"):
      if not isinstance(hf.get(key), dict):
        raise ValueError(f"RAG config.json has no nested {key!r} config")
    q = BertConfig.from_hf(hf["question_encoder"], architecture="DPRQuestionEncoder")
    if hf["generator"].get("model_type") != "bart":
      raise ValueError(f"unsupported RAG generator model_type "
                       f"{hf['generator'].get('model_type')!r} (only 'bart')")
    g = BartConfig.from_hf(hf["generator"])
    known = {k: hf[k] for k in _RAG_FIELDS if k in hf}
    known = {k: v for k, v in known.items()
             if v is not None or k in ("prefix", "bos_token_id", "pad_token_id", "eos_token_id",
                                       "decoder_start_token_id")}
    arch = (hf.get("architectures") or [MODEL_TYPES["rag_sequence"]])[0]
    skip = set(_RAG_FIELDS) | {"architectures", "question_encoder", "generator"}
    extra = {k: v for k, v in hf.items() if k not in skip}
    return cls(question_encoder=q, generator=g, **known, architecture=arch,
               hf_extra=json.dumps(extra, sort_keys=True))

  def to_hf(self) -> dict[str, Any]:
    out = json.loads(self.hf_extra)
    out.update({k: getattr(self, k) for k in _RAG_FIELDS})
    out["question_encoder"] = self.question_encoder.to_hf()
    out["generator"] = self.generator.to_hf()
    out["model_type"] = "rag"
    out["is_encoder_decoder"] = True
    out["architectures"] = [self.architecture]
    return out


@flax.struct.dataclass
class RagOutput:
  """logits: [B*n_docs, T, V] float32 generator logits, rows batch-major (row b*n + j);
  doc_scores: [B, n_docs] float32; question_embeddings: [B, D] (None if doc_scores given)."""

  logits: Array
  doc_scores: Array
  question_embeddings: Array | None


class RagModel(nn.Module):
  """Question encoder + generator. The losses and decoders (rag_jax.losses, .decoding) use it."""

  config: RagConfig
  dtype: layers.Dtype = jnp.float32  # Compute dtype (bf16 on accelerators).
  param_dtype: layers.Dtype = jnp.float32  # Storage dtype of the parameters.

  def setup(self):
    self.question_encoder = DPREncoder(self.config.question_encoder, self.dtype,
                                       self.param_dtype)
    self.generator = BartForConditionalGeneration(self.config.generator, self.dtype,
                                                  self.param_dtype)

  def embed_questions(self, input_ids: Array, attention_mask: Array | None = None,
                      deterministic: bool = True) -> Array:
    """Question token ids [B, L] -> q(x) [B, D] float32."""
    return self.question_encoder(input_ids, attention_mask,
                                 deterministic=deterministic).pooler_output

  def __call__(self, context_input_ids: Array, context_attention_mask: Array,
               decoder_input_ids: Array, *, input_ids: Array | None = None,
               attention_mask: Array | None = None, retrieved_doc_embeds: Array | None = None,
               doc_scores: Array | None = None, decoder_attention_mask: Array | None = None,
               deterministic: bool = True) -> RagOutput:
    """Teacher-forced RAG forward with the retrieved passages passed in.

    Args:
      context_input_ids, context_attention_mask: [B*n, L] generator inputs, batch-major.
      decoder_input_ids: [B, T] targets (transformers RAG uses them unshifted), repeated per doc.
      input_ids, attention_mask: [B, Lq] question ids; with retrieved_doc_embeds [B, n, D] they
        give doc_scores = q(x) . d(z) (gradients reach the question encoder).
      doc_scores: [B, n] given directly instead (then the question encoder is not run).
      decoder_attention_mask: [B, T], repeated per doc like the targets.
    """
    question_embeddings = None
    if doc_scores is None:
      if input_ids is None or retrieved_doc_embeds is None:
        raise ValueError("pass doc_scores, or input_ids and retrieved_doc_embeds")
      question_embeddings = self.embed_questions(input_ids, attention_mask, deterministic)
      doc_scores = jnp.einsum("bd,bnd->bn", question_embeddings,
                              retrieved_doc_embeds.astype(question_embeddings.dtype))
    batch, n_docs = doc_scores.shape
    if context_input_ids.shape[0] != batch * n_docs:
      raise ValueError(f"context_input_ids has {context_input_ids.shape[0]} rows; expected "
                       f"batch {batch} x n_docs {n_docs}")
    dec_ids = jnp.repeat(decoder_input_ids, n_docs, axis=0)  # [B*n, T], row b*n + j
    dec_mask = (None if decoder_attention_mask is None
                else jnp.repeat(decoder_attention_mask, n_docs, axis=0))
    out = self.generator(context_input_ids, context_attention_mask, dec_ids, dec_mask,
                         deterministic=deterministic)
    return RagOutput(logits=out.logits, doc_scores=layers.at_least_f32(doc_scores),
                     question_embeddings=question_embeddings)


def embed_documents(ctx_encoder: DPREncoder, ctx_params: Any, input_ids: Array,
                    attention_mask: Array, *, deterministic: bool = True,
                    rngs: dict[str, Array] | None = None) -> Array:
  """d(z) of passages tokenized for the context encoder ([CLS] title [SEP] text [SEP]).

  input_ids, attention_mask: [..., Lc] (e.g. [B, n, Lc] retrieved passages, or [R, Lc] rows of
  the index to re-encode). Returns [..., D] float32. Pure: the train step differentiates it with
  respect to ctx_params; an index refresh calls it on rows of the device passage table.
  """
  lead, length = input_ids.shape[:-1], input_ids.shape[-1]
  ids = input_ids.reshape(-1, length)  # [..., Lc] -> [R, Lc]
  mask = attention_mask.reshape(-1, length)
  cfg = ctx_encoder.config
  if deterministic or cfg.hidden_dropout_prob == cfg.attention_probs_dropout_prob == 0:
    # No dropout: the last layer for the [CLS] row alone (its other rows feed nothing).
    pooled = cls_pooler_output(ctx_encoder, ctx_params, ids, mask)
  else:
    pooled = ctx_encoder.apply({"params": ctx_params}, ids, mask, deterministic=False,
                               rngs=rngs).pooler_output
  return pooled.reshape(*lead, -1)  # [R, D] -> [..., D]
