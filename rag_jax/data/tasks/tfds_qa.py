"""Open-domain QA splits from tensorflow-datasets, where TFDS has the paper's dataset.

  natural_questions_open           {"question", "answer": [str]}  (NQ-open, Lee et al. 2019)
  trivia_qa/unfiltered.nocontext   {"question", "question_id", "answer": {"value", "aliases", ...}}

WebQuestions and CuratedTrec are not in tensorflow-datasets 4.9.10; read DPR's files for them
(rag_jax.data.tasks.read_dpr_qa_csv / read_curatedtrec). Nothing here downloads: the dataset must
have been prepared in data_dir (`tfds build NAME --data_dir=DIR --file_format=array_record`).
Data prepared as array_record is read with `as_data_source` (no TensorFlow needed); data prepared
in TFDS's default tfrecord format is read with `as_dataset(...).as_numpy_iterator()`, which needs
TensorFlow installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from rag_jax.data.tasks.common import TaskExample, TaskSplit
from rag_jax.utils.errors import UserError


class TaskDataNotPrepared(UserError, FileNotFoundError):
  """The TFDS dataset is not prepared in data_dir; the message names the `tfds build` command."""


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _texts(values: Iterable[Any]) -> list[str]:
  return [_text(v) for v in values]


def _nq_open(row: Mapping[str, Any]) -> TaskExample:
  return TaskExample(_text(row["question"]), tuple(_texts(row["answer"])))


def _trivia_qa(row: Mapping[str, Any]) -> TaskExample:
  """The answer's `value` first (first_answer picks it), then its aliases, de-duplicated."""
  answer = row["answer"]
  targets = dict.fromkeys([_text(answer["value"]), *_texts(answer["aliases"])])
  return TaskExample(_text(row["question"]), tuple(t for t in targets if t.strip()),
                     id=_text(row["question_id"]))


TFDS_QA_TASKS: Mapping[str, Callable[[Mapping[str, Any]], TaskExample]] = {
    "natural_questions_open": _nq_open,
    "trivia_qa/unfiltered.nocontext": _trivia_qa,
}
_NOT_IN_TFDS = {"web_questions": "webq-*.qa.csv", "curated_trec": "curatedtrec-*.qa.csv"}


def _build_command(name: str, data_dir: str | os.PathLike | None) -> str:
  where = f" --data_dir={data_dir}" if data_dir is not None else ""
  return f"tfds build {name}{where} --file_format=array_record"


def read_tfds_qa(name: str, split: str, data_dir: str | os.PathLike | None = None,
                 limit: int | None = None) -> TaskSplit:
  """The (question, answers) examples of a prepared TFDS QA dataset split.

  name: a key of TFDS_QA_TASKS; split: a TFDS split ("train", "validation", "test", or a slice
  such as "train[:100]"); limit: read only the first `limit` examples. NQ-open's "validation"
  is the set DPR and the paper call NQ's test set; TriviaQA's is the "standard" (DPR) test set
  (paper App. D). Raises TaskDataNotPrepared, naming the `tfds build` command, when the data is
  not in data_dir.
  """
  if name in _NOT_IN_TFDS:
    raise ValueError(f"{name} is not in tensorflow-datasets; read DPR's {_NOT_IN_TFDS[name]} with "
                     "rag_jax.data.tasks.read_dpr_qa_csv")
  if name not in TFDS_QA_TASKS:
    raise ValueError(f"unknown TFDS QA task {name!r}; known: {sorted(TFDS_QA_TASKS)}")
  import tensorflow_datasets as tfds  # deferred: a slow import, needed by this reader only

  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise TaskDataNotPrepared(
        f"{name} {builder.version} is not prepared in {builder.data_dir_root}; prepare it with "
        f"`{_build_command(name, data_dir)}` (downloads the data once)")
  convert = TFDS_QA_TASKS[name]
  if builder.info.file_format in (tfds.core.FileFormat.ARRAY_RECORD, tfds.core.FileFormat.PARQUET):
    source = builder.as_data_source(split=split)
    n = len(source) if limit is None else min(limit, len(source))
    rows: Iterable[Mapping[str, Any]] = (source[i] for i in range(n))
  else:
    try:
      import tensorflow  # noqa: F401  (as_dataset needs it)
    except ImportError as e:
      raise TaskDataNotPrepared(
          f"{name} is prepared as {builder.info.file_format.value}, which needs TensorFlow to "
          f"read; install tensorflow or rebuild with `{_build_command(name, data_dir)}`") from e
    dataset = builder.as_dataset(split=split)
    if limit is not None:
      dataset = dataset.take(limit)
    rows = dataset.as_numpy_iterator()
  examples = tuple(convert(row) for row in rows)
  return TaskSplit(examples, f"tfds:{name}/{split}")
