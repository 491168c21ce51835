"""The paper experiment's six retriever x model rows (Lewis et al. 2020, Table 6), shared by its
QA rows (rag_jax.experiments.world.paper) and its FEVER-like rows
(rag_jax.experiments.world.fever)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

RETRIEVERS = ("bm25", "frozen", "learned")
MODELS = ("rag_sequence", "rag_token")
ROW_NAMES = {("bm25", "rag_sequence"): "RAG-Sequence-BM25", ("bm25", "rag_token"): "RAG-Token-BM25",
             ("frozen", "rag_sequence"): "RAG-Sequence-Frozen",
             ("frozen", "rag_token"): "RAG-Token-Frozen",
             ("learned", "rag_sequence"): "RAG-Sequence", ("learned", "rag_token"): "RAG-Token"}


def row_name(retriever: str, model: str) -> str:
  """The row's directory name in a world's workdir, e.g. rag_token_bm25."""
  return f"{model}_{retriever}"


def index_dir(workdir: Path, retriever: str, swapped: bool = False) -> Path:
  """The index a row retrieves from: BM25's (index_bm25) or the dense ScaNN one (index)."""
  base = "index_bm25" if retriever == "bm25" else "index"
  return workdir / (base + ("_swapped" if swapped else ""))


def retriever_overrides(workdir: Path, retriever: str) -> dict[str, Any]:
  """config.rag fields of a row's retriever: BM25 scores as p(z|x) logits over the BM25 index;
  the frozen question encoder; the learned one (the RAG trainer's default)."""
  if retriever == "bm25":
    return {"retriever_kind": "bm25", "index_dir": str(index_dir(workdir, "bm25"))}
  if retriever == "frozen":
    return {"frozen_groups": ("question_encoder",)}
  if retriever == "learned":
    return {}
  raise ValueError(f"retriever {retriever!r}: expected one of {RETRIEVERS}")
