"""What every task reader returns, its errors, and the paper's App. D preprocessing helpers."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from rag_jax.data import qa
from rag_jax.utils.errors import InputError

logger = logging.getLogger(__name__)


class TaskFileError(InputError):
  """A malformed task file or record; the message starts with "FILE:LINE:" (or the record key)."""

  def __init__(self, path: str | os.PathLike, where: int | str | None, message: str):
    self.path, self.where = str(path), where
    super().__init__(f"{path}:{where}: {message}" if where is not None else f"{path}: {message}")


@dataclasses.dataclass(frozen=True)
class TaskExample:
  """One example of a paper task.

  source:  the model input (question; Jeopardy: the answer entity; FEVER: the claim).
  targets: every gold output (QA: all gold answers, metrics take the max over them; generation:
           reference texts; FEVER: one label target). Training uses one target per example
           (expand_answers / first_answer).
  id:      the dataset's id when it has one.
  titles:  gold Wikipedia titles when the format carries them (FEVER KILT provenance).
  targets_are_regex: the targets are regular expressions (CuratedTrec), scored with
           rag_jax.metrics.regex_exact_match instead of exact_match.
  """

  source: str
  targets: tuple[str, ...]
  id: str | None = None
  titles: tuple[str, ...] = ()
  targets_are_regex: bool = False


@dataclasses.dataclass(frozen=True)
class TaskSplit(Sequence[TaskExample]):
  """The examples of one file/split and what was left out of them.

  skipped: malformed records left out because the reader was called with skip_malformed=True
           (skipped_at names each one as "FILE:LINE"); without the flag they raise TaskFileError.
  dropped: well-formed records left out by a flag that defines the task variant (MS-MARCO
           "No Answer Present.", FEVER 2-way's NOT ENOUGH INFO).
  """

  examples: tuple[TaskExample, ...]
  path: str
  skipped_at: tuple[str, ...] = ()
  dropped: int = 0

  @property
  def skipped(self) -> int:
    return len(self.skipped_at)

  def __len__(self) -> int:
    return len(self.examples)

  def __getitem__(self, i):  # Sequence protocol; slices return tuples.
    return self.examples[i]

  def __iter__(self) -> Iterator[TaskExample]:
    return iter(self.examples)


class Collector:
  """Gathers examples; raises or (skip_malformed) counts malformed records; logs the counts."""

  def __init__(self, path: str | os.PathLike, skip_malformed: bool):
    self.path, self.skip_malformed = str(path), skip_malformed
    self.examples: list[TaskExample] = []
    self.skipped_at: list[str] = []
    self.dropped = 0

  def malformed(self, where: int | str | None, message: str) -> None:
    error = TaskFileError(self.path, where, message)
    if not self.skip_malformed:
      raise error
    self.skipped_at.append(f"{self.path}:{where}")
    logger.warning("skipped %s", error)

  def done(self, drop_reason: str = "") -> TaskSplit:
    if self.skipped_at:
      logger.warning("%s: skipped %d malformed records", self.path, len(self.skipped_at))
    if self.dropped:
      logger.info("%s: dropped %d records (%s)", self.path, self.dropped, drop_reason)
    return TaskSplit(tuple(self.examples), self.path, tuple(self.skipped_at), self.dropped)


def read_source_target_task(data_dir: str | os.PathLike, split: str) -> TaskSplit:
  """The reference's DATA_DIR/{split}.source and .target files (rag_jax.data.qa), one target each.

  Malformed files raise rag_jax.data.qa.QAFormatError (empty line, unequal line counts, bytes
  that are not UTF-8), a missing one InputNotFoundError.
  """
  sources, targets = qa.read_source_target(data_dir, split)
  examples = tuple(TaskExample(s, (t,)) for s, t in zip(sources, targets, strict=True))
  return TaskSplit(examples, str(Path(data_dir) / f"{split}.source"))


def write_source_target(examples: Iterable[TaskExample], data_dir: str | os.PathLike,
                        split: str) -> int:
  """Writes examples with exactly one target each as DATA_DIR/{split}.source/.target.

  The format of transformers' finetune_rag.py and of read_source_target_task; use
  expand_answers or first_answer first. Returns the number of lines written.
  """
  sources, targets = [], []
  for i, ex in enumerate(examples):
    if len(ex.targets) != 1:
      raise ValueError(f"example {i} has {len(ex.targets)} targets; write needs exactly one "
                       "(expand_answers or first_answer)")
    for text in (ex.source, ex.targets[0]):
      if not text.strip() or "\n" in text or "\r" in text:
        raise ValueError(f"example {i}: {text!r} is empty or spans lines")
    sources.append(ex.source)
    targets.append(ex.targets[0])
  data_dir = Path(data_dir)
  data_dir.mkdir(parents=True, exist_ok=True)
  for suffix, lines in (("source", sources), ("target", targets)):
    (data_dir / f"{split}.{suffix}").write_text("".join(x + "\n" for x in lines), encoding="utf-8")
  return len(sources)


def expand_answers(examples: Iterable[TaskExample]) -> list[TaskExample]:
  """One training example per (question, answer) pair: the paper's NQ and WebQuestions recipe.

  "For Natural Questions and WebQuestions ... we use each (question, answer) annotation pair as a
  separate training example" (Lewis et al., 2020, App. D). Duplicate answers of one question
  stay duplicated, as they are separate annotations.
  """
  return [dataclasses.replace(ex, targets=(t,)) for ex in examples for t in ex.targets]


def first_answer(examples: Iterable[TaskExample]) -> list[TaskExample]:
  """The first gold answer as the only target: the TriviaQA training target used here.

  The paper (App. D) instead filters TriviaQA's answer candidates to those occurring in the
  top-1000 retrieved documents; that needs the index, so this keeps the dataset's first answer
  (for the tfds reader the answer `value`, for DPR's csv the first listed).
  """
  out = []
  for ex in examples:
    if not ex.targets:
      raise ValueError(f"example {ex.id or ex.source!r} has no targets")
    out.append(dataclasses.replace(ex, targets=ex.targets[:1]))
  return out
