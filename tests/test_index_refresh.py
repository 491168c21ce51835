"""Refreshing the device index while the context encoder trains (rag_jax.retrieval.refresh),
against independent recomputations: each refreshed row against the context encoder's own forward
on the host's encoder-table rows with the parameters saved before the step that stamped it, the
stamps against the slice rule replayed on the host, the staleness metrics against a brute-force
search of the host copy of the index, rerank against brute force over the stale index and fresh
encodings, the schedule parser against Atlas's examples."""


import jax
import numpy as np
import optax
import pytest

from rag_jax.data.passage_table import build_encoder_table, build_passage_table
from rag_jax.parallel import global_batch, replicate
from rag_jax.retrieval.device import DeviceRetrieval
from rag_jax.retrieval.exact import ExactConfig, ExactIndex
from rag_jax.retrieval.refresh import (
  Refresh,
  ScheduleError,
  full_refresh,
  initial_state,
  parse_schedule,
  refresh_due,
  rerank_search,
)
from rag_jax.training.rag_step import make_eval_step, make_train_step, without_context_encoder
from rag_jax.training.retrieval_feed import RetrievalFeed
from rag_jax.training.state import create_train_state
from tests import test_device_retrieval as tdr

COUNT, N, R = tdr.N_PASSAGES, tdr.N_DOCS, 2


@pytest.fixture(scope="module")
def world():
  return tdr.make_world()


def setup(world, devices=8):
  """A device index of random embeddings (no row is any encoder's output) with 3-row chunks:
  on 8 devices 6 rows per shard, 48 rows, rows 40..47 padding (shard 7 all padding)."""
  mesh = tdr.mesh_of(devices)
  ctx_model, ctx_params = tdr.make_context_encoder(world)
  enc_table = build_encoder_table(world["store"].titles_and_texts, COUNT, world["q_tok"],
                                  max_length=24, block=7, progress=False)
  db = np.random.default_rng(3).standard_normal((COUNT, tdr.DIM)).astype(np.float32)
  index = ExactIndex.build(db, ExactConfig(chunk_size=3), mesh=mesh)
  feed = RetrievalFeed(world["model"], index, world["store"], world["q_tok"], world["g_tok"], N)
  table = build_passage_table(world["store"].titles_and_texts, COUNT, feed.assembler, block=7,
                              progress=False)
  retrieval = DeviceRetrieval.build(index, table, N, enc_table)
  _, _, _, question_batch = tdr.setup_retrieval(world, mesh)
  state = replicate(create_train_state(
      world["model"].apply, {**world["params"], "ctx_encoder": ctx_params}, optax.adam(1e-2),
      jax.random.key_data(jax.random.key(1))), mesh)
  return dict(mesh=mesh, ctx_model=ctx_model, enc_table=enc_table, retrieval=retrieval,
              batch=global_batch(question_batch, mesh), questions=question_batch, state=state)


def host_encode(ctx_model, ctx_params, enc_table):
  """Every passage's d(z) by the context encoder's forward on the host's table rows [COUNT, D]."""
  ids = enc_table.tokens.astype(np.int32)
  mask = (np.arange(enc_table.width) < enc_table.lengths[:, None]).astype(np.int32)
  return np.asarray(jax.jit(ctx_model.apply)({"params": ctx_params}, ids, mask).pooler_output)


def host_top(world, rag_params, questions, embeddings):
  """Brute-force top-N over the valid rows: (scores, ids) [B, N]."""
  model = world["model"]
  q = np.asarray(model.apply({"params": rag_params}, questions["input_ids"],
                             questions["attention_mask"], method=model.embed_questions))
  scores = q @ embeddings[:COUNT].T
  ids = np.argsort(-scores, axis=1, kind="stable")[:, :N]
  return np.take_along_axis(scores, ids, axis=1), ids, q


def test_rolling_refresh_rows_equal_fresh_encodings_of_their_step(world):
  """4 steps of R=2 rows per 6-row shard: after 3 (= rows_per_shard / R) every valid row was
  re-encoded, the 4th re-encodes rows 0-1 of each shard again. Each row equals the host forward
  with the parameters entering the step that stamped it (<= 1e-5); padding rows stay zero and
  unstamped; the staleness metrics equal a brute-force search of the host copy of the index."""
  s = setup(world)
  retrieval, ctx_model, enc_table = s["retrieval"], s["ctx_model"], s["enc_table"]
  assert (retrieval.rows_per_shard, retrieval.count) == (6, COUNT)
  step = make_train_step(world["model"], s["mesh"], tdr.loss_fn("rag_sequence"),
                         deterministic=True, retrieval=retrieval, context_encoder=ctx_model,
                         refresh=Refresh("rolling", rows_per_step=R))
  arrays = {k: v for k, v in retrieval.arrays.items() if k != "embeddings"}
  index, state = initial_state(retrieval), s["state"]
  saved, stamps = [], np.zeros(48, np.int64)  # The slice rule, replayed on the host.
  for i in range(4):
    params = jax.device_get(state.params)
    saved.append(params["ctx_encoder"])
    state, index, metrics = step(state, s["batch"], arrays, index)
    for shard in range(8):
      stamps[shard * 6 + (i * R + np.arange(R)) % 6] = i
    stamps[COUNT:] = 0
    host = jax.device_get(index)
    np.testing.assert_array_equal(host["encoded_at"], stamps)
    # Staleness of the rows the step retrieved: brute force over the refreshed host index.
    _, ids, _ = host_top(world, without_context_encoder(params), s["questions"],
                         host["embeddings"])
    age = i - stamps[ids]
    np.testing.assert_allclose(metrics["staleness_sum"], age.sum())
    np.testing.assert_allclose(metrics["staleness_max"], age.max())
    np.testing.assert_allclose(metrics["retrieved"], ids.size)
  fresh = [host_encode(ctx_model, p, enc_table) for p in saved]
  assert np.abs(fresh[1] - fresh[0]).max() > 1e-2  # The encoder moved: a wrong stamp shows.
  expected = np.stack([fresh[stamps[r]][r] for r in range(COUNT)])
  np.testing.assert_allclose(host["embeddings"][:COUNT], expected, atol=1e-5, rtol=0)
  assert not host["embeddings"][COUNT:].any()  # Padding: never written, masked by position.


def test_rolling_refresh_of_more_rows_than_a_shard_reencodes_the_shard_every_step(world):
  s = setup(world)
  retrieval, ctx_model = s["retrieval"], s["ctx_model"]
  step = make_train_step(world["model"], s["mesh"], tdr.loss_fn("rag_sequence"),
                         deterministic=True, retrieval=retrieval, context_encoder=ctx_model,
                         refresh=Refresh("rolling", rows_per_step=10))  # 6 rows per shard
  arrays = {k: v for k, v in retrieval.arrays.items() if k != "embeddings"}
  index, state = initial_state(retrieval), s["state"]
  for _ in range(2):
    params = jax.device_get(state.params)["ctx_encoder"]
    state, index, _ = step(state, s["batch"], arrays, index)
  host = jax.device_get(index)
  np.testing.assert_array_equal(host["encoded_at"], [1] * COUNT + [0] * 8)
  np.testing.assert_allclose(host["embeddings"][:COUNT],
                             host_encode(ctx_model, params, s["enc_table"]), atol=1e-5, rtol=0)


def test_full_refresh_reencodes_every_row_and_skips_padding(world):
  s = setup(world)
  retrieval, ctx_model = s["retrieval"], s["ctx_model"]
  params = jax.device_get(s["state"].params)["ctx_encoder"]
  arrays = {k: v for k, v in retrieval.arrays.items() if k != "embeddings"}
  out = jax.device_get(full_refresh(retrieval, ctx_model, block=4)(
      params, initial_state(retrieval), arrays, np.int32(7)))  # 4-row blocks: a ragged tail.
  np.testing.assert_allclose(out["embeddings"][:COUNT],
                             host_encode(ctx_model, params, s["enc_table"]), atol=1e-5, rtol=0)
  assert not out["embeddings"][COUNT:].any()
  np.testing.assert_array_equal(out["encoded_at"], [7] * COUNT + [0] * 8)


def test_rerank_keeps_the_fresh_top_of_the_stale_candidates(world):
  """Rerank with L=9: the step's retrieval equals brute force: the top 9 of q . (stale random
  index), re-encoded on the host, the top N of q . (fresh)."""
  s = setup(world)
  retrieval, ctx_model = s["retrieval"], s["ctx_model"]
  refresh = Refresh("rerank", candidates=9)
  step = make_train_step(world["model"], s["mesh"], tdr.loss_fn("rag_sequence"),
                         deterministic=True, retrieval=retrieval, context_encoder=ctx_model,
                         refresh=refresh, donate=False)
  arrays = {k: v for k, v in retrieval.arrays.items() if k != "embeddings"}
  index = initial_state(retrieval)
  params = jax.device_get(s["state"].params)
  stale = jax.device_get(index["embeddings"])
  _, _, q = host_top(world, without_context_encoder(params), s["questions"], stale)
  _, cand = host_top_k(q, stale, 9)
  fresh = host_encode(ctx_model, params["ctx_encoder"], s["enc_table"])
  rescored = np.einsum("bd,bld->bl", q, fresh[cand])
  best = np.argsort(-rescored, axis=1, kind="stable")[:, :N]
  want_ids = np.take_along_axis(cand, best, axis=1)
  want_scores = np.take_along_axis(rescored, best, axis=1)
  # Rerank changed the retrieval: otherwise this test could not tell the modes apart.
  assert (np.sort(want_ids, 1) != np.sort(cand[:, :N], 1)).any()
  complete = jax.jit(lambda p, c, b, a: retrieval.complete_batch(
      world["model"], p, b, a, rerank_search(retrieval, ctx_model, c, 9)))
  got = jax.device_get(complete(without_context_encoder(params), params["ctx_encoder"],
                                s["questions"], {**arrays, **index}))
  np.testing.assert_array_equal(got["doc_ids"], want_ids)
  np.testing.assert_allclose(got["retrieval_scores"], want_scores, atol=1e-5, rtol=1e-5)
  # Held-out evaluation retrieves as the train step does.
  evaluate = make_eval_step(world["model"], s["mesh"], tdr.loss_fn("rag_sequence"),
                            retrieval=retrieval, context_encoder=ctx_model, refresh=refresh)
  _, eval_ids = evaluate(s["state"].params, s["batch"], retrieval.arrays)
  np.testing.assert_array_equal(eval_ids, want_ids)
  state, index, metrics = step(s["state"], s["batch"], arrays, index)
  np.testing.assert_allclose(metrics["staleness_sum"], 0.0)  # Step 0: the index is as built.


def host_top_k(q, embeddings, k):
  scores = q @ embeddings[:COUNT].T
  ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, ids, axis=1), ids


def test_schedule_parses_atlas_syntax_and_names_the_bad_part():
  schedule = parse_schedule("0-1000:500,1000-10000:2000")
  assert schedule == ((0, 1000, 500), (1000, 10000, 2000))
  assert [t for t in range(12000) if refresh_due(schedule, t)] == [
      0, 500, 1000, 3000, 5000, 7000, 9000]
  assert [t for t in range(10) if refresh_due(parse_schedule("4"), t)] == [0, 4, 8]
  assert not any(refresh_due(parse_schedule("-1"), t) for t in range(100))
  for bad, part in (("0-1000:500,1000-x:20", "'1000-x:20'"), ("0-10:0", "'0-10:0'"),
                    ("5-1:2", "'5-1:2'"), ("0-10:2,5-20:3", "'5-20:3'"), ("0", "period")):
    with pytest.raises(ScheduleError, match=part):
      parse_schedule(bad)
