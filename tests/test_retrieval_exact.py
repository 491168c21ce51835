"""Exact MIPS (chunked matmul + top-k merge, sharded with shard_map) against a numpy brute force."""

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh

from rag_jax.retrieval.backends import load_index
from rag_jax.retrieval.exact import ExactConfig, ExactIndex, chunk_topk, topk_group_size
from rag_jax.retrieval.index import IndexDimensionError, IndexFileError


def numpy_topk(queries: np.ndarray, db: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Independent reference: full score matrix, sorted by (score desc, row asc)."""
  scores = queries.astype(np.float64) @ db.astype(np.float64).T  # (Q, N), exact for small ints
  rows = np.broadcast_to(np.arange(db.shape[0]), scores.shape)
  order = np.lexsort((rows, -scores), axis=-1)[:, :k]
  return np.take_along_axis(scores, order, -1), order


def mesh_of(n: int) -> Mesh:
  assert len(jax.devices()) >= n, "conftest must provide 8 CPU devices"
  return Mesh(np.array(jax.devices()[:n]), ("data",))


@pytest.mark.parametrize("num_devices", [1, 8])
@pytest.mark.parametrize("n,k,chunk", [(1000, 1, 32), (1000, 70, 32), (1000, 5, 4096), (37, 37, 4)])
def test_exact_equals_numpy_with_ties(num_devices, n, k, chunk):
  # Small-integer vectors: every inner product is exact in float32 and many are tied, so ids and
  # scores must match the reference exactly, including the smaller-row-wins tie rule. k=70 > chunk
  # exercises the merge of partial chunk lists; n=37 on 8 devices leaves shards shorter than k
  # and rows of padding on the last device.
  rng = np.random.default_rng(n + k)
  db = rng.integers(-2, 3, (n, 16)).astype(np.float32)
  queries = rng.integers(-2, 3, (23, 16)).astype(np.float32)
  index = ExactIndex.build(db, ExactConfig(chunk_size=chunk, query_batch_size=8),
                           mesh=mesh_of(num_devices))
  scores, ids = index.search(queries, k)
  ref_scores, ref_ids = numpy_topk(queries, db, k)
  assert ids.dtype == np.int64 and scores.dtype == np.float32
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))
  # The reference must contain ties at the top-k boundary for this test to mean anything.
  top = numpy_topk(queries, db, min(k + 1, n))[0]
  assert (np.diff(top, axis=1) == 0).any()


@pytest.mark.parametrize("num_devices", [1, 8])
def test_exact_equals_numpy_random_floats(num_devices):
  rng = np.random.default_rng(0)
  db = rng.standard_normal((3001, 48)).astype(np.float32)
  db *= rng.lognormal(0, 0.3, (3001, 1)).astype(np.float32)
  queries = rng.standard_normal((50, 48)).astype(np.float32)
  index = ExactIndex.build(db, ExactConfig(chunk_size=256, query_batch_size=32),
                           mesh=mesh_of(num_devices))
  scores, ids = index.search(queries, 40)
  ref_scores, ref_ids = numpy_topk(queries, db, 40)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
  # Continuous scores: ids agree except where two reference scores are within rounding.
  ext = numpy_topk(queries, db, 41)[0]  # one past k: the boundary can tie too
  near_tie = (np.abs(ref_scores[:, :, None] - ext[:, None, :]) < 1e-4).sum(-1) > 1  # (Q, k)
  same = ids == ref_ids
  assert np.all(same | near_tie)
  assert same.mean() > 0.99
  # Returned scores are the inner products of the returned rows.
  np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, db[ids]), rtol=1e-5,
                             atol=1e-5)


def test_bfloat16_storage_matches_rounded_reference():
  rng = np.random.default_rng(1)
  db = rng.standard_normal((500, 32)).astype(np.float32)
  queries = rng.standard_normal((10, 32)).astype(np.float32)
  index = ExactIndex.build(db, ExactConfig(chunk_size=64, dtype="bfloat16"), mesh=mesh_of(8))
  scores, ids = index.search(queries, 10)
  rounded = db.astype(ml_dtypes.bfloat16).astype(np.float32)
  ref_scores, ref_ids = numpy_topk(queries, rounded, 10)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_devices", [1, 8])
def test_storage_dtype_matmul_matches_rounded_queries_and_rows(num_devices):
  # matmul="storage": queries are rounded to bf16 like the rows, products accumulate in float32.
  # Small integers are exact in bf16, so ties and the smaller-row-wins rule must hold exactly.
  rng = np.random.default_rng(4)
  db = rng.integers(-3, 4, (700, 24)).astype(np.float32)
  queries = rng.integers(-3, 4, (12, 24)).astype(np.float32) + 0.00390625  # rounds away in bf16
  index = ExactIndex.build(db, ExactConfig(chunk_size=64, dtype="bfloat16", matmul="storage"),
                           mesh=mesh_of(num_devices))
  scores, ids = index.search(queries, 25)
  rounded_q = queries.astype(ml_dtypes.bfloat16).astype(np.float32)
  ref_scores, ref_ids = numpy_topk(rounded_q, db, 25)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(scores, ref_scores.astype(np.float32))
  # The float32 path keeps the queries' low bits: its scores differ from the rounded ones.
  exact = ExactIndex.build(db, ExactConfig(chunk_size=64, dtype="bfloat16"),
                           mesh=mesh_of(num_devices))
  assert not np.array_equal(exact.search(queries, 25)[0], scores)


def test_unknown_matmul_mode_is_refused():
  with pytest.raises(ValueError, match="matmul='fp8'"):
    ExactConfig(matmul="fp8")


def test_search_fn_inside_jit_matches_search():
  rng = np.random.default_rng(2)
  db = rng.integers(-3, 4, (300, 8)).astype(np.float32)
  queries = rng.integers(-3, 4, (16, 8)).astype(np.float32)
  index = ExactIndex.build(db, ExactConfig(chunk_size=16), mesh=mesh_of(8))
  search = index.search_fn(7)

  @jax.jit
  def step(q, database):
    scores, ids = search(q * 2.0, database)  # some traced computation around the search
    return scores / 2.0, ids

  s, i = step(queries, index.db)
  ref_s, ref_i = index.search(queries, 7)
  np.testing.assert_array_equal(np.asarray(i), ref_i)
  np.testing.assert_array_equal(np.asarray(s), ref_s)


def test_save_load_roundtrip_and_errors(tmp_path):
  rng = np.random.default_rng(3)
  db = rng.standard_normal((200, 12)).astype(np.float32)
  queries = rng.standard_normal((5, 12)).astype(np.float32)
  index = ExactIndex.build(db, ExactConfig(chunk_size=32), mesh=mesh_of(1))
  index.save(tmp_path / "idx")
  loaded = load_index(tmp_path / "idx", mesh=mesh_of(8))
  assert isinstance(loaded, ExactIndex) and loaded.config.chunk_size == 32
  for a, b in zip(index.search(queries, 9), loaded.search(queries, 9), strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(loaded.embeddings(np.array([[3, 4]])), db[[[3, 4]]])

  with pytest.raises(IndexDimensionError, match="dim 13 .*dim-12"):
    loaded.search(np.zeros((2, 13), np.float32), 3)
  with pytest.raises(ValueError, match="k=201"):
    loaded.search(queries, 201)
  with pytest.raises(IndexFileError, match="no index directory"):
    load_index(tmp_path / "nowhere")
  (tmp_path / "idx" / "index.json").unlink()
  with pytest.raises(IndexFileError, match="index.json is missing"):
    load_index(tmp_path / "idx")


def test_failed_save_keeps_previous_index(tmp_path, monkeypatch):
  rng = np.random.default_rng(4)
  good = ExactIndex.build(rng.standard_normal((50, 4)).astype(np.float32), mesh=mesh_of(1))
  good.save(tmp_path / "idx")
  before = sorted(p.name for p in (tmp_path / "idx").rglob("*"))

  other = ExactIndex.build(rng.standard_normal((60, 4)).astype(np.float32), mesh=mesh_of(1))
  import rag_jax.retrieval.exact as exact_mod

  def boom(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(exact_mod, "save_embeddings_into", boom)
  with pytest.raises(OSError, match="disk full"):
    other.save(tmp_path / "idx")
  assert sorted(p.name for p in (tmp_path / "idx").rglob("*")) == before
  assert load_index(tmp_path / "idx").count == 50
  assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temp directory left behind


@pytest.mark.parametrize("width,k", [(64, 1), (512, 5), (4096, 100), (1024, 7), (96, 3),
                                     (256, 64)])
def test_chunk_topk_equals_lax_top_k_with_ties_and_padding(width, k):
  # The two-stage top-k must return exactly lax.top_k's values and columns, including the
  # smaller-column-first rule among ties and -inf padding columns.
  rng = np.random.default_rng(width + k)
  scores = rng.integers(-30, 31, (9, width)).astype(np.float32)  # ties, group maxima vary
  scores[:, width // 2:] = np.where(rng.random((9, width - width // 2)) < 0.5, -np.inf,
                                    scores[:, width // 2:])
  scores[0] = -np.inf  # a row of padding only
  values, cols = chunk_topk(jax.numpy.asarray(scores), k)
  order = np.lexsort((np.broadcast_to(np.arange(width), scores.shape), -scores), axis=-1)[:, :k]
  np.testing.assert_array_equal(np.asarray(cols), order)
  np.testing.assert_array_equal(np.asarray(values), np.take_along_axis(scores, order, 1))


def test_two_stage_path_is_taken_for_wide_rows():
  # The cases above would pass trivially if every width fell back to lax.top_k.
  assert topk_group_size(4096, 100) is not None and topk_group_size(512, 5) is not None
  assert topk_group_size(256, 64) is None  # too few groups: plain top-k
