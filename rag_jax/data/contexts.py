"""Generator inputs from retrieved passages, exactly as transformers' RAG builds them.

For question i and its j-th passage the reference (RagRetriever.postprocess_docs) builds

    (prefix + title + title_sep + text + doc_sep + question).replace("  ", " ")

where the title loses one leading and one trailing double quote, the question is the question-
encoder tokenizer's decode of the question ids (skip_special_tokens: lower-cased for uncased
BERT), and the generator tokenizer encodes the batch-major list (row i*n + j) with
`max_length=max_combined_length, padding="max_length", truncation=True`: long passages truncate
the question, which comes last.

Two paths give the same ids:
- `exact_context_inputs`: builds those strings and calls the tokenizer (the reference path);
- `ContextAssembler`: the training fast path. A passage's part `title / text //` is tokenized
  once (e.g. for the whole corpus) and a question's part ` question` once per question; a row is
  [specials] + passage part + question part, truncated and padded, with no string work per
  (question, passage) pair. The split sits at the space that opens the question, where the
  byte-level BPE pre-tokenizer always splits, and no run of spaces can straddle it (the passage
  part ends with doc_sep's last non-space character), so `.replace("  ", " ")` per part equals
  it on the whole string. tests/test_contexts.py checks equality on a corpus of edge cases.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class ContextFormat:
  """The RagConfig fields that shape generator inputs."""

  title_sep: str = " / "  # Between title and text.
  doc_sep: str = " // "  # Between text and question.
  prefix: str | None = None  # The generator config's prefix (None for BART).
  max_combined_length: int = 300  # Rows are truncated and padded to this many tokens.

  @classmethod
  def from_rag_config(cls, config: Any) -> ContextFormat:
    """From a rag_jax RagConfig (the generator's prefix, as the reference passes it)."""
    prefix = json.loads(config.generator.hf_extra).get("prefix")
    return cls(config.title_sep, config.doc_sep, prefix, config.max_combined_length)


def strip_title_quotes(title: str) -> str:
  """One leading and one trailing double quote removed, as the reference does."""
  return title.removeprefix('"').removesuffix('"')


def context_string(title: str, text: str, question: str, fmt: ContextFormat) -> str:
  """The reference's generator input string for one (question, passage) pair."""
  return ((fmt.prefix or "") + strip_title_quotes(title) + fmt.title_sep + text + fmt.doc_sep
          + question).replace("  ", " ")


def decode_questions(question_tokenizer: Any, input_ids: np.ndarray) -> list[str]:
  """The question strings the reference feeds the generator: decode of the question ids."""
  return [question_tokenizer.decode(list(row), skip_special_tokens=True)
          for row in np.asarray(input_ids)]


def exact_context_inputs(generator_tokenizer: Any, titles: Sequence[Sequence[str]],
                         texts: Sequence[Sequence[str]], questions: Sequence[str],
                         fmt: ContextFormat) -> tuple[np.ndarray, np.ndarray]:
  """Reference path: titles/texts [B][n] and questions [B] -> ids, mask [B*n, L] int32."""
  strings = [context_string(title, text, q, fmt)
             for q, row_titles, row_texts in zip(questions, titles, texts, strict=True)
             for title, text in zip(row_titles, row_texts, strict=True)]
  enc = generator_tokenizer(strings, max_length=fmt.max_combined_length, padding="max_length",
                            truncation=True)
  return (np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32))


class ContextAssembler:
  """The fast path: passage parts tokenized once, rows joined as token ids (see module doc)."""

  def __init__(self, generator_tokenizer: Any, fmt: ContextFormat):
    if not fmt.doc_sep.endswith(" "):
      raise ValueError(f"the fast path splits at doc_sep's trailing space; doc_sep "
                       f"{fmt.doc_sep!r} has none (use exact_context_inputs)")
    if getattr(generator_tokenizer, "add_prefix_space", False):
      raise ValueError("the fast path needs a tokenizer without add_prefix_space")
    self.tokenizer = generator_tokenizer
    self.fmt = fmt
    self._sep_head = fmt.doc_sep.rstrip(" ")
    self._sep_tail = fmt.doc_sep[len(self._sep_head):]
    probe = "a"
    with_specials = generator_tokenizer(probe)["input_ids"]
    content = generator_tokenizer(probe, add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(with_specials))
                 if with_specials[i:i + len(content)] == content)
    self.head = list(with_specials[:start])  # e.g. [<s>]
    self.tail = list(with_specials[start + len(content):])  # e.g. [</s>]
    self.pad_id = generator_tokenizer.pad_token_id

  def _encode(self, s: str) -> list[int]:
    return self.tokenizer(s.replace("  ", " "), add_special_tokens=False)["input_ids"]

  def passage_ids(self, title: str, text: str) -> list[int]:
    """Token ids of `prefix + title + title_sep + text + doc_sep-without-trailing-space`."""
    fmt = self.fmt
    return self._encode((fmt.prefix or "") + strip_title_quotes(title) + fmt.title_sep + text
                        + self._sep_head)

  def question_ids(self, question: str) -> list[int]:
    """Token ids of `doc_sep's trailing space + question`."""
    return self._encode(self._sep_tail + question)

  def assemble(self, passage_ids: Sequence[Sequence[Sequence[int]]],
               question_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """passage_ids [B][n] token lists, question_ids [B] -> ids, mask [B*n, L] int32."""
    length = self.fmt.max_combined_length
    room = length - len(self.head) - len(self.tail)
    rows = [self.head + (list(p) + list(q))[:room] + self.tail
            for q, ps in zip(question_ids, passage_ids, strict=True) for p in ps]
    ids = np.full((len(rows), length), self.pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for r, row in enumerate(rows):
      ids[r, :len(row)], mask[r, :len(row)] = row, 1
    return ids, mask
