"""The one small interface every passage index implements, and loading any saved index.

    index = ExactIndex.build(embeddings, config)      # or ScannIndex.build(...)
    scores, ids = index.search(queries, k)            # (Q, k) float32, (Q, k) int64, best first
    index.save(path)                                  # atomic: temp dir renamed into place
    index = load_index(path)                          # rag_jax.retrieval.backends

`ids` are passage rows of the :class:`~rag_jax.retrieval.store.PassageStore` (and of the
embeddings). `scores` are always exact inner products between the query and the stored
embedding of each returned passage, whatever an approximate index used to find them: RAG turns
them into p(z|x), so they must not carry quantization error (the reference does the same).
Ties are broken towards the smaller row id, so results are deterministic.

A saved index is a directory holding ``index.json`` (type, dim, count, config), an
``embeddings/`` directory in the :mod:`~rag_jax.retrieval.embeddings` format (the exact vectors,
hard-linked from the source when possible) and whatever the backend needs.

A :class:`TextIndex` (BM25, rag_jax.retrieval.bm25_index) is queried with the questions' text
instead: ``search_text(questions, k)``, scores its own (BM25), no embeddings (dim 0), and
``"query": "text"`` in its ``index.json``.
"""

from __future__ import annotations

import abc
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from rag_jax.retrieval.embeddings import EmbeddingStore, write_into
from rag_jax.utils.errors import UserError

INDEX_FORMAT = "rag_jax.index/1"


class IndexFileError(UserError, FileNotFoundError):
  """A saved index directory that is missing a file it needs."""


class IndexDimensionError(UserError, ValueError):
  """Queries whose dimension differs from the indexed embeddings'."""


Embeddings = np.ndarray | EmbeddingStore


def embeddings_shape(embeddings: Embeddings) -> tuple[int, int]:
  if isinstance(embeddings, EmbeddingStore):
    return embeddings.count, embeddings.dim
  if embeddings.ndim != 2:
    raise ValueError(f"embeddings must be (count, dim), got shape {embeddings.shape}")
  return int(embeddings.shape[0]), int(embeddings.shape[1])


def gather_rows(embeddings: Embeddings, ids: np.ndarray) -> np.ndarray:
  """float32 embeddings of `ids` (any shape) -> ids.shape + (dim,)."""
  if isinstance(embeddings, EmbeddingStore):
    return embeddings.rows(ids)
  return np.asarray(embeddings[np.asarray(ids)], dtype=np.float32)


def save_embeddings_into(embeddings: Embeddings, directory: Path) -> None:
  directory.mkdir()
  if isinstance(embeddings, EmbeddingStore):
    embeddings.copy_to(directory)
  else:
    write_into(directory, np.asarray(embeddings), dtype="float32")


def exact_rescore(queries: np.ndarray, ids: np.ndarray, embeddings: Embeddings,
                  batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
  """Replaces approximate scores by exact inner products and re-sorts (score desc, row asc).

  Args:
    queries: (Q, d) float32.
    ids: (Q, k) int64 candidate rows; -1 marks "no candidate" and gets score -inf.
    embeddings: the stored vectors.
  Returns:
    (scores (Q, k) float32, ids (Q, k) int64) sorted best first.
  """
  scores = np.full(ids.shape, -np.inf, dtype=np.float32)
  for s in range(0, len(ids), batch):
    blk = ids[s:s + batch]
    valid = blk >= 0
    vecs = gather_rows(embeddings, np.where(valid, blk, 0))  # (b, k, d)
    sc = np.einsum("bkd,bd->bk", vecs, queries[s:s + batch].astype(np.float32))
    scores[s:s + batch] = np.where(valid, sc, -np.inf)
  order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -scores), axis=-1)
  return np.take_along_axis(scores, order, -1), np.take_along_axis(ids, order, -1)


class Index(abc.ABC):
  """build / search / save / load; see the module docstring for the contract."""

  kind: ClassVar[str]
  dim: int
  count: int

  @classmethod
  @abc.abstractmethod
  def build(cls, embeddings: Embeddings, config: Any = None, **kwargs) -> Index:
    """Indexes (count, dim) embeddings (an array or an :class:`EmbeddingStore`)."""

  @abc.abstractmethod
  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, dim) queries -> (scores (Q, k) float32, ids (Q, k) int64), best first."""

  @abc.abstractmethod
  def save(self, path: str | os.PathLike, overwrite: bool = True) -> None:
    """Writes the index directory atomically."""

  @classmethod
  @abc.abstractmethod
  def load(cls, path: str | os.PathLike, **kwargs) -> Index:
    """Reads a directory written by :meth:`save`."""

  @abc.abstractmethod
  def embeddings(self, ids: np.ndarray) -> np.ndarray:
    """Stored float32 embeddings of rows `ids` -> ids.shape + (dim,) (retrieved_doc_embeds)."""

  def check_queries(self, queries: np.ndarray, k: int) -> np.ndarray:
    """Validates a query batch against the index; returns it as a (Q, dim) float32 array."""
    queries = np.asarray(queries, dtype=np.float32)
    if queries.ndim != 2:
      raise ValueError(f"queries must be (num_queries, dim), got shape {queries.shape}")
    if queries.shape[1] != self.dim:
      raise IndexDimensionError(
          f"queries have dim {queries.shape[1]} but the {self.kind} index was built on "
          f"dim-{self.dim} embeddings (was it built with another encoder?)")
    if not 1 <= k <= self.count:
      raise ValueError(f"k={k} must lie in [1, {self.count}] (the number of indexed passages)")
    return queries

  def _meta(self, config: dict) -> dict:
    return {"format": INDEX_FORMAT, "type": self.kind, "dim": self.dim, "count": self.count,
            "config": config}


def read_meta(path: str | os.PathLike, kind: str | None = None) -> dict:
  """Reads and checks ``index.json`` of a saved index (and that its embeddings are present)."""
  path = Path(path)
  meta_path = path / "index.json"
  if not path.is_dir():
    raise IndexFileError(f"{path}: no index directory there")
  if not meta_path.exists():
    raise IndexFileError(f"{meta_path} is missing: {path} is not a complete saved index")
  meta = json.loads(meta_path.read_text())
  if meta.get("format") != INDEX_FORMAT:
    raise ValueError(f"{meta_path}: unknown index format {meta.get('format')!r}")
  if kind is not None and meta.get("type") != kind:
    raise ValueError(f"{meta_path}: a {meta.get('type')!r} index, not {kind!r}")
  if meta.get("query") != "text" and not (path / "embeddings" / "manifest.json").exists():
    raise IndexFileError(f"{path / 'embeddings' / 'manifest.json'} is missing")
  return meta


def open_index_embeddings(path: Path, meta: dict) -> EmbeddingStore:
  try:
    store = EmbeddingStore(path / "embeddings")
  except FileNotFoundError as e:
    raise IndexFileError(str(e)) from None
  if (store.count, store.dim) != (meta["count"], meta["dim"]):
    raise ValueError(f"{path}: embeddings are {store.count} x {store.dim} but index.json says "
                     f"{meta['count']} x {meta['dim']}")
  return store


class TextIndex(Index):
  """An index queried by text, not vectors (BM25): ``search_text(questions, k)``.

  ``search`` on vectors and ``embeddings`` refuse; ``dim`` is 0. rag_jax.retrieval.Retriever
  sends such an index the questions' text.
  """

  dim = 0

  @abc.abstractmethod
  def search_text(self, questions: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Questions -> (scores (Q, k) float32, ids (Q, k) int64), best first (ties: smaller id)."""

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    raise TypeError(f"a {self.kind} index is queried with text: search_text(questions, k)")

  def embeddings(self, ids: np.ndarray) -> np.ndarray:
    raise TypeError(f"a {self.kind} index stores no passage embeddings (its scores are its own)")

  def _meta(self, config: dict) -> dict:
    return {**super()._meta(config), "query": "text"}
