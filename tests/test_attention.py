"""The attention core and the fused path (`layers.fused_attention`, cuDNN's flash attention on
NVIDIA GPUs) against a float64 numpy softmax(q k^T * scale + mask) v.

On this CPU the fused path runs through jax.nn.dot_product_attention's XLA implementation, so
what is checked here is everything rag_jax hands to cuDNN (layout, scale, the mask broadcast to
both lengths); the cuDNN kernel itself is measured by benchmark.py --attention=cudnn on a GPU.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rag_jax.models import layers
from rag_jax.models.bart import BartConfig


def _reference(q, k, v, mask, scale):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bthd,bshd->bhts", q, k) * scale
  if mask is not None:
    logits = np.where(np.broadcast_to(mask, logits.shape), logits, -1e30)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", probs, v)


def _inputs(seed, b=3, t=6, s=10, h=2, d=8):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal((b, n, h, d)).astype(np.float32) for n in (t, s, s))
  lengths = np.array([s, s - 3, 2])  # right-padded keys, as the generator's contexts
  padding = (np.arange(s)[None] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, S]
  return q, k, v, padding


@pytest.mark.parametrize("masks", ["padding", "causal+padding", "none"])
def test_fused_attention_and_the_core_match_float64(masks):
  q, k, v, padding = _inputs(0, t=10)
  mask = {"padding": padding, "none": None,
          "causal+padding": np.logical_and(padding, np.tril(np.ones((10, 10), bool))[None, None])
          }[masks]
  scale = 8**-0.5
  want = _reference(q, k, v, mask, scale)
  fused = layers.fused_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                 None if mask is None else jnp.asarray(mask), scale, "xla")
  core = layers.DotProductAttention(0.0).apply({}, q, k, v, mask, scale, True)
  assert fused.shape == core.shape == want.shape
  np.testing.assert_allclose(np.asarray(fused), want, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(np.asarray(core), want, rtol=2e-5, atol=2e-6)


def test_fused_attention_in_bf16_is_within_bf16_rounding():
  q, k, v, padding = _inputs(1)
  want = _reference(q, k, v, padding, 0.3)
  as_bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)]
  fused = layers.fused_attention(*as_bf16, jnp.asarray(padding), 0.3, "xla")
  assert fused.dtype == jnp.bfloat16
  err = np.linalg.norm(np.asarray(fused, np.float64) - want) / np.linalg.norm(want)
  assert err < 1e-2


def test_cudnn_attention_is_refused_off_gpu_and_unknown_names_at_config():
  if jax.default_backend() == "gpu":
    pytest.skip("a GPU is present: cuDNN may run")
  q, k, v, padding = _inputs(2)
  core = layers.DotProductAttention(0.0, jnp.bfloat16, implementation="cudnn")
  with pytest.raises(ValueError, match="attention_implementation='cudnn' needs an NVIDIA GPU"):
    core.apply({}, *(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), padding, 0.3, True)
  with pytest.raises(ValueError, match="attention_implementation='flash'"):
    dataclasses.replace(BartConfig(), attention_implementation="flash")
