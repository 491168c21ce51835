"""Host-side retrieval for each training batch, as the reference retrieves inside every forward.

For a batch of questions: q(x) with the CURRENT question-encoder parameters (jitted), the frozen
index's top-n passages (exact or ScaNN, rag_jax.retrieval), their stored embeddings d(z) (exact
float32, whatever the index approximated), and the generator inputs joined from token ids
(rag_jax.data.contexts.ContextAssembler; each passage's part tokenized once and cached). The
result has static shapes and enters the jitted train step as arrays; doc_scores = q(x) . d(z) are
recomputed inside the step so that gradients reach the question encoder.

Over a text index (BM25, rag_jax.retrieval.bm25_index) the batch holds the index's scores as
"doc_scores" instead of "doc_embeds" (rag_jax.training.rag_step.SCORE_BATCH_KEYS): a fixed
retriever whose scores are the logits of p(z|x), the paper's "RAG-*-BM25" rows.

With an `encoder_table` (training the context encoder) the batch also holds the retrieved
passages' context-encoder inputs, "doc_input_ids" / "doc_attention_mask" [B, n, Lc], its rows.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

from rag_jax.data import contexts
from rag_jax.data.passage_table import EncoderTable
from rag_jax.data.qa import TokenizedQA
from rag_jax.models.rag import RagModel
from rag_jax.retrieval.index import TextIndex
from rag_jax.retrieval.retriever import Retriever, question_embedder


class RetrievalFeed:
  """Builds train-step batches (see rag_jax.training.rag_step) for rows of a TokenizedQA."""

  def __init__(self, model: RagModel, index: Any, store: Any, question_tokenizer: Any,
               generator_tokenizer: Any, n_docs: int, cache_size: int = 1_000_000,
               encoder_table: EncoderTable | None = None):
    self.index, self.store, self.n_docs = index, store, n_docs
    self.encoder_table = encoder_table
    self.question_tokenizer = question_tokenizer
    self._embed = question_embedder(model)
    self.retriever = Retriever(index, store, question_tokenizer, self._embed)
    self.assembler = contexts.ContextAssembler(
        generator_tokenizer, contexts.ContextFormat.from_rag_config(model.config))
    self._cache: OrderedDict[int, list[int]] = OrderedDict()
    self._cache_size = cache_size

  def swap_index(self, index: Any) -> None:
    """Searches `index` (a refreshed one over the same passages, rows = store rows) from now on;
    the question encoder and the caches of generator inputs stay."""
    if index.count != self.index.count:
      raise ValueError(f"a refreshed index of {index.count} passages for an index of "
                       f"{self.index.count}")
    self.index = index
    self.retriever = Retriever(index, self.store, self.question_tokenizer, self._embed)

  @property
  def fixed_doc_scores(self) -> bool:
    """True over a text index (BM25): batches carry its scores, not passage embeddings."""
    return isinstance(self.index, TextIndex)

  def _passage_ids(self, row: int) -> list[int]:
    """Token ids of passage `row`'s part of the generator input (LRU-cached)."""
    ids = self._cache.get(row)
    if ids is None:
      ids = self.assembler.passage_ids(self.store.title(row), self.store.text(row))
      self._cache[row] = ids
      if len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
    else:
      self._cache.move_to_end(row)
    return ids

  def retrieve(self, params: Any, input_ids: np.ndarray, attention_mask: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """(doc rows [B, n] int64, exact scores [B, n]) for the questions."""
    scores, rows = self.retriever.search(input_ids, attention_mask, self.n_docs, params)
    return rows, scores

  def batch(self, params: Any, data: TokenizedQA, rows: np.ndarray,
            weights: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The train-step batch for data rows `rows` [B], and the retrieved doc rows [B, n]."""
    ids, mask = data.input_ids[rows], data.attention_mask[rows]
    doc_rows, doc_scores = self.retrieve(params, ids, mask)
    questions = contexts.decode_questions(self.question_tokenizer, ids)
    ctx, ctx_mask = self.assembler.assemble(
        [[self._passage_ids(int(r)) for r in row] for row in doc_rows],
        [self.assembler.question_ids(q) for q in questions])
    b, n = doc_rows.shape
    batch = {
        "input_ids": ids, "attention_mask": mask,
        "context_input_ids": ctx.reshape(b, n, -1),  # [B*n, L] -> [B, n, L]
        "context_attention_mask": ctx_mask.reshape(b, n, -1),
        "labels": data.labels[rows],
        "weights": (np.ones(b, np.float32) if weights is None
                    else np.asarray(weights, np.float32)),
    }
    if self.fixed_doc_scores:
      batch["doc_scores"] = np.asarray(doc_scores, np.float32)  # [B, n]
    else:
      batch["doc_embeds"] = self.index.embeddings(doc_rows).astype(np.float32)  # [B, n, D]
    if self.encoder_table is not None:
      table = self.encoder_table
      batch["doc_input_ids"] = np.asarray(table.tokens[doc_rows], np.int32)  # [B, n, Lc]
      batch["doc_attention_mask"] = (np.arange(table.width) < np.asarray(
          table.lengths)[doc_rows][..., None]).astype(np.int32)  # [B, n, Lc]
    return batch, doc_rows
