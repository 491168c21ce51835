"""Index kinds by name: build one from embeddings, or load any saved one.

The one module that knows every backend (exact, ScaNN); rag_jax.retrieval.index defines the
interface they implement and imports neither.
"""

from __future__ import annotations

import os

from rag_jax.retrieval.exact import ExactConfig, ExactIndex
from rag_jax.retrieval.index import Embeddings, Index, read_meta
from rag_jax.retrieval.scann_index import ScannConfig, ScannIndex

BACKENDS: dict[str, type[Index]] = {ExactIndex.kind: ExactIndex, ScannIndex.kind: ScannIndex}


def make_index(embeddings: Embeddings, kind: str, *, scann_config: ScannConfig | None = None,
               exact_config: ExactConfig | None = None, progress: bool = True) -> Index:
  """Builds an index of `kind` ("scann" or "exact") over (count, dim) embeddings."""
  if kind == ScannIndex.kind:
    return ScannIndex.build(embeddings, scann_config, progress=progress)
  if kind == ExactIndex.kind:
    return ExactIndex.build(embeddings, exact_config)
  raise ValueError(f"unknown index type {kind!r}; expected one of {sorted(BACKENDS)}")


def load_index(path: str | os.PathLike, **kwargs) -> Index:
  """Loads any saved index; `kwargs` go to the backend's ``load`` (e.g. ``mesh=`` for exact)."""
  meta = read_meta(path)
  backend = BACKENDS.get(meta["type"])
  if backend is None:
    raise ValueError(f"{path}: unknown index type {meta['type']!r}")
  return backend.load(path, **kwargs)
