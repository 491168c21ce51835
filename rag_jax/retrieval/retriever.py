"""The retriever: questions -> q(x) -> top-k rows of an index -> passages.

One object for every user of retrieval: answering (rag_jax.answer), host-side retrieval during
training (rag_jax.training.retrieval_feed, with the current parameters), evaluation and the
search command. It holds a question encoder's embedding function, its tokenizer, an index
(rag_jax.retrieval.backends) and the passage store the index's rows point into.

Over a text index (BM25, rag_jax.retrieval.bm25_index) the query is the question's text, not
q(x): `search` decodes the question ids it is given (so every caller works unchanged), the
question encoder is not run and the scores are the index's own (BM25).

    retriever = Retriever.load("wiki_index", "dpr-question_encoder")
    hits = retriever.retrieve(["who wrote hamlet"], k=5)      # [[Hit, ...]] best first
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rag_jax import checkpoints
from rag_jax.models.bert import DPREncoder
from rag_jax.models.rag import RagModel
from rag_jax.retrieval.backends import load_index
from rag_jax.retrieval.exact import ExactIndex
from rag_jax.retrieval.index import Index, IndexDimensionError, IndexFileError, TextIndex, read_meta
from rag_jax.retrieval.merged import MergedIndex
from rag_jax.retrieval.scann_index import ScannIndex
from rag_jax.retrieval.store import PassageStore
from rag_jax.utils.errors import UserError, check_finite

log = logging.getLogger(__name__)

EmbedFn = Callable[[Any, np.ndarray, np.ndarray], jax.Array]


@dataclasses.dataclass(frozen=True)
class Hit:
  """One retrieved passage: its store row, exact inner-product score, id, title and text."""

  row: int
  score: float
  id: str
  title: str
  text: str


class QuestionError(UserError, ValueError):
  """A question that cannot be asked (empty or blank); the message says which one."""


@dataclasses.dataclass(frozen=True)
class QuestionCheck:
  """What the question encoder will see of each question, before it runs.

  lengths: token count of each question with the tokenizer's special tokens, untruncated.
  max_length: the budget questions are truncated to (<= the encoder's positions).
  unknown: per question, the pieces of its text that became the tokenizer's unknown token
    (e.g. a name glued to "?" under a whole-word tokenizer); empty where none did.
  """

  lengths: tuple[int, ...]
  max_length: int
  unknown: tuple[tuple[str, ...], ...]

  @property
  def truncated(self) -> list[int]:
    """Indices of the questions longer than max_length (their tail is cut off)."""
    return [i for i, n in enumerate(self.lengths) if n > self.max_length]

  def truncation_warning(self) -> str | None:
    """One line naming the truncated questions and their lengths, or None."""
    if not self.truncated:
      return None
    return (f"{len(self.truncated)} of {len(self.lengths)} questions exceed the question "
            f"encoder's {self.max_length} tokens and were truncated to them (question(s) "
            f"{', '.join(str(i + 1) for i in self.truncated)}: "
            f"{', '.join(str(self.lengths[i]) for i in self.truncated)} tokens)")

  def unknown_warnings(self) -> list[str]:
    """One line per question holding unknown tokens, naming the text they replaced."""
    return [f"question {i + 1}: {len(pieces)} unknown token(s) for the question encoder's "
            f"tokenizer ({', '.join(repr(p) for p in pieces)}); retrieval cannot use them "
            "(a word glued to punctuation? separate it with a space)"
            for i, pieces in enumerate(self.unknown) if pieces]


def check_questions(tokenizer: Any, questions: list[str], max_length: int) -> QuestionCheck:
  """Refuses empty or blank questions (QuestionError naming each) and measures the others: token
  lengths against `max_length`, and the text of every unknown token."""
  blank = [i + 1 for i, q in enumerate(questions) if not q.strip()]
  if blank:
    raise QuestionError(f"question(s) {blank} of {len(questions)} are empty or blank; "
                        "ask something (no question was answered)")
  unk = tokenizer.unk_token_id
  try:  # fast tokenizers give offsets, so an unknown token can be shown as the text it replaced
    enc = tokenizer(questions, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
  except (NotImplementedError, ValueError, TypeError):
    enc, offsets = tokenizer(questions), None
  seqs = enc["input_ids"]
  unknown = []
  for i, seq in enumerate(seqs):
    if unk is None:
      unknown.append(())
    elif offsets is not None:
      unknown.append(tuple(questions[i][a:b] for t, (a, b) in zip(seq, offsets[i], strict=True)
                           if t == unk))
    else:
      unknown.append(tuple(str(tokenizer.unk_token) for t in seq if t == unk))
  return QuestionCheck(tuple(len(s) for s in seqs), max_length, tuple(unknown))


def tokenize_questions(tokenizer: Any, questions: list[str], max_length: int,
                       bucket: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Question-encoder ids and mask [Q, Lq] int32, Lq padded up to a multiple of `bucket` so
  that a jitted encoder compiles for a few lengths only (DPR pools [CLS]: padding is masked),
  but never past `max_length`: a padded position beyond the encoder's position table embeds as
  NaN, which masked attention still multiplies into every row."""
  seqs = tokenizer(questions, truncation=True, max_length=max_length)["input_ids"]
  length = min(-(-max(len(s) for s in seqs) // bucket) * bucket, max_length)
  ids = np.full((len(seqs), length), tokenizer.pad_token_id or 0, np.int32)  # [Q, Lq]
  mask = np.zeros_like(ids)
  for i, s in enumerate(seqs):
    ids[i, :len(s)], mask[i, :len(s)] = s, 1
  return ids, mask


def question_embedder(model: DPREncoder | RagModel) -> EmbedFn:
  """Jitted q(x): (params, ids [Q, L], mask [Q, L]) -> [Q, D] float32, for a DPR question
  encoder (its params) or a RAG model (the whole RAG params; its question encoder runs)."""
  if isinstance(model, RagModel):
    return jax.jit(lambda params, ids, mask: model.apply(
        {"params": params}, ids, mask, method=model.embed_questions))
  if isinstance(model, DPREncoder):
    return jax.jit(lambda params, ids, mask: model.apply(
        {"params": params}, ids, mask).pooler_output)
  raise TypeError(f"a question encoder is a DPREncoder or a RagModel, not {type(model).__name__}")


class Retriever:
  """A question encoder (embedding function + parameters + tokenizer) over an index and store.

  Args:
    index: a built or loaded index whose rows are the store's rows (or a MergedIndex: every
      search collective).
    store: the passages.
    tokenizer: the question encoder's tokenizer.
    embed: q(x) as made by :func:`question_embedder`.
    params: the encoder's parameters (each call may pass others, e.g. during training).
    max_length: question token budget; None: the encoder's positions.
    positions: the encoder's max_position_embeddings. A budget above it is lowered to it: a
      position past the table would embed as NaN and poison every score of the batch.
  """

  def __init__(self, index: Index | MergedIndex, store: PassageStore, tokenizer: Any,
               embed: EmbedFn, params: Any = None, max_length: int | None = 128,
               positions: int | None = None):
    self.index, self.store, self.tokenizer = index, store, tokenizer
    self.embed_fn, self.params = embed, params
    if max_length is None and positions is None:
      raise ValueError("give max_length or the encoder's positions")
    budgets = [n for n in (max_length, positions) if n is not None]
    self.max_length = min(budgets)
    if max_length is not None and positions is not None and max_length > positions:
      log.info("question budget %d lowered to the question encoder's %d positions", max_length,
               positions)

  @classmethod
  def load(cls, directory: str | os.PathLike, question_encoder: str | os.PathLike,
           tokenizer: str | os.PathLike | None = None, max_length: int = 128,
           merged: bool = False, **index_kwargs: Any) -> Retriever:
    """A DPRQuestionEncoder directory over an index directory written by build_index
    (passages/ and index/). `merged` and `index_kwargs`: see :meth:`over_directory`."""
    model, params = checkpoints.load_pretrained(question_encoder)
    tok = checkpoints.load_tokenizer(tokenizer or question_encoder)
    return cls.over_directory(directory, model, params, tok, max_length, merged=merged,
                              **index_kwargs)

  @classmethod
  def over_directory(cls, directory: str | os.PathLike, model: DPREncoder | RagModel,
                     params: Any, tokenizer: Any, max_length: int = 128, merged: bool = False,
                     **index_kwargs: Any) -> Retriever:
    """`model`'s question encoder over directory/index and directory/passages; refuses an
    index whose vectors have another dimension than the encoder's. max_length: question token
    budget (more than the encoder's positions: its positions). `index_kwargs` go to load_index
    (e.g. mesh= for exact).

    merged: on several processes, an exact or ScaNN index is one index per process over its
    block of rows (MergedIndex.load; every search is then collective: every process searches
    the same questions); on one process, or for a BM25 index, the saved index as it is."""
    directory = Path(directory)
    if not (directory / "passages" / "store.json").exists():
      raise IndexFileError(
          f"{directory}: not an index directory (no passages/store.json; python -m "
          "rag_jax.commands.build_index writes passages/ and index/)")
    if merged and jax.process_count() > 1 and read_meta(directory / "index")["type"] in (
        ExactIndex.kind, ScannIndex.kind):
      index = MergedIndex.load(directory / "index")
    else:
      index = load_index(directory / "index", **index_kwargs)
    encoder_config = model.config.question_encoder if isinstance(model, RagModel) else model.config
    dim = encoder_config.embedding_dim
    if not isinstance(index, TextIndex) and index.dim != dim:
      raise IndexDimensionError(
          f"{directory / 'index'} holds {index.dim}-d passage embeddings but the question "
          f"encoder gives {dim}-d vectors; was the index built with another encoder?")
    return cls(index, PassageStore(directory / "passages"), tokenizer, question_embedder(model),
               params, max_length, encoder_config.max_position_embeddings)

  def check(self, questions: list[str]) -> QuestionCheck:
    """See :func:`check_questions` (raises QuestionError for an empty or blank question)."""
    return check_questions(self.tokenizer, questions, self.max_length)

  def tokenize(self, questions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Question ids and mask [Q, Lq] int32 (see :func:`tokenize_questions`), after
    :meth:`check`: an empty question is refused, and truncation logs one warning naming how
    many questions lost their tail."""
    check = self.check(questions)
    if check.truncated:
      log.warning("%s", check.truncation_warning())
    return tokenize_questions(self.tokenizer, questions, self.max_length)

  def embed(self, ids: np.ndarray, mask: np.ndarray, params: Any = None) -> np.ndarray:
    """q(x) [Q, D] float32 on the host (`params` default: the retriever's own)."""
    return np.asarray(self.embed_fn(self.params if params is None else params, ids, mask),
                      np.float32)

  def search(self, ids: np.ndarray, mask: np.ndarray, k: int, params: Any = None,
             complete: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(exact scores [Q, k] float32, store rows [Q, k] int64), best first (a text index: its
    scores, from the decoded questions).

    complete: refuse a result with fewer than k passages for some question (an approximate
    index may find fewer; RAG needs exactly k).
    """
    if isinstance(self.index, TextIndex):  # BM25: the questions' words, not q(x).
      texts = self.tokenizer.batch_decode(np.where(mask > 0, ids, self.tokenizer.pad_token_id),
                                          skip_special_tokens=True)
      scores, rows = self.index.search_text(texts, k)
    else:
      scores, rows = self.index.search(self.embed(ids, mask, params), k)
    if complete and (rows < 0).any():
      raise ValueError(f"the index returned fewer than k={k} passages for some question")
    check_finite(np.where(rows >= 0, scores, 0.0),
                 "doc scores q(x) . d(z) of the retrieved passages (one row per question)")
    return scores, rows

  def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[list[Hit]]:
    """The passages of search results, one list per question (rows of -1 left out)."""
    out = []
    for sc, rw in zip(scores, rows, strict=True):
      row_hits = []
      for s, r in zip(sc, rw, strict=True):
        if r >= 0:
          p = self.store[int(r)]
          row_hits.append(Hit(int(r), float(s), p.id, p.title, p.text))
      out.append(row_hits)
    return out

  def retrieve(self, questions: list[str], k: int = 5) -> list[list[Hit]]:
    """Top-k :class:`Hit` lists, best first, one per question."""
    ids, mask = self.tokenize(questions)
    return self.hits(*self.search(ids, mask, k, complete=False))
