"""Length-bucketed passage encoding (rag_jax/retrieval/encode.py): the batch plan, row order,
agreement with unpadded one-passage encoding and with transformers' DPRContextEncoder, and one
compiled program per batch shape."""

import jax
import numpy as np
import pytest
import torch
from jax.sharding import Mesh
from transformers import DPRConfig, DPRContextEncoder

from rag_jax.checkpoints import load_pretrained
from rag_jax.retrieval.encode import (
  BucketedEncoder,
  EncodeConfig,
  make_encode_fn,
  plan_batches,
  pooled_output,
)

VOCAB, MAX_LENGTH = 97, 64


def mesh_of(n):
  return Mesh(np.array(jax.devices()[:n]), ("data",))


def mixed_corpus(n: int, seed: int = 0) -> list[list[int]]:
  """Passages of 3..MAX_LENGTH ids (1..VOCAB-1: no pad id 0), lengths spread unevenly."""
  rng = np.random.default_rng(seed)
  lengths = np.clip(rng.normal(36, 14, n).round(), 3, MAX_LENGTH).astype(int)
  return [rng.integers(1, VOCAB, k).tolist() for k in lengths]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A random tiny DPR context encoder as torch module and as rag_jax (model, params)."""
  torch.manual_seed(0)
  config = DPRConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=MAX_LENGTH, projection_dim=0)
  torch_model = DPRContextEncoder(config).eval()
  path = tmp_path_factory.mktemp("ctx")
  torch_model.save_pretrained(path)
  model, params = load_pretrained(path)
  return torch_model, model, params


@pytest.mark.parametrize("devices", [1, 3, 8])
@pytest.mark.parametrize("tokens_per_batch", [0, 200])
def test_plan_covers_every_row_once_with_room_for_it(devices, tokens_per_batch):
  rng = np.random.default_rng(devices)
  lengths = rng.integers(1, 100, 123)
  config = EncodeConfig(batch_size=10, max_length=100, length_bucket=16,
                        tokens_per_batch=tokens_per_batch)
  plan = plan_batches(lengths, config, devices)
  rows = np.concatenate([r for r, _, _ in plan])
  assert sorted(rows.tolist()) == list(range(123))  # every row exactly once
  assert list(lengths[rows]) == sorted(lengths, reverse=True)  # longest first
  for i, (r, batch, length) in enumerate(plan):
    assert batch % devices == 0 and len(r) <= batch
    assert lengths[r].max() <= length <= 100
    assert length % 16 == 0 or length == 100  # a bucket, or capped at max_length
    assert length - lengths[r].max() < 16  # never a whole bucket of padding
    full = (tokens_per_batch // length if tokens_per_batch else 10)
    full = max(devices, -(-full // devices) * devices)
    if i < len(plan) - 1:
      assert len(r) == batch == full  # only the last batch is partial
    else:  # the tail: padded to a power-of-two multiple of the devices, at most a full batch
      assert batch <= full and (batch // devices) & (batch // devices - 1) == 0
      assert batch == full or batch < 2 * len(r) + devices


def test_bucketed_equals_unpadded_and_transformers_row_for_row(tiny):
  torch_model, model, params = tiny
  seqs = mixed_corpus(41)
  config = EncodeConfig(batch_size=8, max_length=MAX_LENGTH, length_bucket=8)
  encoder = BucketedEncoder(model, mesh_of(1))
  got = encoder.encode(params, seqs, pad_id=0, config=config)
  assert len(encoder.shapes) > 3  # really several buckets
  # Unbucketed: each passage alone at its own length, no padding at all. Not bit-identical:
  # another shape is another XLA program (other matmul blocking and reduction order), ~1e-7.
  single = make_encode_fn(model, mesh_of(1))
  for i, s in enumerate(seqs):
    ids = np.asarray([s], np.int32)
    alone = np.asarray(single(params, ids, np.ones_like(ids)))[0]
    np.testing.assert_allclose(got[i], alone, rtol=0, atol=1e-6, err_msg=f"row {i}")
  # transformers' DPRContextEncoder, the whole corpus padded to its longest (mask from pad id).
  ids = np.zeros((len(seqs), max(map(len, seqs))), np.int64)
  for i, s in enumerate(seqs):
    ids[i, :len(s)] = s
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(ids)).pooler_output.numpy()
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_one_compiled_program_per_batch_shape_reused_across_calls(tiny):
  _, model, params = tiny
  seqs = mixed_corpus(70, seed=1)
  config = EncodeConfig(batch_size=16, max_length=MAX_LENGTH, length_bucket=16,
                        tokens_per_batch=512)
  encoder = BucketedEncoder(model, mesh_of(8))
  first = encoder.encode(params, seqs, pad_id=0, config=config)
  planned = {(b, n) for _, b, n in plan_batches([len(s) for s in seqs], config, 8)}
  assert encoder.shapes == planned and len(planned) >= 3
  assert encoder.fn._cache_size() == len(planned)  # jit's own count of compiled programs
  # Another shard with the same lengths in another order: the same programs, rows follow it.
  perm = np.random.default_rng(2).permutation(len(seqs))
  again = encoder.encode(params, [seqs[p] for p in perm], pad_id=0, config=config)
  assert encoder.fn._cache_size() == len(planned)
  np.testing.assert_allclose(again, first[perm], rtol=0, atol=1e-6)


def test_last_layer_for_cls_alone_equals_the_full_forward(tiny):
  # pooled_output skips the last layer's rows other than [CLS]: the same values as the model's
  # own full forward (and, above, as transformers'), padded rows included.
  _, model, params = tiny
  rng = np.random.default_rng(4)
  ids = rng.integers(1, VOCAB, (6, 23)).astype(np.int32)
  mask = np.ones_like(ids)
  for r, n in enumerate([23, 5, 17, 1, 12, 22]):
    ids[r, n:], mask[r, n:] = 0, 0
  full = model.apply({"params": params}, input_ids=ids, attention_mask=mask,
                     token_type_ids=np.zeros_like(ids)).pooler_output
  fast = jax.jit(lambda p, i, m: pooled_output(model, p, i, m))(params, ids, mask)
  np.testing.assert_allclose(np.asarray(fast), np.asarray(full), rtol=0, atol=1e-6)
