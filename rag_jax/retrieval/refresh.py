"""Refreshing the device index while the context encoder trains (rag_jax.retrieval.device).

The passage embeddings d(z) of the device index were encoded by the context encoder as it was
when the index was built; once the encoder trains they go stale. Three ways to keep the search
close to the current encoder, all on the devices that train, all over the encoder table that
device retrieval already holds ("doc_tokens", "doc_lengths", sharded like the embeddings):

  rolling    every train step re-encodes the next R rows of each device's shard (rows
             (step * R + i) mod rows_per_shard, i < R) with the step's context-encoder
             parameters and writes them in place (the embeddings buffer is donated): inside the
             step, one program, no communication; every row is at most ceil(rows_per_shard / R)
             - 1 steps old.
  scheduled  the whole index re-encoded between steps on a schedule (Atlas's --refresh_index
             syntax, `parse_schedule`), each device its own shard, block by block.
  rerank     the stale index searched for L > n_docs candidates, the candidates re-encoded with
             the current parameters and rescored, the top n_docs kept (Atlas's
             --retrieve_with_rerank).

The refreshed index state is {"embeddings": [rows, D], "encoded_at": [rows] int32}, sharded by
rows: "encoded_at" is the step whose parameters encoded each row (0: as built, the encoder the
training starts from), so the staleness of a retrieved row is step - encoded_at. Padding rows
(global row >= count) are never written: the search masks them by position.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rag_jax.data.passage_table import encoder_rows
from rag_jax.models.bert import DPREncoder
from rag_jax.models.rag import embed_documents
from rag_jax.retrieval.device import DeviceRetrieval

Array = jax.Array

REFRESH_MODES = ("none", "rolling", "scheduled", "rerank")
INDEX_STATE_KEYS = ("embeddings", "encoded_at")
NEVER = 2**31 - 1


class ScheduleError(ValueError):
  """A refresh schedule that does not parse; the message names the bad part."""


def parse_schedule(spec: str) -> tuple[tuple[int, int, int], ...]:
  """Atlas's --refresh_index syntax -> ((start, end, every), ...).

  "START-END:EVERY,...": refresh at the steps start + k * every in [start, end); "N": every N
  steps from step 0; "-1": never. E.g. "0-1000:500,1000-10000:2000" refreshes at 0, 500, 1000,
  3000, 5000, 7000, 9000.
  """
  spec = spec.strip()
  if spec == "-1":
    return ()
  if re.fullmatch(r"\d+", spec):
    every = int(spec)
    if every < 1:
      raise ScheduleError(f"refresh schedule {spec!r}: the period must be >= 1")
    return ((0, NEVER, every),)
  out = []
  for part in spec.split(","):
    found = re.fullmatch(r"\s*(\d+)-(\d+):(\d+)\s*", part)
    if found is None:
      raise ScheduleError(f"refresh schedule {spec!r}: part {part!r} is not START-END:EVERY "
                          "(e.g. 0-1000:500,1000-10000:2000; or N, or -1 for never)")
    start, end, every = map(int, found.groups())
    if end <= start or every < 1:
      raise ScheduleError(f"refresh schedule {spec!r}: part {part!r} needs START < END and "
                          "EVERY >= 1")
    if out and start < out[-1][1]:
      raise ScheduleError(f"refresh schedule {spec!r}: part {part!r} overlaps the part before")
    out.append((start, end, every))
  return tuple(out)


def refresh_due(schedule: tuple[tuple[int, int, int], ...], step: int) -> bool:
  """Whether the schedule refreshes the index before `step` (Atlas's is_time_to_refresh)."""
  return any(start <= step < end and (step - start) % every == 0
             for start, end, every in schedule)


@dataclasses.dataclass(frozen=True)
class Refresh:
  """The configured refresh: mode (REFRESH_MODES, not "none"), R rows per device shard per step
  (rolling; at most the shard's rows are used), the schedule (scheduled), L candidates
  (rerank)."""

  mode: str
  rows_per_step: int = 0
  schedule: tuple[tuple[int, int, int], ...] = ()
  candidates: int = 0

  def check(self, retrieval: DeviceRetrieval) -> None:
    """Raises ValueError if the sizes do not fit the index's layout."""
    if self.mode not in REFRESH_MODES[1:]:
      raise ValueError(f"index refresh mode {self.mode!r}: one of {list(REFRESH_MODES[1:])}")
    if "doc_tokens" not in retrieval.arrays:
      raise ValueError("an index refresh needs the encoder table on the devices (a trained "
                       "context encoder)")
    if self.mode == "rolling" and self.rows_per_step < 1:
      raise ValueError(f"rolling refresh of {self.rows_per_step} rows per step: must be >= 1")
    if self.mode == "rerank" and not retrieval.n_docs < self.candidates <= retrieval.count:
      raise ValueError(f"rerank over {self.candidates} candidates: must be > n_docs "
                       f"({retrieval.n_docs}) and <= the {retrieval.count} passages")


def initial_state(retrieval: DeviceRetrieval) -> dict[str, Array]:
  """The index state of an index as built: its embeddings (the buffer of retrieval.arrays, not a
  copy: the first step that donates it leaves retrieval.arrays["embeddings"] to be replaced by
  the step's result) and encoded_at = 0, sharded like them."""
  embeddings = retrieval.arrays["embeddings"]
  encoded_at = jax.jit(lambda e: jnp.zeros(e.shape[:1], jnp.int32),
                       out_shardings=retrieval.shardings["tokens"])(embeddings)
  return {"embeddings": embeddings, "encoded_at": encoded_at}


def _encode_local(ctx_model: DPREncoder, ctx_params: Any, tables: dict[str, Array],
                  rows: Array, step: Array, first_row: Array, count: int) -> dict[str, Array]:
  """One device's shard with its local rows `rows` [r] re-encoded and stamped `step`; rows past
  `count` (global row first_row + local row) stay as they are."""
  ids, mask = encoder_rows(tables["doc_tokens"][rows], tables["doc_lengths"][rows])  # [r, Lc]
  fresh = embed_documents(ctx_model, ctx_params, ids, mask)  # [r, D] float32
  valid = first_row + rows < count  # [r]
  emb, stamp = tables["embeddings"], tables["encoded_at"]
  fresh = jnp.where(valid[:, None], fresh.astype(emb.dtype), emb[rows])
  stamped = jnp.where(valid, step.astype(jnp.int32), stamp[rows])
  return {"embeddings": emb.at[rows].set(fresh), "encoded_at": stamp.at[rows].set(stamped)}


def _sharded(retrieval: DeviceRetrieval, local: Callable[..., dict[str, Array]]):
  """shard_map of local(ctx_params, tables, step, first_row) over the index's row shards."""
  axis, per_shard = retrieval.axis, retrieval.rows_per_shard
  keys = (*INDEX_STATE_KEYS, "doc_tokens", "doc_lengths")

  def body(ctx_params, tables, step):
    first_row = jax.lax.axis_index(axis) * per_shard
    return local(ctx_params, tables, step, first_row)

  specs = {k: P(axis) for k in keys}
  mapped = jax.shard_map(body, mesh=retrieval.mesh, in_specs=(P(), specs, P()),
                         out_specs={k: P(axis) for k in INDEX_STATE_KEYS}, check_vma=False)
  return lambda ctx_params, tables, step: mapped(ctx_params, {k: tables[k] for k in keys}, step)


def rolling_refresh(retrieval: DeviceRetrieval, ctx_model: DPREncoder, rows_per_step: int
                    ) -> Callable[[Any, dict[str, Array], Array], dict[str, Array]]:
  """Pure f(ctx_params, tables, step) -> the index state with each shard's local rows
  (step * R + i) mod rows_per_shard, i < R, re-encoded; tables holds the index state and the
  encoder table. Call it inside the jitted step (the state's buffers donated: in place). R past
  rows_per_shard re-encodes the whole shard every step."""
  per_shard, count = retrieval.rows_per_shard, retrieval.count
  rows_per_step = min(rows_per_step, per_shard)

  def local(ctx_params, tables, step, first_row):
    start = (step.astype(jnp.int32) * rows_per_step) % per_shard
    rows = (start + jnp.arange(rows_per_step, dtype=jnp.int32)) % per_shard  # [R]
    return _encode_local(ctx_model, ctx_params, tables, rows, step, first_row, count)

  return _sharded(retrieval, local)


def full_refresh(retrieval: DeviceRetrieval, ctx_model: DPREncoder, block: int = 256
                 ) -> Callable[[Any, dict[str, Array], dict[str, Array], Array], dict[str, Array]]:
  """A jitted f(ctx_params, index_state, arrays, step) -> the index state with every row
  re-encoded by ctx_params and stamped `step`: each device its own shard, `block` rows at a time
  (the last block's tail repeats the shard's last row: the same value written twice). The
  index state is donated."""
  per_shard, count = retrieval.rows_per_shard, retrieval.count
  block = min(block, per_shard)
  blocks = math.ceil(per_shard / block)

  def local(ctx_params, tables, step, first_row):
    def one(i, state):
      rows = jnp.minimum(i * block + jnp.arange(block, dtype=jnp.int32), per_shard - 1)
      return _encode_local(ctx_model, ctx_params, {**tables, **state}, rows, step, first_row,
                           count)

    return jax.lax.fori_loop(0, blocks, one, {k: tables[k] for k in INDEX_STATE_KEYS})

  mapped = _sharded(retrieval, local)
  rows = retrieval.shardings["tokens"]
  return jax.jit(lambda ctx_params, state, arrays, step: mapped(ctx_params, {**arrays, **state},
                                                                step),
                 out_shardings={k: rows for k in INDEX_STATE_KEYS}, donate_argnums=1)


def rerank_search(retrieval: DeviceRetrieval, ctx_model: DPREncoder, ctx_params: Any,
                  candidates: int) -> Callable[[Array, dict[str, Array]], tuple[Array, Array]]:
  """A search for DeviceRetrieval.complete_batch: the top `candidates` of q . (stale index), their
  passages re-encoded by ctx_params (no gradient), the top n_docs of q . (fresh d(z)).
  Returns f(queries [B, D] float32, arrays) -> (scores [B, n] float32, ids [B, n] int32)."""
  def search(queries, arrays):
    _, ids = retrieval.search(queries, arrays["embeddings"], k=candidates)  # [B, L]
    rows = retrieval.gather(ids, {k: arrays[k] for k in ("doc_tokens", "doc_lengths")})
    fresh = embed_documents(ctx_model, ctx_params, *encoder_rows(rows["doc_tokens"],
                                                                 rows["doc_lengths"]))
    fresh = jax.lax.stop_gradient(fresh)  # [B, L, D]
    scores, best = jax.lax.top_k(jnp.einsum("bd,bld->bl", queries, fresh), retrieval.n_docs)
    return scores, jnp.take_along_axis(ids, best, axis=1)

  return search


def staleness_sums(step: Array, encoded_at: Array, weights: Array) -> dict[str, Array]:
  """Steps since each retrieved row [B, n] was encoded, over the real questions (weights [B]):
  "staleness_sum", "retrieved" (its denominator) and "staleness_max"."""
  age = (step.astype(jnp.int32) - encoded_at).astype(jnp.float32)  # [B, n]
  w = jnp.broadcast_to(weights.astype(jnp.float32)[:, None], age.shape)
  return {"staleness_sum": (age * w).sum(), "retrieved": w.sum(),
          "staleness_max": jnp.where(w > 0, age, 0.0).max()}
