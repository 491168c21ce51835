"""DPR question/context encoders: pooler_output parity with transformers' DPR classes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rag_jax.checkpoints import load_pretrained
from tests import torch_reference as ref

TOL = 1e-5


@pytest.mark.parametrize("kind", ["question", "context"])
@pytest.mark.parametrize("projection_dim", [0, 12])
def test_pooler_output_matches_transformers(tmp_path, kind, projection_dim):
  torch_model, path = ref.dpr(tmp_path, kind, projection_dim)
  model, params = load_pretrained(path)
  assert model.config.embedding_dim == (projection_dim or 32)
  rng = np.random.default_rng(0)
  # Right padding (as DPR tokenizers pad) on one row; DPR's pad id is 0.
  ids, mask = ref.padded_batch(rng, 3, 10, model.config.vocab_size, pad=0, right={1: 4})
  with torch.no_grad():
    expected = torch_model(input_ids=ref.to_torch(ids), attention_mask=ref.to_torch(mask))
  out = jax.jit(model.apply)({"params": params}, input_ids=ids, attention_mask=mask)
  np.testing.assert_allclose(out.pooler_output, expected.pooler_output.numpy(), atol=TOL, rtol=0)
  assert out.pooler_output.shape == (3, projection_dim or 32)
  # transformers' defaults: mask = input_ids != pad, segments all zero.
  with torch.no_grad():
    default = torch_model(input_ids=ref.to_torch(ids)).pooler_output.numpy()
  got = model.apply({"params": params}, input_ids=ids).pooler_output
  np.testing.assert_allclose(got, default, atol=TOL, rtol=0)


def test_token_type_ids_are_used_when_given(tmp_path):
  torch_model, path = ref.dpr(tmp_path, "context")
  model, params = load_pretrained(path)
  ids, mask = ref.padded_batch(np.random.default_rng(1), 2, 8, 80, pad=0)
  types = np.zeros_like(ids)
  types[:, 4:] = 1
  with torch.no_grad():
    expected = torch_model(input_ids=ref.to_torch(ids), attention_mask=ref.to_torch(mask),
                           token_type_ids=ref.to_torch(types)).pooler_output.numpy()
  got = model.apply({"params": params}, input_ids=ids, attention_mask=mask,
                    token_type_ids=types).pooler_output
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def test_bf16_pooler_output_close_to_fp32(tmp_path):
  _, path = ref.dpr(tmp_path, "question", 12)
  model32, params = load_pretrained(path)
  model16, _ = load_pretrained(path, dtype=jnp.bfloat16)
  ids, mask = ref.padded_batch(np.random.default_rng(2), 4, 12, 80, pad=0, right={0: 5})
  a = np.asarray(model32.apply({"params": params}, ids, mask).pooler_output)
  b = np.asarray(model16.apply({"params": params}, ids, mask).pooler_output)
  # Relative to the embedding norm: bf16 has 8 mantissa bits (~0.4% per rounding).
  rel = np.linalg.norm(a - b, axis=-1) / np.linalg.norm(a, axis=-1)
  assert rel.max() <= 0.03
  # Inner-product rankings (what retrieval uses) are preserved on these inputs.
  np.testing.assert_array_equal(np.argsort(a @ a.T, axis=1), np.argsort(b @ a.T, axis=1))


def test_legacy_gamma_beta_names_and_pooler_are_handled(tmp_path):
  """Old BERT checkpoints name LayerNorm parameters gamma/beta and may carry an unused pooler
  (transformers renames the former and ignores the latter)."""
  from safetensors.numpy import load_file, save_file

  _, path = ref.dpr(tmp_path, "question")
  model, params = load_pretrained(path)
  file = path / "model.safetensors"
  tensors = load_file(str(file))
  legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                      "LayerNorm.beta"): v
            for k, v in tensors.items()}
  legacy["question_encoder.bert_model.pooler.dense.weight"] = np.zeros((32, 32), np.float32)
  legacy["question_encoder.bert_model.embeddings.position_ids"] = np.arange(40)[None]
  assert legacy.keys() != tensors.keys()
  save_file(legacy, str(file), metadata={"format": "pt"})
  _, legacy_params = load_pretrained(path)
  jax.tree.map(np.testing.assert_array_equal, legacy_params, params)
