"""Building blocks shared by the BERT (DPR) encoders and the BART generator.

Both networks are post-LayerNorm Transformers with learned absolute positions. What differs
(where the LayerNorm sits around the embeddings, the attention scaling point, the names) lives in
bert.py and bart.py; what is identical lives here: activations, masks, dense layers with the
Hugging Face initialisation, and the multi-head dot-product attention core.

Numerics: parameters are kept in `param_dtype` (fp32); matmuls run in `dtype` (bf16 on
accelerators); attention logits and the softmax always run in fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = jnp.dtype | type

# The additive mask value: finite, so rows with every key masked give a uniform softmax instead
# of NaN (the behaviour of transformers' eager attention, which adds finfo(float32).min).
MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def _gelu_erf(x: Array) -> Array:
  """Exact GELU as transformers computes it: x * 0.5 * (1 + erf(x / sqrt(2))).

  jax.nn.gelu(approximate=False) writes it with erfc, which XLA's CPU backend expands into two
  branches with an exp each; erf is a single clamped rational polynomial (and is what torch's
  CPU kernel evaluates). The two agree to float32 rounding.
  """
  return x * (0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(0.5**0.5, x.dtype)))


def _quick_gelu(x: Array) -> Array:
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu_erf,  # transformers: exact erf GELU
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def at_least_f32(x: Array) -> Array:
  """Casts bf16/fp16 up to float32 and leaves float32/float64 alone (fp64 runs stay fp64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def get_activation(name: str) -> Callable[[Array], Array]:
  """Maps a transformers `activation_function` / `hidden_act` name to a JAX function."""
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(
        f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}") from None


LOW_PRECISION = (jnp.bfloat16, jnp.float16)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def accumulating_matmul(x: Array, w: Array, bias: Array | None, out_dtype: Dtype) -> Array:
  """x [..., K] . w [K, N] + bias [N] -> [..., N] in `out_dtype`, accumulated in float32 with
  the bias (float32, or None) added before the one rounding; for bf16/fp16 operands on the CPU
  (see `use_accumulating_matmul`).

  Its backward pass is written out so that the two gradient products keep the layouts XLA's
  CPU backend runs on its bf16 instructions: dx contracts g's and w's last dimensions; dw
  contracts the rows in four (or two) blocks, since a single contraction over the leading
  dimension of both operands ran at half the speed (about 200 against 380 GFLOP/s on 2 cores
  with avx512_bf16, [8192, 768] x [8192, 3072]). The bias gradient is a float32 sum: XLA's CPU
  backend rewrites a large bf16 sum into a tree of `reduce-window` steps, which took 7 % of
  the bf16 training step when the bias was added in bf16.
  """
  y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                          preferred_element_type=jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(out_dtype)


def _accumulating_matmul_fwd(x, w, bias, out_dtype):
  return accumulating_matmul(x, w, bias, out_dtype), (x, w, bias)


def _accumulating_matmul_bwd(out_dtype, residuals, g):
  x, w, bias = residuals
  db = None
  if bias is not None:
    db = jnp.sum(g, axis=tuple(range(g.ndim - 1)), dtype=jnp.float32).astype(bias.dtype)  # [N]
  g = g.astype(x.dtype)
  dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32).astype(x.dtype)  # [..., K]
  rows = x.size // x.shape[-1]
  blocks = next(b for b in (4, 2, 1) if rows % b == 0)
  xs = x.reshape(blocks, rows // blocks, x.shape[-1])  # [blocks, rows / blocks, K]
  gs = g.reshape(blocks, rows // blocks, g.shape[-1])  # [blocks, rows / blocks, N]
  dw = jnp.einsum("brk,brn->kn", xs, gs, preferred_element_type=jnp.float32)  # [K, N]
  return dx, dw.astype(w.dtype), db


accumulating_matmul.defvjp(_accumulating_matmul_fwd, _accumulating_matmul_bwd)


def use_accumulating_matmul(x: Array, w: Array) -> bool:
  """True for bf16/fp16 operands on the CPU backend.

  XLA's CPU backend multiplies bf16 matrices on the CPU's bf16 instructions (avx512_bf16,
  AMX) only when the product is float32: a bf16-valued product ran no faster than float32
  (174 against 387 GFLOP/s for [8192, 768] x [768, 3072] on 2 cores). On GPUs the bf16 product
  already accumulates in float32 inside cuBLAS, so the plain product is kept there.
  """
  return (x.dtype in LOW_PRECISION and w.dtype == x.dtype
          and jax.default_backend() == "cpu")


class Dense(nn.Module):
  """A dense layer initialised like transformers' Linear (normal(init_std) kernel, zero bias).

  Parameters and results are nn.Dense's: kernel [in, out] (the transpose of a torch Linear
  weight [out, in]) and bias [out] in `param_dtype`, the product in `dtype`. In bf16/fp16 on
  the CPU the product accumulates in float32 and the float32 bias joins it before the one
  rounding (`accumulating_matmul`).
  """

  features: int
  init_std: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", nn.initializers.normal(stddev=self.init_std),
                        (x.shape[-1], self.features), self.param_dtype)
    bias = (self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if use_accumulating_matmul(x, kernel):
      return accumulating_matmul(x, kernel, bias, self.dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))  # [..., out]
    return y if bias is None else y + bias.astype(self.dtype)


def dense(features: int, init_std: float, dtype: Dtype, param_dtype: Dtype, name: str | None,
          use_bias: bool = True) -> Dense:
  """`Dense(features, init_std, ...)` under `name`."""
  return Dense(features, init_std, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias,
               name=name)


def padding_mask(attention_mask: Array | None) -> Array | None:
  """[B, S] 1/0 key mask -> boolean [B, 1, 1, S] (broadcast over heads and queries)."""
  if attention_mask is None:
    return None
  return attention_mask.astype(bool)[:, None, None, :]


def causal_mask(query_length: int, key_length: int, offset: Array | int = 0) -> Array:
  """Boolean [1, 1, T, S]: query i (absolute position offset + i) sees keys j <= offset + i."""
  q_pos = offset + jnp.arange(query_length)[:, None]
  k_pos = jnp.arange(key_length)[None, :]
  return (k_pos <= q_pos)[None, None]


def combine_masks(*masks: Array | None) -> Array | None:
  """Logical AND of the boolean masks that are not None (None if all are)."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  out = masks[0]
  for m in masks[1:]:
    out = jnp.logical_and(out, m)
  return out


def split_heads(x: Array, num_heads: int) -> Array:
  """[B, T, H*Dh] -> [B, T, H, Dh]."""
  return x.reshape(x.shape[:-1] + (num_heads, x.shape[-1] // num_heads))


def merge_heads(x: Array) -> Array:
  """[B, T, H, Dh] -> [B, T, H*Dh]."""
  return x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))


# "xla": the einsum / softmax / einsum core below (every backend). "cudnn": cuDNN's fused
# flash attention on NVIDIA GPUs where it applies (see `DotProductAttention`).
ATTENTION_IMPLEMENTATIONS = ("xla", "cudnn")


def check_attention_implementation(name: str) -> None:
  if name not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention_implementation={name!r}; choose one of "
                     f"{ATTENTION_IMPLEMENTATIONS}")


def fused_attention(query: Array, key: Array, value: Array, mask: Array | None, scale: float,
                    implementation: str) -> Array:
  """softmax(q k^T * scale + mask) v through `jax.nn.dot_product_attention`.

  With implementation="cudnn" this is one fused kernel forward and one backward (flash
  attention): the [B, H, T, S] scores never reach device memory. query [B, T, H, Dh], key and
  value [B, S, H, Dh], mask boolean broadcastable to [B, H, T, S]; it is broadcast over the
  queries ([B or 1, H or 1, T, S]), since cuDNN takes a mask only as a bias with both lengths.
  Returns [B, T, H, Dh] in query's dtype.
  """
  if mask is not None:
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (query.shape[1], key.shape[1]))
  return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale,
                                      implementation=implementation)


class DotProductAttention(nn.Module):
  """softmax(q k^T * scale + mask) v with fp32 logits and softmax, dropout on the probabilities.

  Inputs: query [B, T, H, Dh], key/value [B, S, H, Dh], mask boolean broadcastable to
  [B, H, T, S] (True = attend). Output [B, T, H, Dh] in `dtype`. With cache_layout=True the key
  is [B, H, Dh, S] and the value [B, H, S, Dh]: the layout decode caches keep, so that a step
  multiplies them as they lie (a transposed key made the one-token logits 3x slower on CPU).

  implementation="cudnn" (NVIDIA GPUs only) sends the calls cuDNN's fused attention supports to
  it (`fused_attention`): bf16/fp16, no dropout on the probabilities (BART's default
  attention_dropout is 0), head width a multiple of 8 up to 128, even query and key lengths (a
  mask becomes a bias, which cuDNN's backward needs even), no decode cache. The others (e.g. 25
  target tokens, decoding) take the core below.
  """

  dropout_rate: float
  dtype: Dtype = jnp.float32
  implementation: str = "xla"

  def _fusable(self, query: Array, key: Array, deterministic: bool,
               cache_layout: bool) -> bool:
    if self.implementation != "cudnn":
      return False
    if jax.default_backend() != "gpu":
      raise ValueError("attention_implementation='cudnn' needs an NVIDIA GPU; jax's backend "
                       f"here is {jax.default_backend()!r} (use 'xla')")
    head = query.shape[-1]
    return (not cache_layout and (deterministic or self.dropout_rate == 0.0)
            and query.dtype in LOW_PRECISION and key.dtype == query.dtype
            and head % 8 == 0 and head <= 128
            and query.shape[1] % 2 == 0 and key.shape[1] % 2 == 0)

  @nn.compact
  def __call__(self, query: Array, key: Array, value: Array, mask: Array | None,
               scale: float, deterministic: bool, cache_layout: bool = False) -> Array:
    if self._fusable(query, key, deterministic, cache_layout):
      return fused_attention(query, key, value.astype(query.dtype), mask, scale, "cudnn")
    accumulate = jnp.promote_types(query.dtype, jnp.float32)
    # Heads-major operands ([B, T, H, Dh] -> [B, H, T, Dh]) make both products plain batched
    # matmuls over contiguous [T, Dh] / [S, Dh] blocks; left to itself, XLA's CPU backend picks
    # slower layouts for the batched dots of the token-major einsum.
    query = query.transpose(0, 2, 1, 3)  # [B, H, T, Dh]
    if cache_layout:
      logits = jnp.einsum("bhtd,bhds->bhts", query, key, preferred_element_type=accumulate)
    else:
      key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)  # [B, H, S, Dh]
      logits = jnp.einsum("bhtd,bhsd->bhts", query, key, preferred_element_type=accumulate)
    logits = logits * scale
    if mask is not None:
      logits = jnp.where(mask, logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    probs = nn.Dropout(rate=self.dropout_rate)(probs, deterministic=deterministic)
    out = jnp.einsum("bhts,bhsd->bhtd", probs.astype(self.dtype), value.astype(self.dtype))
    return out.transpose(0, 2, 1, 3)  # [B, H, T, Dh] -> [B, T, H, Dh]


def embed_init(std: float) -> Callable:
  return nn.initializers.normal(stddev=std)
