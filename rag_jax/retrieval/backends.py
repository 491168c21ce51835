"""Index kinds by name: build one from embeddings, or load any saved one.

The one module that knows every backend (exact, ScaNN, BM25); rag_jax.retrieval.index defines
the interface they implement and imports none. BM25 indexes passage texts, not embeddings
(:func:`make_text_index`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from rag_jax.retrieval.bm25_index import Bm25Config, Bm25Index
from rag_jax.retrieval.exact import ExactConfig, ExactIndex
from rag_jax.retrieval.index import Embeddings, Index, read_meta
from rag_jax.retrieval.scann_index import ScannConfig, ScannIndex

BACKENDS: dict[str, type[Index]] = {ExactIndex.kind: ExactIndex, ScannIndex.kind: ScannIndex,
                                    Bm25Index.kind: Bm25Index}


def make_index(embeddings: Embeddings, kind: str, *, scann_config: ScannConfig | None = None,
               exact_config: ExactConfig | None = None, progress: bool = True) -> Index:
  """Builds an index of `kind` ("scann" or "exact") over (count, dim) embeddings."""
  if kind == ScannIndex.kind:
    return ScannIndex.build(embeddings, scann_config, progress=progress)
  if kind == ExactIndex.kind:
    return ExactIndex.build(embeddings, exact_config)
  if kind == Bm25Index.kind:
    raise ValueError("a bm25 index is built from passage texts: make_text_index(texts, 'bm25')")
  raise ValueError(f"unknown index type {kind!r}; expected one of {sorted(BACKENDS)}")


def make_text_index(texts: Sequence[str], kind: str = Bm25Index.kind, *,
                    bm25_config: Bm25Config | None = None) -> Bm25Index:
  """Builds a text index of `kind` ("bm25") over passage texts (row i = texts[i])."""
  if kind != Bm25Index.kind:
    raise ValueError(f"unknown text index type {kind!r}; expected 'bm25'")
  return Bm25Index.build_text(texts, bm25_config)


def load_index(path: str | os.PathLike, **kwargs) -> Index:
  """Loads any saved index; `kwargs` go to the backend's ``load`` (e.g. ``mesh=`` for exact)."""
  meta = read_meta(path)
  backend = BACKENDS.get(meta["type"])
  if backend is None:
    raise ValueError(f"{path}: unknown index type {meta['type']!r}")
  return backend.load(path, **kwargs)
