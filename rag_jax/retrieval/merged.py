"""One index per process over its block of rows, the top-k merged across processes (Atlas).

For a host index (ScaNN, or exact search on each process's own devices) that no single host
should hold: process p of P builds an index over rows [start_p, stop_p) only (contiguous blocks
in process order, :func:`process_rows`), and every search is a collective call:

    index = MergedIndex.build(embeddings, "scann")   # on every process, same embeddings
    scores, ids = index.search(queries, k)           # on every process, same queries

Each process searches its block for its local top-k, shifts the ids to global rows, and the
(Q, k) lists of every process are all-gathered (``multihost_utils.process_allgather``) and
merged: a stable sort by score over the lists in process order, so among equal scores the
smaller global row wins, the rule of every rag_jax index. Where each process's search is exact,
the result equals one index over all rows, ids and scores, ties included. On one process it is
the local index with nothing gathered.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from rag_jax.retrieval.backends import make_index
from rag_jax.retrieval.embeddings import EmbeddingStore
from rag_jax.retrieval.exact import ExactConfig, ExactIndex
from rag_jax.retrieval.index import (
  Embeddings,
  Index,
  embeddings_shape,
  gather_rows,
  open_index_embeddings,
  read_meta,
)
from rag_jax.retrieval.scann_index import ScannConfig, ScannIndex

log = logging.getLogger(__name__)


def process_rows(count: int, process: int | None = None,
                 processes: int | None = None) -> tuple[int, int]:
  """[start, stop) of `process`'s block of `count` rows: ceil(count / P) rows per process in
  process order, the last ones shorter (possibly empty)."""
  process = jax.process_index() if process is None else process
  processes = jax.process_count() if processes is None else processes
  per = math.ceil(count / processes)
  return min(process * per, count), min((process + 1) * per, count)


def block_rows(embeddings: Embeddings, start: int, stop: int) -> np.ndarray:
  """Rows [start, stop) of an array or an embeddings directory, as a float32 array."""
  if isinstance(embeddings, EmbeddingStore):
    return embeddings.rows(np.arange(start, stop))
  return np.asarray(embeddings[start:stop], np.float32)


def merge_top_k(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(P, Q, k') lists, process p's ids all below process p + 1's -> the (Q, k) best, best first;
  among equal scores the earlier list position (so the smaller id) wins. Padding: -inf, -1."""
  processes, queries, width = scores.shape
  flat_s = np.moveaxis(scores, 0, 1).reshape(queries, processes * width)  # [Q, P * k']
  flat_i = np.moveaxis(ids, 0, 1).reshape(queries, processes * width)
  order = np.argsort(-flat_s, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(flat_s, order, 1), np.take_along_axis(flat_i, order, 1)


def block_scann_config(config: ScannConfig, count: int, block: int) -> ScannConfig:
  """A saved ScaNN index's settings for one process's block of `block` of its `count` rows: the
  tree scaled to the block (num_leaves * block / count leaves, the same share of them searched
  per query), every other setting as saved."""
  if not config.num_leaves or block >= count:
    return config
  leaves = max(1, round(config.num_leaves * block / count))
  search = max(1, math.ceil((config.leaves_to_search or 1) * block / count))
  return replace(config, num_leaves=leaves, leaves_to_search=min(search, leaves))


class MergedIndex:
  """This process's index over its block of rows; `search` merges every process's top-k.

  `source` (all rows, e.g. a memory-mapped embeddings directory) serves `embeddings(ids)` for
  any global row; a loaded one (:meth:`load`) builds its block's index at the first search, so
  an index that ends up searched on the devices (rag_jax.retrieval.device, reading `source`)
  costs no host index."""

  def __init__(self, local: Index | None, start: int, count: int, dim: int,
               source: Embeddings | None = None, kind: str = "",
               build: Callable[[], Index | None] | None = None):
    self._local, self.start, self.count, self.dim = local, start, count, dim
    self.source, self.kind, self._build = source, kind, build

  @property
  def local(self) -> Index | None:
    if self._build is not None:
      self._local, self._build = self._build(), None
    return self._local

  @classmethod
  def load(cls, path: str | os.PathLike) -> MergedIndex:
    """The saved exact or ScaNN index at `path` as one block per process (its settings; a ScaNN
    tree scaled by :func:`block_scann_config`). Every process reads only its block's rows to
    build, and any row through :meth:`embeddings`."""
    meta = read_meta(path)
    kind = meta["type"]
    embeddings = open_index_embeddings(Path(path), meta)
    count, dim = embeddings_shape(embeddings)
    start, stop = process_rows(count)
    if kind == ScannIndex.kind:
      configs = {"scann_config": block_scann_config(ScannConfig.from_json(meta["config"]), count,
                                                    stop - start)}
    elif kind == ExactIndex.kind:
      configs = {"exact_config": ExactConfig(**meta["config"])}
    else:
      raise ValueError(f"{path}: a {kind!r} index is not split by rows (exact or scann only)")

    def build() -> Index | None:
      log.info("merged index: this process indexes rows [%d, %d) of %d (%s)", start, stop,
                   count, kind)
      return (make_index(block_rows(embeddings, start, stop), kind, progress=False, **configs)
              if stop > start else None)

    return cls(None, start, count, dim, source=embeddings, kind=kind, build=build)

  def embeddings(self, ids: np.ndarray) -> np.ndarray:
    """float32 vectors of global rows `ids` (any shape), read from `source`."""
    if self.source is None:
      raise ValueError("a MergedIndex built without its source holds only its block")
    return gather_rows(self.source, ids)

  @classmethod
  def build(cls, embeddings: Embeddings, kind: str, **configs: Any) -> MergedIndex:
    """Builds `kind` ("exact", "scann"; `configs` as backends.make_index takes them) over this
    process's block of `embeddings` (all rows, the same on every process; only the block is
    read)."""
    count, dim = embeddings_shape(embeddings)
    start, stop = process_rows(count)
    local = (make_index(block_rows(embeddings, start, stop), kind, progress=False, **configs)
             if stop > start else None)
    return cls(local, start, count, dim, source=embeddings, kind=kind)

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top-k of all rows: (scores (Q, k) float32, ids (Q, k) int64). Collective: every
    process calls it with the same queries and k."""
    queries = np.asarray(queries, np.float32)
    if not 1 <= k <= self.count:
      raise ValueError(f"k={k}: expected 1 to the index's {self.count} passages")
    scores = np.full((len(queries), k), -np.inf, np.float32)  # [Q, k], padding sorts last
    ids = np.full((len(queries), k), -1, np.int64)
    if self.local is not None:
      width = min(k, self.local.count)
      s, i = self.local.search(queries, width)
      scores[:, :width], ids[:, :width] = s, i + self.start
    if jax.process_count() == 1:
      return scores, ids
    all_s = np.asarray(multihost_utils.process_allgather(scores))  # [P, Q, k]
    all_i = np.asarray(multihost_utils.process_allgather(ids))
    return merge_top_k(all_s, all_i, k)
