"""bf16 products on the CPU: float32 accumulation, against float64 products of the same values."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rag_jax.checkpoints import load_pretrained
from rag_jax.models import layers
from tests import torch_reference as ref

# One bf16 rounding of a float32-accumulated sum: relative error below 2^-8.
BF16_REL = 2.0**-8


def _bf16(rng, shape, scale=1.0):
  return jnp.asarray(rng.standard_normal(shape) * scale, jnp.bfloat16)


def _f64(x):
  return np.asarray(x.astype(jnp.float32), np.float64)


def _close_to_bf16_rounding(got, want):
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  np.testing.assert_allclose(got, want, rtol=BF16_REL, atol=BF16_REL * np.abs(want).max() * 1e-2)


@pytest.mark.parametrize("rows", [8, 6, 5])  # four, two and one blocks in the weight gradient
def test_accumulating_matmul_and_its_gradients_match_float64(rows):
  rng = np.random.default_rng(0)
  x, w = _bf16(rng, (rows, 3, 96)), _bf16(rng, (96, 40), 0.1)
  g = _bf16(rng, (rows, 3, 40))
  out, vjp = jax.vjp(lambda x, w: layers.accumulating_matmul(x, w, None, jnp.bfloat16), x, w)
  dx, dw = vjp(g)
  assert out.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  x64, w64, g64 = _f64(x), _f64(w), _f64(g)
  _close_to_bf16_rounding(out, x64 @ w64)
  _close_to_bf16_rounding(dx, g64 @ w64.T)
  _close_to_bf16_rounding(dw, x64.reshape(-1, 96).T @ g64.reshape(-1, 40))


def test_float32_output_is_not_rounded_to_bf16():
  rng = np.random.default_rng(1)
  x, w = _bf16(rng, (4, 64)), _bf16(rng, (64, 300))
  out = layers.accumulating_matmul(x, w, None, jnp.float32)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out, np.float64), _f64(x) @ _f64(w), rtol=1e-5,
                             atol=1e-4)


def test_dense_in_bf16_on_cpu_takes_the_accumulating_product():
  x = jnp.ones((2, 8), jnp.bfloat16)
  layer = layers.dense(4, 0.02, jnp.bfloat16, jnp.float32, "d")
  params = layer.init(jax.random.key(0), x)
  text = jax.jit(layer.apply).lower(params, x).as_text()
  assert "bf16" in text and "-> tensor<2x4xf32>" in text  # a float32-valued bf16 product
  assert layers.use_accumulating_matmul(x, x) == (jax.default_backend() == "cpu")
  assert not layers.use_accumulating_matmul(x.astype(jnp.float32), x.astype(jnp.float32))


def test_bias_joins_the_float32_sum_before_the_one_rounding():
  """bf16 Dense with a float32 bias: out = round_bf16(x.w + b) and the bias gradient is the
  float32 sum of the cotangent, against float64 of the same values."""
  rng = np.random.default_rng(3)
  x, g = _bf16(rng, (6, 5, 64)), _bf16(rng, (6, 5, 48))
  layer = layers.dense(48, 0.05, jnp.bfloat16, jnp.float32, "d")
  params = layer.init(jax.random.key(0), x)
  # A bias whose float32 digits a bf16 bias would lose (bf16 keeps 8 significant bits).
  bias = jnp.asarray(rng.standard_normal(48) * 3 + 1 / 3, jnp.float32)
  params = {"params": {**params["params"], "bias": bias}}
  out, vjp = jax.vjp(lambda p: layer.apply(p, x), params)
  (grads,) = vjp(g)
  kernel = _f64(params["params"]["kernel"].astype(jnp.bfloat16))
  want = _f64(x) @ kernel + np.asarray(bias, np.float64)
  assert out.dtype == jnp.bfloat16 and grads["params"]["bias"].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)),
                                np.asarray(jnp.asarray(want, jnp.float32).astype(jnp.bfloat16)
                                           .astype(jnp.float32)))
  np.testing.assert_allclose(np.asarray(grads["params"]["bias"], np.float64),
                             _f64(g).sum(axis=(0, 1)), rtol=1e-6, atol=1e-5)
  _close_to_bf16_rounding(grads["params"]["kernel"],
                          _f64(x).reshape(-1, 64).T @ _f64(g).reshape(-1, 48))


def test_dense_matches_flax_dense_in_float32():
  """Same parameter names, shapes and initial values as nn.Dense, and the same product."""
  x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 7, 16)), jnp.float32)
  ours = layers.dense(24, 0.02, jnp.float32, jnp.float32, "d")
  flax_dense = nn.Dense(24, kernel_init=nn.initializers.normal(0.02),
                        bias_init=nn.initializers.normal(1.0))
  params = flax_dense.init(jax.random.key(5), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(5), x)) == jax.tree.map(jnp.shape,
                                                                                 params)
  np.testing.assert_array_equal(ours.init(jax.random.key(5), x)["params"]["kernel"],
                                params["params"]["kernel"])
  np.testing.assert_allclose(ours.apply(params, x), flax_dense.apply(params, x), rtol=1e-6,
                             atol=1e-6)


def test_bf16_bart_gradients_follow_the_float32_gradients(tmp_path):
  """The whole generator in bf16 compute (fp32 parameters): loss and parameter gradients
  against transformers' float32 BART on the same weights."""
  torch_model, path = ref.bart(tmp_path, "plain_untied")
  model, params = load_pretrained(path, dtype=jnp.bfloat16)
  rng = np.random.default_rng(2)
  ids = rng.integers(3, model.config.vocab_size, (4, 12))
  labels = rng.integers(3, model.config.vocab_size, (4, 7))

  def loss(p):
    logits = model.apply({"params": p}, input_ids=ids, decoder_input_ids=labels).logits
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1).mean()

  value, grads = jax.value_and_grad(loss)(params)
  torch_model.train(False)
  out = torch_model(input_ids=ref.to_torch(ids), decoder_input_ids=ref.to_torch(labels))
  t_loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]),
                                             ref.to_torch(labels).reshape(-1))
  t_loss.backward()
  assert abs(float(value) - t_loss.item()) < 0.02 * t_loss.item()
  fc1 = grads["decoder"]["layers_0"]["fc1"]["kernel"]  # [in, out]
  t_fc1 = torch_model.model.decoder.layers[0].fc1.weight.grad.numpy().T
  cosine = float(np.sum(fc1 * t_fc1) / (np.linalg.norm(fc1) * np.linalg.norm(t_fc1)))
  assert fc1.dtype == jnp.float32 and cosine > 0.99
