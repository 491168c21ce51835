"""Embedding shards: manifest validation, bfloat16 storage, DPR pickle conversion behind opt-in."""

import json
import pickle

import ml_dtypes
import numpy as np
import pytest

from rag_jax.retrieval.corpus import Passage
from rag_jax.retrieval.embeddings import (
  EmbeddingFormatError,
  EmbeddingStore,
  PickleNotAllowedError,
  convert_dpr_pickles,
  save_embeddings,
)
from rag_jax.retrieval.store import write_store


def test_roundtrip_shards_and_row_gather(tmp_path):
  x = np.random.default_rng(0).standard_normal((103, 7)).astype(np.float32)
  store = save_embeddings(x, tmp_path / "e", shard_size=25)
  assert store.bounds == [(0, 25), (25, 50), (50, 75), (75, 100), (100, 103)]
  np.testing.assert_array_equal(store.to_array(), x)
  ids = np.array([[0, 102, 26], [99, 50, 24]])
  np.testing.assert_array_equal(store.rows(ids), x[ids])
  bf = save_embeddings(x, tmp_path / "bf", dtype="bfloat16", shard_size=50)
  assert bf.shard(0).dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(bf.to_array(), x.astype(ml_dtypes.bfloat16).astype(np.float32))


@pytest.mark.parametrize("bad,message", [
    (np.zeros((25, 8), np.float32), r"shard-00001.npy: shape \(25, 8\) disagrees .*dim 7"),
    (np.zeros((26, 7), np.float32), r"shard-00001.npy: shape \(26, 7\) disagrees .*\[25, 50\)"),
    (np.zeros((25, 7), np.float64), r"shard-00001.npy: dtype float64 but the manifest"),
])
def test_shard_disagreeing_with_manifest(tmp_path, bad, message):
  x = np.ones((60, 7), np.float32)
  save_embeddings(x, tmp_path / "e", shard_size=25)
  np.save(tmp_path / "e" / "shard-00001.npy", bad)
  with pytest.raises(EmbeddingFormatError, match=message):
    EmbeddingStore(tmp_path / "e")


def test_missing_shard_and_manifest(tmp_path):
  save_embeddings(np.ones((60, 7), np.float32), tmp_path / "e", shard_size=25)
  (tmp_path / "e" / "shard-00002.npy").unlink()
  with pytest.raises(EmbeddingFormatError, match="shard-00002.npy is missing"):
    EmbeddingStore(tmp_path / "e")
  with pytest.raises(FileNotFoundError, match="manifest.json not found"):
    EmbeddingStore(tmp_path / "nothing")
  manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
  assert manifest["count"] == 60 and manifest["num_shards"] == 3


def write_dpr_pickles(tmp_path, vectors, ids, sizes):
  """Files as DPR's generate_dense_embeddings.py writes them: pickle.dump([(id, vector), ...])."""
  paths, start = [], 0
  for f, size in enumerate(sizes):
    p = tmp_path / f"wikipedia_passages_{f}.pkl"
    with open(p, "wb") as fh:
      pickle.dump([(ids[i], vectors[i]) for i in range(start, start + size)], fh)
    paths.append(p)
    start += size
  return paths


def test_dpr_pickles_need_explicit_opt_in(tmp_path):
  paths = write_dpr_pickles(tmp_path, np.ones((4, 3), np.float32), ["1", "2", "3", "4"], [2, 2])
  with pytest.raises(PickleNotAllowedError, match="--allow_pickle"):
    convert_dpr_pickles(paths, tmp_path / "out")
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sizes", [[10, 10, 4], [5, 9, 10]])  # DPR-like, and unequal (re-sharded)
def test_dpr_pickle_conversion_aligned_to_store(tmp_path, sizes):
  n = 24
  rng = np.random.default_rng(0)
  vecs = rng.standard_normal((n, 5)).astype(np.float32)
  store = write_store([Passage(str(i + 1), "t", f"p{i}") for i in range(n)], tmp_path / "store",
                      progress=False)
  ids = [f"wiki:{i + 1}" if i % 2 else i + 1 for i in range(n)]  # DPR used both forms
  paths = write_dpr_pickles(tmp_path, vecs, ids, sizes)
  out = convert_dpr_pickles(paths, tmp_path / "emb", allow_pickle=True, store=store,
                            progress=False)
  np.testing.assert_array_equal(out.to_array(), vecs)
  assert out.manifest["complete"] and out.encoder["source"] == "dpr_pickles"
  assert out.bounds[0] == (0, 10) and out.bounds[-1][1] == n
  assert not (tmp_path / "emb.partial").exists()


def test_dpr_pickles_out_of_order_are_refused(tmp_path):
  store = write_store([Passage(str(i + 1), "t", f"p{i}") for i in range(6)], tmp_path / "store",
                      progress=False)
  ids = ["1", "2", "3", "5", "4", "6"]
  paths = write_dpr_pickles(tmp_path, np.zeros((6, 3), np.float32), ids, [3, 3])
  with pytest.raises(EmbeddingFormatError, match=r"wikipedia_passages_1.pkl: entry 0 has passage "
                     r"id '5', expected the id of passage row 3 \(4\)"):
    convert_dpr_pickles(paths, tmp_path / "emb", allow_pickle=True, store=store, progress=False)
  assert not (tmp_path / "emb").exists()
  # The first file's shard was kept for the rerun.
  assert (tmp_path / "emb.partial" / "shard-00000.npy").exists()


def test_truncated_shard_is_named_with_its_expected_size(tmp_path):
  # The old check read the header only: the store opened, and the first read failed with numpy's
  # "mmap length is greater than file size", naming no file.
  save_embeddings(np.ones((60, 7), np.float32), tmp_path / "e", shard_size=25)
  shard = tmp_path / "e" / "shard-00001.npy"
  whole = shard.stat().st_size  # the reference: the size np.save wrote
  shard.write_bytes(shard.read_bytes()[:whole - 10])
  with pytest.raises(EmbeddingFormatError) as e:
    EmbeddingStore(tmp_path / "e")
  assert str(e.value) == (
      f"{shard}: {whole - 10} bytes, expected {whole} (a {whole - 25 * 7 * 4}-byte header and "
      "25 x 7 float32 values): the shard is truncated or damaged; rerun python -m "
      "rag_jax.commands.build_index with the same --corpus and --out: it encodes a damaged shard "
      "again and rebuilds the index from the shards")
  shard.write_bytes(b"\x93NUMPY")  # cut inside the header
  with pytest.raises(EmbeddingFormatError, match=r"shard-00001.npy: not a valid \.npy file"):
    EmbeddingStore(tmp_path / "e")
