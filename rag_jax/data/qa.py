"""Question-answer data in the reference's format and its tokenisation.

transformers' research example (finetune_rag.py) reads `DATA_DIR/{train,val,test}.source` and
`.target`: one example per line, aligned; an empty line is an error. Questions are encoded by the
question-encoder tokenizer (max_source_length), targets by the generator tokenizer as
`<s> answer </s>` padded (max_target_length); the targets are fed to the generator unshifted and
scored shifted left (rag_jax.losses).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np

from rag_jax.utils.errors import InputNotFoundError, UserError
from rag_jax.utils.textfile import utf8_error


class QAFormatError(UserError, ValueError):
  """A malformed source/target file; the message names the file and line."""


def _read_lines(path: Path) -> list[str]:
  if not path.is_file():
    raise InputNotFoundError(f"{path}: no such file")
  try:
    lines = path.read_text(encoding="utf-8").split("\n")
  except UnicodeDecodeError:
    line, message = utf8_error(path)
    raise QAFormatError(f"{path}:{line}: {message}") from None
  if lines and lines[-1] == "":
    lines.pop()  # The final newline.
  for i, line in enumerate(lines, start=1):
    if not line.strip():
      raise QAFormatError(f"{path}:{i}: empty line (one example per line)")
  return lines


def read_source_target(data_dir: str | os.PathLike, split: str) -> tuple[list[str], list[str]]:
  """(questions, answers) from DATA_DIR/split.source and split.target, checked aligned."""
  data_dir = Path(data_dir)
  sources = _read_lines(data_dir / f"{split}.source")
  targets = _read_lines(data_dir / f"{split}.target")
  if len(sources) != len(targets):
    raise QAFormatError(f"{data_dir / (split + '.source')} has {len(sources)} lines but "
                        f"{data_dir / (split + '.target')} has {len(targets)}")
  return sources, targets


@dataclasses.dataclass(frozen=True)
class TokenizedQA:
  """input_ids, attention_mask [N, Lq] (question encoder); labels [N, T] (generator), int32."""

  input_ids: np.ndarray
  attention_mask: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.input_ids)


def tokenize_qa(question_tokenizer: Any, generator_tokenizer: Any, questions: list[str],
                answers: list[str], max_source_length: int = 128,
                max_target_length: int = 25,
                decoder_start_token_id: int | None = None) -> TokenizedQA:
  """Fixed-shape (padded to the maximum lengths) ids, so the train step compiles once.

  decoder_start_token_id: None keeps the labels as the generator tokenizer writes them
  (`<s> answer </s>`, transformers' RAG fine-tuning recipe: the decoder reads `<s>` and must
  predict the answer's first token at position 0). Given, it is prepended to every label row
  (`<s> <s> answer </s>` with the world job's start id 0; max_target_length counts it), so the
  answer is predicted at position 1, after the start token, as generation reads it. A
  from-scratch BART learns to copy answers from passages near step 150 this way and not in 600
  steps the reference's way (docs/world.md).
  """
  q = question_tokenizer(questions, max_length=max_source_length, padding="max_length",
                         truncation=True)
  room = max_target_length - (decoder_start_token_id is not None)
  if room < 2:
    raise ValueError(f"max_target_length={max_target_length} leaves {room} label tokens after "
                     "the decoder start token; an answer needs at least <s> and </s>")
  t = generator_tokenizer(answers, max_length=room, padding="max_length", truncation=True)
  labels = np.asarray(t["input_ids"], np.int32)  # [N, room]
  if decoder_start_token_id is not None:
    start = np.full((len(labels), 1), decoder_start_token_id, np.int32)
    labels = np.concatenate([start, labels], axis=1)  # [N, max_target_length]
  return TokenizedQA(np.asarray(q["input_ids"], np.int32),
                     np.asarray(q["attention_mask"], np.int32), labels)
