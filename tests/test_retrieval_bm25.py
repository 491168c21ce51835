"""The BM25 index (rag_jax.retrieval.bm25_index) against the BM25 formula computed here by hand
(bm25s' Lucene variant with the index's k1 and b), its save/load round trip and named errors, the
Retriever over it, and DPR's BM25 hard-negative mining."""

import math

import numpy as np
import pytest

from rag_jax.experiments.world.tokenizer import train_tokenizer
from rag_jax.retrieval.backends import load_index, make_index, make_text_index
from rag_jax.retrieval.bm25_index import Bm25Config, Bm25Index, IndexNotBuiltError
from rag_jax.retrieval.index import IndexFileError
from rag_jax.retrieval.retriever import Retriever
from rag_jax.training.retriever_trainer import bm25_hard_negatives

# Words of >= 2 letters and no English stop word, so the library's tokenization is .split().
CORPUS = [
    "ada lovelace born london mathematician",
    "alan turing born london london computing",
    "grace hopper born york navy computing compiler",
    "zebra crossing london street",
    "zebra crossing london street",  # A duplicate: ties go to the smaller row.
    "compiler compiler compiler design book",
]


def bm25_by_hand(query: str, corpus: list[str], k1: float, b: float) -> np.ndarray:
  """score(q, d) = sum_{t in q} ln(1 + (N - df + 0.5) / (df + 0.5)) * tf / (tf + k1 (1 - b +
  b |d| / avgdl)): Lucene's BM25 (Kamphuis et al. 2020), written from the formula."""
  docs = [d.split() for d in corpus]
  n, avgdl = len(docs), sum(len(d) for d in docs) / len(docs)
  out = np.zeros(n)
  for t in query.split():
    df = sum(t in d for d in docs)
    if df == 0:
      continue
    idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
    for i, d in enumerate(docs):
      tf = d.count(t)
      out[i] += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
  return out


@pytest.mark.parametrize("k1,b", [(0.9, 0.4), (1.5, 0.75)])
def test_scores_equal_the_bm25_formula(k1, b):
  index = Bm25Index.build_text(CORPUS, Bm25Config(k1=k1, b=b))
  queries = ["london computing", "compiler", "zebra london", "born york navy", "unseen words"]
  scores, ids = index.search_text(queries, len(CORPUS))
  for q, sc, row in zip(queries, scores, ids, strict=True):
    want = bm25_by_hand(q, CORPUS, k1, b)
    np.testing.assert_allclose(sc, want[row], rtol=1e-5, atol=1e-6)
    # Best first; equal scores by the smaller row.
    np.testing.assert_array_equal(row, np.lexsort((np.arange(len(CORPUS)), -want)))
  assert list(ids[2][:2]) == [3, 4]  # The duplicate passages, tied.
  assert not scores[4].any()  # No known word: every passage scores 0.


def test_save_load_roundtrip_and_named_errors(tmp_path):
  index = make_text_index(CORPUS, "bm25", bm25_config=Bm25Config(k1=1.2, b=0.5))
  index.save(tmp_path / "bm25")
  loaded = load_index(tmp_path / "bm25")
  assert isinstance(loaded, Bm25Index) and loaded.config == Bm25Config(k1=1.2, b=0.5)
  for a, c in zip(index.search_text(["london zebra"], 4), loaded.search_text(["london zebra"], 4),
                  strict=True):
    np.testing.assert_array_equal(a, c)

  with pytest.raises(IndexNotBuiltError, match="build_text"):
    Bm25Index().search_text(["london"], 1)
  with pytest.raises(ValueError, match="k=7"):
    loaded.search_text(["london"], 7)
  with pytest.raises(TypeError, match="search_text"):
    loaded.search(np.zeros((1, 4), np.float32), 1)
  with pytest.raises(ValueError, match="passage texts"):
    make_index(np.zeros((3, 4), np.float32), "bm25")
  with pytest.raises(IndexFileError, match="no index directory"):
    load_index(tmp_path / "nowhere")
  (tmp_path / "bm25" / "bm25s" / "params.index.json").unlink()
  with pytest.raises(IndexFileError, match="params.index.json is missing"):
    load_index(tmp_path / "bm25")


class _Store:
  def __init__(self, texts):
    self.texts = texts

  def title(self, row):
    return ""

  def text(self, row):
    return self.texts[row]


def test_retriever_sends_text_to_a_bm25_index():
  """Retriever.search over BM25 decodes the question ids and returns the index's own scores
  (no question encoder runs: its embedding function would raise)."""
  tok = train_tokenizer(CORPUS + ["where was grace hopper born ?"], "word")
  index = Bm25Index.build_text(CORPUS)

  def no_encoder(*args):
    raise AssertionError("the question encoder must not run for BM25")

  retriever = Retriever(index, _Store(CORPUS), tok, no_encoder, max_length=16)
  ids, mask = retriever.tokenize(["where was grace hopper born ?", "compiler"])
  scores, rows = retriever.search(ids, mask, 3)
  want_scores, want_rows = index.search_text(["where was grace hopper born ?", "compiler"], 3)
  np.testing.assert_array_equal(rows, want_rows)
  np.testing.assert_array_equal(scores, want_scores)
  assert rows[0, 0] == 2 and rows[1, 0] == 5


def test_hard_negatives_are_bm25s_best_passage_without_the_answer():
  index = Bm25Index.build_text(CORPUS)
  questions = ["turing born london computing", "ada lovelace born london"]
  answers = ["computing", "mathematician"]
  gold = np.array([1, 0])
  negatives = bm25_hard_negatives(index, questions, answers, gold, lambda r: CORPUS[r], depth=6)
  # Q0: rows by BM25 are 1 (gold), then 2 (contains "computing": skipped), then the first
  # passage without it. Q1: row 0 is gold; the next best passage without "mathematician".
  for q, a, g, neg in zip(questions, answers, gold, negatives, strict=True):
    _, rows = index.search_text([q], 6)
    want = next(r for r in rows[0] if r != g and a not in CORPUS[r])
    assert neg == want and a not in CORPUS[neg]
  assert negatives[0] != 2


@pytest.mark.parametrize("method", ["lucene", "bm25+"])
def test_top_k_selection_equals_sorting_every_passage(method):
  """search_text selects the top k in linear time; it equals the full sort of
  bm25s' dense scores of every passage (bit for bit, ties to the smaller row), for small k on a
  corpus of 3,000 passages over a small vocabulary (many ties), with a constant per-passage term
  (bm25+) and with queries matching fewer than k passages."""
  rng = np.random.default_rng(0)
  words = [f"w{i}" for i in range(60)] + [f"rare{i}" for i in range(5)]
  corpus = [" ".join(rng.choice(words[:60], rng.integers(3, 12))) for _ in range(3000)]
  corpus[17] += " rare0"
  corpus[2500] += " rare0 rare1"
  index = Bm25Index.build_text(corpus, Bm25Config(method=method))
  queries = [" ".join(rng.choice(words[:60], 3)) for _ in range(20)] + [
      "rare0", "rare1 rare0 w3", "nothing known here", "w5 w5 w7"]
  rows = np.arange(len(corpus))
  for k in (1, 5, 50):
    scores, ids = index.search_text(queries, k)
    for q, sc, row in zip(queries, scores, ids, strict=True):
      dense = index.scores(q)
      want = np.lexsort((rows, -dense))[:k]
      np.testing.assert_array_equal(row, want)
      np.testing.assert_array_equal(sc, dense[want])
  _, ids = index.search_text(["rare0"], 4)
  # The 2 passages with the word, then the lowest-numbered of the tied rest.
  assert set(ids[0][:2]) == {17, 2500} and list(ids[0][2:]) == [0, 1]
