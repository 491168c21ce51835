"""BART (transformers' BartForConditionalGeneration semantics) in Flax Linen, with a decode cache.

The generator of RAG. Post-LN encoder-decoder with learned positions offset by 2, a LayerNorm on
the embeddings, optional sqrt(d_model) embedding scale, tied input/output embeddings plus a
`final_logits_bias`.

Three entry points:
  __call__(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask) -> logits
  encode(input_ids, attention_mask) -> encoder states [B, S, d]
  decode(decoder_input_ids, encoder_hidden_states, encoder_attention_mask, decode=...) -> logits

Incremental decoding (for beam search): `init_cache(encoder_hidden_states, max_decode_length)`,
applied with `mutable=["cache"]`, returns a "cache" collection holding, per decoder layer, a
preallocated self-attention K/V buffer and the cross-attention K/V projected once from the
encoder states (layouts in `BartAttention`), plus one scalar `cache_index`. Each
`decode(..., decode=True)` step (applied with the cache and `mutable=["cache"]`) writes the new
keys/values with `lax.dynamic_update_slice` and advances the index; shapes never change, so a
decoding loop compiles once. Every cache array except `cache_index` has the batch as its leading
dimension, so beam search reorders the cache with one gather per leaf.

Parameter names mirror transformers (`encoder/layers_0/self_attn/q_proj/kernel` for
`model.encoder.layers.0.self_attn.q_proj.weight`).
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

# BART's learned position embeddings have 2 extra rows (a fairseq legacy); position p uses row p+2.
POSITION_OFFSET = 2

_BART_FIELDS = (
    "vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
    "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "activation_function",
    "dropout", "attention_dropout", "activation_dropout", "max_position_embeddings",
    "init_std", "scale_embedding", "pad_token_id", "bos_token_id", "eos_token_id",
    "decoder_start_token_id", "forced_eos_token_id", "tie_word_embeddings")


@dataclasses.dataclass(frozen=True)
class BartConfig:
  """Hyper-parameters of BART (names as in transformers' BartConfig). Frozen, hence hashable."""

  vocab_size: int = 50265  # BPE vocabulary size.
  d_model: int = 1024  # Model width.
  encoder_layers: int = 12  # Encoder blocks.
  decoder_layers: int = 12  # Decoder blocks.
  encoder_attention_heads: int = 16  # Heads in encoder self-attention; must divide d_model.
  decoder_attention_heads: int = 16  # Heads in decoder self/cross-attention; must divide d_model.
  encoder_ffn_dim: int = 4096  # Encoder feed-forward width.
  decoder_ffn_dim: int = 4096  # Decoder feed-forward width.
  activation_function: str = "gelu"  # Feed-forward activation (exact erf GELU for "gelu").
  dropout: float = 0.1  # Dropout on embeddings and sub-layer outputs.
  attention_dropout: float = 0.0  # Dropout on attention probabilities.
  activation_dropout: float = 0.0  # Dropout after the feed-forward activation.
  max_position_embeddings: int = 1024  # Longest input or output (table has 2 more rows).
  init_std: float = 0.02  # Std of the normal init of new weights.
  scale_embedding: bool = False  # Multiply token embeddings by sqrt(d_model).
  pad_token_id: int = 1  # <pad>.
  bos_token_id: int = 0  # <s>.
  eos_token_id: int = 2  # </s>.
  decoder_start_token_id: int = 2  # First decoder input in generation and shift-right.
  forced_eos_token_id: int | None = 2  # Generation forces EOS at max_length (transformers).
  tie_word_embeddings: bool = True  # Output projection = shared token embedding.
  architecture: str = "BartForConditionalGeneration"  # Written to config.json on export.
  hf_extra: str = "{}"  # JSON of the other config.json fields, written back on export.
  # rag_jax's own (not in config.json): "xla", or "cudnn" for cuDNN's fused attention on NVIDIA
  # GPUs where it applies (layers.DotProductAttention).
  attention_implementation: str = "xla"

  def __post_init__(self):
    layers.check_attention_implementation(self.attention_implementation)
    for heads in (self.encoder_attention_heads, self.decoder_attention_heads):
      if self.d_model % heads:
        raise ValueError(f"d_model {self.d_model} is not divisible by {heads} attention heads")
    layers.get_activation(self.activation_function)

  @property
  def embed_scale(self) -> float:
    return self.d_model**0.5 if self.scale_embedding else 1.0

  @classmethod
  def from_hf(cls, hf: dict[str, Any]) -> BartConfig:
    """Builds the config from a transformers BartConfig dict (config.json)."""
    known = {k: hf[k] for k in _BART_FIELDS if k in hf}
    # transformers accepts `tie_word_embeddings` absent (default True).
    known = {k: v for k, v in known.items() if v is not None or k == "forced_eos_token_id"}
    arch = (hf.get("architectures") or ["BartForConditionalGeneration"])[0]
    extra = {k: v for k, v in hf.items() if k not in _BART_FIELDS and k != "architectures"}
    return cls(**known, architecture=arch, hf_extra=json.dumps(extra, sort_keys=True))

  def to_hf(self) -> dict[str, Any]:
    """The transformers config.json dict (model_type "bart")."""
    out = json.loads(self.hf_extra)
    out.update({k: getattr(self, k) for k in _BART_FIELDS})
    out["model_type"] = "bart"
    out["is_encoder_decoder"] = True
    out["architectures"] = [self.architecture]
    return out


@flax.struct.dataclass
class Seq2SeqOutput:
  """logits: [B, T, V] float32; encoder_last_hidden_state: [B, S, d]."""

  logits: Array
  encoder_last_hidden_state: Array


def shift_tokens_right(input_ids: Array, pad_token_id: int, decoder_start_token_id: int) -> Array:
  """transformers' shift_tokens_right: [B, T] -> [B, T], start token first, -100 -> pad."""
  shifted = jnp.concatenate(
      [jnp.full_like(input_ids[:, :1], decoder_start_token_id), input_ids[:, :-1]], axis=1)
  return jnp.where(shifted == -100, pad_token_id, shifted)


class BartAttention(nn.Module):
  """Multi-head attention (q/k/v/out projections) for self- and cross-attention, with caching.

  Cache variables (collection "cache"), created by `init_self_cache` / `init_cross_cache`,
  laid out as a decode step multiplies them (keys transposed, heads leading): no per-step copy.
    cached_key [B, H, Dh, max_len], cached_value [B, H, max_len, Dh]  (decoder self-attention)
    cross_key [B, H, Dh, S], cross_value [B, H, S, Dh]  (cross-attention, projected once)
  """

  config: BartConfig
  num_heads: int
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  def setup(self):
    d, std = self.config.d_model, self.config.init_std
    mk = lambda name: layers.dense(d, std, self.dtype, self.param_dtype, name)  # noqa: E731
    self.q_proj, self.k_proj, self.v_proj, self.out_proj = (
        mk("q_proj"), mk("k_proj"), mk("v_proj"), mk("out_proj"))
    self.core = layers.DotProductAttention(self.config.attention_dropout, self.dtype,
                                           self.config.attention_implementation)

  def _project_kv(self, states: Array) -> tuple[Array, Array]:
    """[B, S, d] -> keys, values [B, S, H, Dh]."""
    return (layers.split_heads(self.k_proj(states), self.num_heads),
            layers.split_heads(self.v_proj(states), self.num_heads))

  def init_self_cache(self, batch: int, max_len: int) -> None:
    head_dim = self.config.d_model // self.num_heads
    self.put_variable("cache", "cached_key",
                      jnp.zeros((batch, self.num_heads, head_dim, max_len), self.dtype))
    self.put_variable("cache", "cached_value",
                      jnp.zeros((batch, self.num_heads, max_len, head_dim), self.dtype))

  def init_cross_cache(self, encoder_hidden_states: Array) -> None:
    k, v = self._project_kv(encoder_hidden_states)
    self.put_variable("cache", "cross_key", k.transpose(0, 2, 3, 1))  # [B, H, Dh, S]
    self.put_variable("cache", "cross_value", v.transpose(0, 2, 1, 3))  # [B, H, S, Dh]

  def __call__(self, hidden: Array, *, key_value_states: Array | None = None,
               mask: Array | None = None, decode: bool = False,
               cache_index: Array | None = None, deterministic: bool = True,
               cross_inner_rows: int = 1) -> Array:
    """hidden [B, T, d] -> [B, T, d].

    Self-attention when key_value_states is None, cross-attention otherwise. With decode=True
    the keys/values come from (and, for self-attention, are written into) the cache, and the
    self-attention mask is causal over the cache up to `cache_index` + T.

    Cross-attention may hold fewer key/value rows E than query rows B (shared encoder rows;
    see `grouped_cross_attention`): keys, values and `mask` then have E rows.
    """
    head_dim = self.config.d_model // self.num_heads
    q = layers.split_heads(self.q_proj(hidden), self.num_heads)  # [B, T, H, Dh]
    is_cross = key_value_states is not None
    if decode and is_cross:
      k = self.get_variable("cache", "cross_key")
      v = self.get_variable("cache", "cross_value")
      if k is None:
        raise ValueError("decode=True needs a cache from init_cache (no cross_key found)")
    elif decode:
      if not self.has_variable("cache", "cached_key"):
        raise ValueError("decode=True needs a cache from init_cache (no cached_key found)")
      if mask is not None:
        raise ValueError("self-attention masks are built from the cache index in decode mode")
      k_new, v_new = self._project_kv(hidden)  # [B, T, H, Dh]
      k, v = (jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), start)
              for buffer, new, start in (
                  (self.get_variable("cache", "cached_key"),
                   k_new.transpose(0, 2, 3, 1), (0, 0, 0, cache_index)),  # [B, H, Dh, T]
                  (self.get_variable("cache", "cached_value"),
                   v_new.transpose(0, 2, 1, 3), (0, 0, cache_index, 0))))  # [B, H, T, Dh]
      self.put_variable("cache", "cached_key", k)
      self.put_variable("cache", "cached_value", v)
      mask = layers.causal_mask(hidden.shape[1], v.shape[2], offset=cache_index)  # [1,1,T,L]
    else:
      k, v = self._project_kv(key_value_states if is_cross else hidden)
    if is_cross and k.shape[0] != q.shape[0]:
      out = grouped_cross_attention(self.core, q, k, v, mask, head_dim**-0.5, deterministic,
                                    cross_inner_rows, cache_layout=decode)
    else:
      out = self.core(q, k, v, mask, head_dim**-0.5, deterministic, cache_layout=decode)
    return self.out_proj(layers.merge_heads(out))


def grouped_cross_attention(core: layers.DotProductAttention, q: Array, k: Array, v: Array,
                            mask: Array | None, scale: float, deterministic: bool,
                            inner: int, cache_layout: bool = False) -> Array:
  """Cross-attention of B query rows over E < B encoder rows, each shared by G = B / E rows.

  Decoder rows are laid out [A, G, C] (C = `inner`) and encoder rows [A, C]: decoder row
  (a * G + g) * C + c reads encoder row a * C + c. Beam search over B examples has C = 1
  (row b * beams + i reads example b); RAG-Token's rows (b * beams + i) * n + j have C = n;
  RAG-Sequence's rescoring rows (candidate c * n + passage j) have A = 1, C = n. The G query
  rows of one encoder row become one longer query sequence (cross-attention has no causal
  mask, so this is exact), which projects each encoder row's keys and values once and reads
  them once per step instead of G times.

  q [B, T, H, Dh]; k, v [E, S, H, Dh] (or the decode cache's layout with cache_layout, see
  `DotProductAttention`); mask broadcastable to [E, 1, 1, S] -> [B, T, H, Dh].
  """
  rows, t, heads, head_dim = q.shape
  shared = k.shape[0]
  if rows % shared or shared % inner:
    raise ValueError(f"cross-attention over {shared} encoder rows cannot serve {rows} decoder "
                     f"rows in groups of {inner} (both must divide)")
  if mask is not None and mask.shape[0] not in (1, shared):
    raise ValueError(f"encoder_attention_mask has {mask.shape[0]} rows; with {shared} shared "
                     f"encoder rows it needs {shared} (one per encoder row, not per decoder row)")
  group, outer = rows // shared, shared // inner
  q = q.reshape(outer, group, inner, t, heads, head_dim)  # [A, G, C, T, H, Dh]
  q = q.transpose(0, 2, 1, 3, 4, 5).reshape(shared, group * t, heads, head_dim)  # [E, G*T, H, Dh]
  out = core(q, k, v, mask, scale, deterministic, cache_layout)  # [E, G*T, H, Dh]
  out = out.reshape(outer, inner, group, t, heads, head_dim)  # [A, C, G, T, H, Dh]
  return out.transpose(0, 2, 1, 3, 4, 5).reshape(rows, t, heads, head_dim)  # [B, T, H, Dh]


def _token_embedding(cfg: BartConfig, dtype, param_dtype, name: str | None) -> nn.Embed:
  return nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=layers.embed_init(cfg.init_std),
                  dtype=dtype, param_dtype=param_dtype, name=name)


def _layer_norm(name: str | None, dtype, param_dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, name=name)


class BartEncoderLayer(nn.Module):
  """Post-LN: x = LN(x + SelfAttn(x)); x = LN(x + FFN(x))."""

  config: BartConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.self_attn = BartAttention(cfg, cfg.encoder_attention_heads, self.dtype, self.param_dtype)
    self.self_attn_layer_norm = _layer_norm(None, self.dtype, self.param_dtype)
    self.final_layer_norm = _layer_norm(None, self.dtype, self.param_dtype)
    self.fc1 = layers.dense(cfg.encoder_ffn_dim, cfg.init_std, self.dtype, self.param_dtype, None)
    self.fc2 = layers.dense(cfg.d_model, cfg.init_std, self.dtype, self.param_dtype, None)
    self.drop = nn.Dropout(cfg.dropout)
    self.activation_drop = nn.Dropout(cfg.activation_dropout)

  def __call__(self, h: Array, mask: Array | None, deterministic: bool) -> Array:
    a = self.self_attn(h, mask=mask, deterministic=deterministic)
    h = self.self_attn_layer_norm(h + self.drop(a, deterministic=deterministic))
    return self.final_layer_norm(h + self.drop(_ffn(self, h, deterministic),
                                               deterministic=deterministic))


def _ffn(layer: nn.Module, h: Array, deterministic: bool) -> Array:
  """fc1 -> activation -> activation dropout -> fc2, on a layer that owns those submodules."""
  f = layers.get_activation(layer.config.activation_function)(layer.fc1(h))
  return layer.fc2(layer.activation_drop(f, deterministic=deterministic))


class BartDecoderLayer(nn.Module):
  """Post-LN: self-attention, cross-attention, feed-forward, each LN(x + sublayer(x))."""

  config: BartConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    heads = cfg.decoder_attention_heads
    self.self_attn = BartAttention(cfg, heads, self.dtype, self.param_dtype)
    self.encoder_attn = BartAttention(cfg, heads, self.dtype, self.param_dtype)
    self.self_attn_layer_norm = _layer_norm(None, self.dtype, self.param_dtype)
    self.encoder_attn_layer_norm = _layer_norm(None, self.dtype, self.param_dtype)
    self.final_layer_norm = _layer_norm(None, self.dtype, self.param_dtype)
    self.fc1 = layers.dense(cfg.decoder_ffn_dim, cfg.init_std, self.dtype, self.param_dtype, None)
    self.fc2 = layers.dense(cfg.d_model, cfg.init_std, self.dtype, self.param_dtype, None)
    self.drop = nn.Dropout(cfg.dropout)
    self.activation_drop = nn.Dropout(cfg.activation_dropout)

  def init_cache(self, encoder_hidden_states: Array, max_len: int) -> None:
    self.self_attn.init_self_cache(encoder_hidden_states.shape[0], max_len)
    self.encoder_attn.init_cross_cache(encoder_hidden_states)

  def __call__(self, h: Array, encoder_hidden_states: Array | None, self_mask: Array | None,
               cross_mask: Array | None, decode: bool, cache_index: Array | None,
               deterministic: bool, cross_inner_rows: int = 1) -> Array:
    a = self.self_attn(h, mask=self_mask, decode=decode, cache_index=cache_index,
                       deterministic=deterministic)
    h = self.self_attn_layer_norm(h + self.drop(a, deterministic=deterministic))
    # In decode mode the cross K/V come from the cache; a dummy marks the call as cross-attention.
    kv = encoder_hidden_states if encoder_hidden_states is not None else h
    c = self.encoder_attn(h, key_value_states=kv, mask=cross_mask, decode=decode,
                          deterministic=deterministic, cross_inner_rows=cross_inner_rows)
    h = self.encoder_attn_layer_norm(h + self.drop(c, deterministic=deterministic))
    return self.final_layer_norm(h + self.drop(_ffn(self, h, deterministic),
                                               deterministic=deterministic))


class BartEncoder(nn.Module):
  """Token embedding (shared, passed in) * scale + positions -> LN -> dropout -> layers."""

  config: BartConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Array | None,
               embed_tokens: nn.Embed | None, deterministic: bool) -> Array:
    cfg = self.config
    if embed_tokens is None:  # Untied embeddings: the encoder owns its token table.
      embed_tokens = _token_embedding(cfg, self.dtype, self.param_dtype, "embed_tokens")
    positions = jnp.arange(input_ids.shape[1])[None, :] + POSITION_OFFSET  # [1, S]
    embed_positions = nn.Embed(cfg.max_position_embeddings + POSITION_OFFSET, cfg.d_model,
                               embedding_init=layers.embed_init(cfg.init_std), dtype=self.dtype,
                               param_dtype=self.param_dtype, name="embed_positions")
    h = embed_tokens(input_ids) * cfg.embed_scale + embed_positions(positions)
    h = _layer_norm("layernorm_embedding", self.dtype, self.param_dtype)(h)
    h = nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
    mask = layers.padding_mask(attention_mask)
    for i in range(cfg.encoder_layers):
      h = BartEncoderLayer(cfg, self.dtype, self.param_dtype, name=f"layers_{i}")(
          h, mask, deterministic)
    return h


class BartDecoder(nn.Module):
  """Decoder stack; owns the decode-time `cache_index` (the next position to write)."""

  config: BartConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.embed_positions = nn.Embed(
        cfg.max_position_embeddings + POSITION_OFFSET, cfg.d_model,
        embedding_init=layers.embed_init(cfg.init_std), dtype=self.dtype,
        param_dtype=self.param_dtype)
    self.layernorm_embedding = _layer_norm(None, self.dtype, self.param_dtype)
    if not cfg.tie_word_embeddings:  # Untied embeddings: the decoder owns its token table.
      self.embed_tokens = _token_embedding(cfg, self.dtype, self.param_dtype, None)
    self.layers = [BartDecoderLayer(cfg, self.dtype, self.param_dtype)
                   for _ in range(cfg.decoder_layers)]
    self.drop = nn.Dropout(cfg.dropout)

  def init_cache(self, encoder_hidden_states: Array, max_len: int) -> None:
    if max_len > self.config.max_position_embeddings:
      raise ValueError(f"max_decode_length {max_len} exceeds max_position_embeddings "
                       f"{self.config.max_position_embeddings}")
    self.put_variable("cache", "cache_index", jnp.array(0, jnp.int32))
    for layer in self.layers:
      layer.init_cache(encoder_hidden_states, max_len)

  def __call__(self, decoder_input_ids: Array, encoder_hidden_states: Array | None,
               encoder_attention_mask: Array | None, decoder_attention_mask: Array | None,
               embed_tokens: nn.Embed | None, decode: bool, deterministic: bool,
               cross_inner_rows: int = 1) -> Array:
    cfg = self.config
    if embed_tokens is None:
      embed_tokens = self.embed_tokens
    t = decoder_input_ids.shape[1]
    if decode:
      if not self.has_variable("cache", "cache_index"):
        raise ValueError("decode=True needs a cache from init_cache (no cache_index found)")
      index = self.get_variable("cache", "cache_index")
      self_mask = None  # Each self-attention builds its causal mask over the cache.
      self.put_variable("cache", "cache_index", index + t)
    else:
      index = 0
      self_mask = layers.combine_masks(layers.causal_mask(t, t),
                                       layers.padding_mask(decoder_attention_mask))
    positions = index + jnp.arange(t)[None, :] + POSITION_OFFSET  # [1, T]
    h = embed_tokens(decoder_input_ids) * cfg.embed_scale + self.embed_positions(positions)
    h = self.drop(self.layernorm_embedding(h), deterministic=deterministic)
    cross_mask = layers.padding_mask(encoder_attention_mask)
    for layer in self.layers:
      h = layer(h, encoder_hidden_states, self_mask, cross_mask, decode,
                index if decode else None, deterministic, cross_inner_rows)
    return h


class BartForConditionalGeneration(nn.Module):
  """BART with the LM head. See the module docstring for the entry points and the cache."""

  config: BartConfig
  dtype: layers.Dtype = jnp.float32  # Compute dtype (bf16 on accelerators).
  param_dtype: layers.Dtype = jnp.float32  # Storage dtype of the parameters.

  def setup(self):
    cfg = self.config
    # With tie_word_embeddings (every public BART), `shared` is the encoder's and decoder's token
    # table and the output projection. Untied (transformers v5 semantics), the encoder, decoder
    # and lm_head each own a table and `shared` is kept only for checkpoint fidelity.
    self.shared = _token_embedding(cfg, self.dtype, self.param_dtype, None)
    self.encoder = BartEncoder(cfg, self.dtype, self.param_dtype)
    self.decoder = BartDecoder(cfg, self.dtype, self.param_dtype)
    # A buffer in transformers (never trained there): training masks it out of the optimizer.
    self.final_logits_bias = self.param("final_logits_bias", nn.initializers.zeros,
                                        (1, cfg.vocab_size), self.param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = layers.dense(cfg.vocab_size, cfg.init_std, self.dtype, self.param_dtype,
                                  None, use_bias=False)

  def encode(self, input_ids: Array, attention_mask: Array | None = None,
             deterministic: bool = True) -> Array:
    """input_ids [B, S], attention_mask [B, S] 1/0 (None = all ones) -> states [B, S, d]."""
    return self.encoder(input_ids, attention_mask, self._tied_embedding(), deterministic)

  def _tied_embedding(self) -> nn.Embed | None:
    if self.config.tie_word_embeddings:
      return self.shared
    _ = self.shared.embedding  # Materialise the (unused) shared table so it round-trips.
    return None

  def init_cache(self, encoder_hidden_states: Array, max_decode_length: int) -> None:
    """Creates the decode cache (apply with mutable=["cache"]); see the module docstring."""
    self.decoder.init_cache(encoder_hidden_states, max_decode_length)

  def decode(self, decoder_input_ids: Array, encoder_hidden_states: Array | None = None,
             encoder_attention_mask: Array | None = None,
             decoder_attention_mask: Array | None = None, decode: bool = False,
             deterministic: bool = True, cross_inner_rows: int = 1) -> Array:
    """decoder_input_ids [B, T] -> logits [B, T, V] float32.

    decode=False: teacher forcing over the whole prefix (causal + decoder_attention_mask).
    decode=True: T new tokens at the cache's position, attending to everything cached so far;
    encoder_hidden_states may be None (the cross K/V are cached); decoder_attention_mask is not
    supported (generation prompts carry no padding).

    The encoder side (states or cached cross K/V, and encoder_attention_mask) may have E < B
    rows, each shared by B / E decoder rows laid out as `grouped_cross_attention` describes
    (`cross_inner_rows` = its C): beams and rescored candidates then reuse one projection.
    """
    if decode and decoder_attention_mask is not None:
      raise ValueError("decoder_attention_mask is not supported with decode=True")
    h = self.decoder(decoder_input_ids, encoder_hidden_states, encoder_attention_mask,
                     decoder_attention_mask, self._tied_embedding(), decode, deterministic,
                     cross_inner_rows)
    if self.config.tie_word_embeddings:
      table = self.shared.embedding.astype(self.dtype)  # [V, d]
      if layers.use_accumulating_matmul(h, table):  # float32 logits straight from the product
        logits = layers.accumulating_matmul(h, table.T, None, jnp.float32)
      else:
        logits = self.shared.attend(h)
    else:
      logits = self.lm_head(h)
    return layers.at_least_f32(logits) + layers.at_least_f32(self.final_logits_bias)

  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               decoder_input_ids: Array | None = None,
               decoder_attention_mask: Array | None = None,
               deterministic: bool = True) -> Seq2SeqOutput:
    """Teacher-forced forward, transformers' names; decoder_input_ids default: shifted input."""
    cfg = self.config
    if decoder_input_ids is None:
      decoder_input_ids = shift_tokens_right(input_ids, cfg.pad_token_id,
                                             cfg.decoder_start_token_id)
    enc = self.encode(input_ids, attention_mask, deterministic)
    logits = self.decode(decoder_input_ids, enc, attention_mask, decoder_attention_mask,
                         deterministic=deterministic)
    return Seq2SeqOutput(logits=logits, encoder_last_hidden_state=enc)
