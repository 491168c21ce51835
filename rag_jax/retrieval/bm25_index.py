"""BM25 over the passages' words: the paper's sparse baseline ("RAG-*-BM25", Table 6), as a third
index kind beside exact MIPS and ScaNN.

    index = Bm25Index.build_text(["title text", ...], Bm25Config())   # row i = passage i
    scores, ids = index.search_text(["where was ada born"], k)        # BM25 scores, best first
    index.save(path); index = load_index(path)                        # rag_jax.retrieval.backends

BM25's queries are words, not vectors, so it is a :class:`~rag_jax.retrieval.index.TextIndex`:
``search_text(questions, k)`` instead of ``search(vectors, k)``, no stored embeddings.
:class:`~rag_jax.retrieval.retriever.Retriever` picks the query form from the index, so
answering, training and evaluation use BM25 through the same calls as a dense index; the
returned scores are the BM25 scores, which RAG takes as the logits of p(z|x) (the paper's BM25
rows: no question encoder in the prior, hence no gradient into it).

The scoring is bm25s (Lù 2024: BM25 on sparse matrices in pure numpy, one pip package whose only
dependency is numpy; pyserini, the usual alternative, needs a Java runtime and Lucene): its
Lucene variant, idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5)) and score(q, d) = sum over
the query's words t (a repeated word counts again, as in Lucene) of
idf(t) * tf(t, d) / (tf(t, d) + k1 (1 - b + b |d| / avgdl)), with k1 = 0.9 and b = 0.4
(Pyserini's defaults, those of DPR's BM25 baseline), English stop words removed, lower-cased
tokens of two or more word characters (bm25s' tokenizer). A passage is indexed as
``title text`` (DPR's BM25 indexes both fields). Ties go to the smaller row, as in the other
indexes.

Search scores the passages with bm25s (its per-word score columns, summed over the postings of
the query's words only) and selects the top k in linear time: a partition finds the k-th best
score, the passages above it and the lowest-numbered ones tied with it are sorted (k log k). A
full sort of every passage's score per query (N log N) was 4x slower than the selection at
200k passages and grows faster with the corpus (21M on the paper's).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from rag_jax.retrieval.index import IndexFileError, TextIndex, read_meta
from rag_jax.utils.atomic import atomic_directory
from rag_jax.utils.errors import UserError

if TYPE_CHECKING:
  import bm25s


class IndexNotBuiltError(UserError, RuntimeError):
  """A search on a BM25 index that holds no passages (never built)."""


@dataclasses.dataclass(frozen=True)
class Bm25Config:
  """BM25's parameters (bm25s' names); see the module docstring for the defaults' source."""

  k1: float = 0.9
  b: float = 0.4
  method: str = "lucene"  # bm25s: lucene | robertson | atire | bm25l | bm25+.
  stopwords: str = "en"  # bm25s' English list; "" keeps every word.


def tokenize(texts: Sequence[str], config: Bm25Config) -> list[list[str]]:
  """The words BM25 sees of each text (bm25s' tokenizer: lower case, >= 2 word characters,
  stop words out)."""
  import bm25s  # here: importing bm25s runs a jax computation (its top-k probe), which starts
  # jax's backend: a command must be able to start jax.distributed first (rag_jax/distributed.py)

  return bm25s.tokenize(list(texts), stopwords=config.stopwords or None, return_ids=False,
                        show_progress=False)


class Bm25Index(TextIndex):
  """BM25 over a list of passage texts (row i = text i); see the module docstring."""

  kind: ClassVar[str] = "bm25"

  def __init__(self, model: bm25s.BM25 | None = None, count: int = 0,
               config: Bm25Config | None = None):
    self.model, self.count, self.config = model, count, config or Bm25Config()

  @classmethod
  def build(cls, embeddings: Any, config: Any = None, **kwargs) -> Bm25Index:
    raise TypeError("a bm25 index is built from passage texts: Bm25Index.build_text(texts)")

  @classmethod
  def build_text(cls, texts: Sequence[str], config: Bm25Config | None = None) -> Bm25Index:
    """Indexes `texts` (e.g. ``title + " " + text`` per passage)."""
    config = config or Bm25Config()
    if not len(texts):
      raise ValueError("no passages to index (an empty corpus)")
    import bm25s  # here: its import starts jax's backend (see `tokenize`)

    model = bm25s.BM25(k1=config.k1, b=config.b, method=config.method)
    model.index(tokenize(texts, config), show_progress=False)
    return cls(model, len(texts), config)

  def scores(self, question: str) -> np.ndarray:
    """BM25 score of every passage for one question [count] float32 (0 where no word matches;
    a question word the corpus never uses scores nothing)."""
    if self.model is None:
      raise IndexNotBuiltError("the bm25 index holds no passages: build_text(texts) or load(path) "
                               "it before searching")
    vocab = self.model.vocab_dict
    words = [w for w in tokenize([question], self.config)[0] if w in vocab]
    if not words:
      return np.zeros(self.count, np.float32)
    return np.asarray(self.model.get_scores(words), np.float32)

  def top_k(self, question: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One question's k best passages: (scores [k] float32, rows [k] int64), score descending,
    ties to the smaller row; selected in linear time (the module docstring)."""
    scores = self.scores(question)  # [N]
    n = len(scores)
    candidates = np.arange(n)
    if k < n:
      kth = np.partition(scores, n - k)[n - k]  # the k-th best score
      above = np.flatnonzero(scores > kth)
      tied = np.flatnonzero(scores == kth)[:k - len(above)]  # ascending rows
      candidates = np.concatenate([above, tied])
    best = candidates[np.lexsort((candidates, -scores[candidates]))]  # score desc, row asc
    return scores[best], best.astype(np.int64)

  def search_text(self, questions: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    if self.model is None:
      self.scores("")  # Raises IndexNotBuiltError.
    if not 1 <= k <= self.count:
      raise ValueError(f"k={k} must lie in [1, {self.count}] (the number of indexed passages)")
    best = [self.top_k(q, k) for q in questions]
    return (np.stack([s for s, _ in best]).reshape(len(questions), k),  # [Q, k]
            np.stack([r for _, r in best]).reshape(len(questions), k))

  def save(self, path: str | os.PathLike, overwrite: bool = True) -> None:
    if self.model is None:
      raise IndexNotBuiltError("nothing to save: the bm25 index was never built")
    with atomic_directory(path, overwrite=overwrite) as tmp:
      self.model.save(str(tmp / "bm25s"), show_progress=False)
      (tmp / "index.json").write_text(json.dumps(self._meta(dataclasses.asdict(self.config)),
                                                 indent=2))

  @classmethod
  def load(cls, path: str | os.PathLike, **kwargs) -> Bm25Index:
    path = Path(path)
    meta = read_meta(path, cls.kind)
    if not (path / "bm25s" / "params.index.json").exists():
      raise IndexFileError(f"{path / 'bm25s' / 'params.index.json'} is missing: {path} is not a "
                           "complete saved bm25 index")
    import bm25s  # here: its import starts jax's backend (see `tokenize`)

    model = bm25s.BM25.load(str(path / "bm25s"), show_progress=False)
    return cls(model, meta["count"], Bm25Config(**meta["config"]))
