"""BERT encoder and the DPR question / context encoders (transformers' DPR semantics).

RAG's retriever is a dual encoder: q(x) embeds the question, d(z) the passage, both BERT-base with
the last layer's [CLS] state as the embedding (DPR's `pooler_output`; there is no BERT pooler
dense+tanh), through a linear projection only when `projection_dim > 0` (0 in every public DPR
checkpoint). As in transformers' DPRQuestionEncoder / DPRContextEncoder, a missing attention mask
is `input_ids != pad_token_id` and missing segment ids are all zero (DPR never uses segment 1,
even for `[CLS] title [SEP] text [SEP]` passages).

Parameter names mirror transformers' module tree (`bert_model/encoder/layer_0/attention/self/
query/kernel` for `bert_model.encoder.layer.0.attention.self.query.weight`) so that checkpoint
conversion is a mechanical rename plus kernel transposes (see rag_jax/checkpoints.py).
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

Array = jax.Array

# transformers config fields that BertConfig models; everything else round-trips via `hf_extra`.
_BERT_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob",
    "max_position_embeddings", "type_vocab_size", "initializer_range", "layer_norm_eps",
    "pad_token_id", "projection_dim", "position_embedding_type")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyper-parameters of a BERT encoder / DPR encoder (names as in transformers' DPRConfig).

  A frozen (hashable) dataclass, so it can be a Flax module attribute and a jit static argument.
  """

  vocab_size: int = 30522  # WordPiece vocabulary size.
  hidden_size: int = 768  # Width of every layer (and of the embedding unless projected).
  num_hidden_layers: int = 12  # Transformer layers.
  num_attention_heads: int = 12  # Heads per attention layer; must divide hidden_size.
  intermediate_size: int = 3072  # Feed-forward inner width.
  hidden_act: str = "gelu"  # Feed-forward activation (exact erf GELU for "gelu").
  hidden_dropout_prob: float = 0.1  # Dropout on embeddings and sub-layer outputs.
  attention_probs_dropout_prob: float = 0.1  # Dropout on attention probabilities.
  max_position_embeddings: int = 512  # Longest input (learned absolute positions).
  type_vocab_size: int = 2  # Segment-id vocabulary (DPR feeds all zeros).
  initializer_range: float = 0.02  # Std of the normal init of new weights.
  layer_norm_eps: float = 1e-12  # LayerNorm epsilon.
  pad_token_id: int = 0  # Used to derive a missing attention mask.
  projection_dim: int = 0  # DPR: >0 adds a Linear(hidden_size -> projection_dim) after [CLS].
  position_embedding_type: str = "absolute"  # Only "absolute" is supported (as in DPR).
  architecture: str = "DPRQuestionEncoder"  # DPRQuestionEncoder | DPRContextEncoder.
  hf_extra: str = "{}"  # JSON of the other config.json fields, written back on export.

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by "
                       f"num_attention_heads {self.num_attention_heads}")
    if self.position_embedding_type != "absolute":
      raise ValueError(f"position_embedding_type {self.position_embedding_type!r} is not "
                       "supported (only 'absolute', as in BERT/DPR)")
    layers.get_activation(self.hidden_act)

  @property
  def embedding_dim(self) -> int:
    """Width of `pooler_output`."""
    return self.projection_dim if self.projection_dim > 0 else self.hidden_size

  @classmethod
  def from_hf(cls, hf: dict[str, Any], architecture: str | None = None) -> BertConfig:
    """Builds the config from a transformers DPRConfig / BertConfig dict (config.json)."""
    known = {k: hf[k] for k in _BERT_FIELDS if k in hf and hf[k] is not None}
    arch = architecture or (hf.get("architectures") or ["DPRQuestionEncoder"])[0]
    extra = {k: v for k, v in hf.items() if k not in _BERT_FIELDS and k != "architectures"}
    return cls(**known, architecture=arch, hf_extra=json.dumps(extra, sort_keys=True))

  def to_hf(self) -> dict[str, Any]:
    """The transformers config.json dict (model_type "dpr")."""
    out = json.loads(self.hf_extra)
    out.update({k: getattr(self, k) for k in _BERT_FIELDS})
    out["model_type"] = "dpr"
    out["architectures"] = [self.architecture]
    return out


@flax.struct.dataclass
class DPROutput:
  """pooler_output: [B, D] the passage/question embedding; last_hidden_state: [B, L, H]."""

  pooler_output: Array
  last_hidden_state: Array


class BertEmbeddings(nn.Module):
  """word + position + token_type embeddings, LayerNorm, dropout."""

  config: BertConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, deterministic: bool) -> Array:
    cfg = self.config
    init = layers.embed_init(cfg.initializer_range)

    def embed(n, name):
      return nn.Embed(n, cfg.hidden_size, embedding_init=init, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=name)

    # Positions 0..L-1 as a slice of their table and token types as a one-hot product: the
    # same rows as a lookup, but their gradients are a pad and a [types, B*L] x [B*L, H]
    # product instead of scatter-adds (on a GPU the scatter-add onto the 2 token-type rows took
    # 0.45 ms of a BART-large RAG step).
    positions = embed(cfg.max_position_embeddings, "position_embeddings").embedding
    types = embed(cfg.type_vocab_size, "token_type_embeddings").embedding
    one_hot = jax.nn.one_hot(token_type_ids, cfg.type_vocab_size, dtype=types.dtype)  # [B, L, T]
    h = (embed(cfg.vocab_size, "word_embeddings")(input_ids)
         + positions[:input_ids.shape[-1]].astype(self.dtype)  # [L, H]
         + jnp.matmul(one_hot, types, precision=jax.lax.Precision.HIGHEST  # exact rows, no
                      ).astype(self.dtype))  # TF32 / bf16 passes on accelerators; [B, L, H]
    h = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="LayerNorm")(h)
    return nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)


class BertSelfAttention(nn.Module):
  """query/key/value projections and the attention core (scale 1/sqrt(head_dim))."""

  config: BertConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array, mask: Array | None, deterministic: bool) -> Array:
    cfg = self.config
    n_heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // n_heads

    def proj(name):
      return layers.dense(cfg.hidden_size, cfg.initializer_range, self.dtype, self.param_dtype,
                          name)(h)

    q = layers.split_heads(proj("query"), n_heads)  # [B, L, H, Dh]
    k = layers.split_heads(proj("key"), n_heads)
    v = layers.split_heads(proj("value"), n_heads)
    out = layers.DotProductAttention(cfg.attention_probs_dropout_prob, self.dtype)(
        q, k, v, mask, head_dim**-0.5, deterministic)
    return layers.merge_heads(out)  # [B, L, H*Dh]


class BertSublayerOutput(nn.Module):
  """dense -> dropout -> LayerNorm(x + residual): BertSelfOutput and BertOutput."""

  config: BertConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, residual: Array, deterministic: bool) -> Array:
    cfg = self.config
    x = layers.dense(cfg.hidden_size, cfg.initializer_range, self.dtype, self.param_dtype,
                     "dense")(x)
    x = nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="LayerNorm")(x + residual)


class BertLayer(nn.Module):
  """One post-LN BERT block: attention/{self,output}, intermediate, output."""

  config: BertConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array, mask: Array | None, deterministic: bool) -> Array:
    kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    a = AttentionBlock(**kw, name="attention")(h, mask, deterministic)
    x = Intermediate(**kw, name="intermediate")(a)
    return BertSublayerOutput(**kw, name="output")(x, a, deterministic)


class AttentionBlock(nn.Module):
  """transformers' BertAttention: `self` (the core) and `output` (dense + LN)."""

  config: BertConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array, mask: Array | None, deterministic: bool) -> Array:
    kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    a = BertSelfAttention(**kw, name="self")(h, mask, deterministic)
    return BertSublayerOutput(**kw, name="output")(a, h, deterministic)


class Intermediate(nn.Module):
  """transformers' BertIntermediate: dense to intermediate_size, activation."""

  config: BertConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array) -> Array:
    cfg = self.config
    x = layers.dense(cfg.intermediate_size, cfg.initializer_range, self.dtype, self.param_dtype,
                     "dense")(h)
    return layers.get_activation(cfg.hidden_act)(x)


class BertModel(nn.Module):
  """Embeddings + encoder stack (no pooler, as DPR's `bert_model`). Returns [B, L, H]."""

  config: BertConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array,
               deterministic: bool) -> Array:
    kw = dict(config=self.config, dtype=self.dtype, param_dtype=self.param_dtype)
    h = BertEmbeddings(**kw, name="embeddings")(input_ids, token_type_ids, deterministic)
    mask = layers.padding_mask(attention_mask)
    encoder = BertStack(**kw, name="encoder")
    return encoder(h, mask, deterministic)


class BertStack(nn.Module):
  """transformers' BertEncoder: `layer_0` ... `layer_{N-1}`."""

  config: BertConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array, mask: Array | None, deterministic: bool) -> Array:
    for i in range(self.config.num_hidden_layers):
      h = BertLayer(self.config, self.dtype, self.param_dtype, name=f"layer_{i}")(
          h, mask, deterministic)
    return h


class DPREncoder(nn.Module):
  """DPRQuestionEncoder / DPRContextEncoder: [CLS] state of BERT, optionally projected.

  Call with transformers' argument names:
    input_ids [B, L] int; attention_mask [B, L] 1/0 (default input_ids != pad_token_id);
    token_type_ids [B, L] (default zeros); deterministic=False enables dropout (needs a
    "dropout" rng). Returns DPROutput(pooler_output [B, D] float32, last_hidden_state [B, L, H]).
  """

  config: BertConfig
  dtype: layers.Dtype = jnp.float32  # Compute dtype (bf16 on accelerators).
  param_dtype: layers.Dtype = jnp.float32  # Storage dtype of the parameters.

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               token_type_ids: Array | None = None, deterministic: bool = True) -> DPROutput:
    cfg = self.config
    if attention_mask is None:
      attention_mask = (input_ids != cfg.pad_token_id).astype(jnp.int32)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    h = BertModel(cfg, self.dtype, self.param_dtype, name="bert_model")(
        input_ids, attention_mask, token_type_ids, deterministic)
    pooled = h[:, 0, :]
    if cfg.projection_dim > 0:
      pooled = layers.dense(cfg.projection_dim, cfg.initializer_range, self.dtype,
                            self.param_dtype, "encode_proj")(pooled)
    return DPROutput(pooler_output=layers.at_least_f32(pooled), last_hidden_state=h)


def cls_pooler_output(model: DPREncoder, params: Any, ids: Array, mask: Array) -> Array:
  """DPREncoder's pooler_output [B, D] (deterministic, zero token types), computing the last
  layer for the [CLS] row alone.

  The embedding is the last layer's [CLS] state, and after its attention every sub-layer is
  row-wise: the last layer needs keys and values of every token but query, attention output,
  feed-forward and norms of one row (of a 12-layer BERT-base, 7 % of the forward's matmul
  FLOPs are left out). Built from the model's own modules (rag_jax/models/bert.py) on its
  parameter tree; the same values as ``model.apply(...).pooler_output`` (float32 rounding).
  """
  cfg = model.config
  kw = dict(dtype=model.dtype, param_dtype=model.param_dtype)
  p = params["bert_model"]
  h = BertEmbeddings(cfg, **kw).apply({"params": p["embeddings"]}, ids,
                                           jnp.zeros_like(ids), True)
  keys = layers.padding_mask(mask)
  last = cfg.num_hidden_layers - 1
  for i in range(last):
    h = BertLayer(cfg, **kw).apply({"params": p["encoder"][f"layer_{i}"]}, h, keys, True)
  top = p["encoder"][f"layer_{last}"]

  def proj(name: str, x: Array) -> Array:
    dense = layers.dense(cfg.hidden_size, cfg.initializer_range, model.dtype, model.param_dtype,
                         None)
    return layers.split_heads(dense.apply({"params": top["attention"]["self"][name]}, x),
                              cfg.num_attention_heads)

  cls = h[:, :1]  # (B, 1, H)
  att = layers.DotProductAttention(cfg.attention_probs_dropout_prob, model.dtype).apply(
      {}, proj("query", cls), proj("key", h), proj("value", h), keys,
      (cfg.hidden_size // cfg.num_attention_heads)**-0.5, True)
  a = BertSublayerOutput(cfg, **kw).apply({"params": top["attention"]["output"]},
                                               layers.merge_heads(att), cls, True)
  x = Intermediate(cfg, **kw).apply({"params": top["intermediate"]}, a)
  pooled = BertSublayerOutput(cfg, **kw).apply({"params": top["output"]}, x, a, True)[:, 0]
  if cfg.projection_dim > 0:
    pooled = layers.dense(cfg.projection_dim, cfg.initializer_range, model.dtype,
                          model.param_dtype, None).apply({"params": params["encode_proj"]},
                                                         pooled)
  return layers.at_least_f32(pooled)
