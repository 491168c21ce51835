"""Host-side retrieval for each training batch, as the reference retrieves inside every forward.

For a batch of questions: q(x) with the CURRENT question-encoder parameters (jitted), the frozen
index's top-n passages (exact or ScaNN, rag_jax.retrieval), their stored embeddings d(z) (exact
float32, whatever the index approximated), and the generator inputs joined from token ids
(rag_jax.data.contexts.ContextAssembler; each passage's part tokenized once and cached). The
result has static shapes and enters the jitted train step as arrays; doc_scores = q(x) . d(z) are
recomputed inside the step so that gradients reach the question encoder.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import jax
import numpy as np

from rag_jax.data import contexts
from rag_jax.data.qa import TokenizedQA
from rag_jax.models.rag import RagModel


class RetrievalFeed:
  """Builds train-step batches (see rag_jax.training.rag_step) for rows of a TokenizedQA."""

  def __init__(self, model: RagModel, index: Any, store: Any, question_tokenizer: Any,
               generator_tokenizer: Any, n_docs: int, cache_size: int = 1_000_000):
    self.index, self.store, self.n_docs = index, store, n_docs
    self.question_tokenizer = question_tokenizer
    self.assembler = contexts.ContextAssembler(
        generator_tokenizer, contexts.ContextFormat.from_rag_config(model.config))
    self._cache: OrderedDict[int, list[int]] = OrderedDict()
    self._cache_size = cache_size
    self._embed = jax.jit(lambda params, ids, mask: model.apply(
        {"params": params}, ids, mask, method=model.embed_questions))

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

  def question_embeddings(self, params: Any, input_ids: np.ndarray,
                          attention_mask: np.ndarray) -> np.ndarray:
    """q(x) [B, D] float32 on the host, from the full RAG params."""
    return np.asarray(self._embed(params, input_ids, attention_mask), np.float32)

  def retrieve(self, params: Any, input_ids: np.ndarray, attention_mask: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """(doc rows [B, n] int64, exact scores [B, n]) for the questions."""
    q = self.question_embeddings(params, input_ids, attention_mask)
    scores, rows = self.index.search(q, self.n_docs)
    if (rows < 0).any():
      raise ValueError(f"the index returned fewer than n_docs={self.n_docs} passages")
    return rows, scores

  def batch(self, params: Any, data: TokenizedQA, rows: np.ndarray,
            weights: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The train-step batch for data rows `rows` [B], and the retrieved doc rows [B, n]."""
    ids, mask = data.input_ids[rows], data.attention_mask[rows]
    doc_rows, _ = self.retrieve(params, ids, mask)
    doc_embeds = self.index.embeddings(doc_rows).astype(np.float32)  # [B, n, D]
    questions = contexts.decode_questions(self.question_tokenizer, ids)
    ctx, ctx_mask = self.assembler.assemble(
        [[self._passage_ids(int(r)) for r in row] for row in doc_rows],
        [self.assembler.question_ids(q) for q in questions])
    b, n = doc_rows.shape
    batch = {
        "input_ids": ids, "attention_mask": mask,
        "context_input_ids": ctx.reshape(b, n, -1),  # [B*n, L] -> [B, n, L]
        "context_attention_mask": ctx_mask.reshape(b, n, -1),
        "doc_embeds": doc_embeds, "labels": data.labels[rows],
        "weights": (np.ones(b, np.float32) if weights is None
                    else np.asarray(weights, np.float32)),
    }
    return batch, doc_rows
