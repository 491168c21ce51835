"""The evaluation loop: questions in fixed-shape batches -> predictions.jsonl, resumable.

`run_loop(examples, predict, path, batch_size)` calls `predict` on batches of exactly
`batch_size` examples (the last batch padded by repeating its last example, so that jitted
retrieval and decoding compile once; a predictor reads each example's own answers, never a
table keyed by question text, as one question may appear twice with other answers), shows a
progress bar (questions/s, ETA), and appends one JSON line per question to `path` after each
batch (flushed). A killed evaluation started again with the same file skips the questions
already written (a last line without its newline, a write cut by a kill, is dropped and
answered again) and refuses a file whose questions are not the ones being evaluated, or that
holds a line that is not a complete record (named by line). Metrics are computed from the file
afterwards (rag_jax.evaluation.scoring), so they never depend on what stayed in memory.

On several processes (rag_jax.distributed) the batches left to answer are dealt round-robin:
process p answers batches p, p + P, ... (the same batches, padding included, as one process
answers) into `<path stem>.process-<p>.jsonl` beside `path`, resumable the same way; once every
process is done, process 0 writes their records into `path` in question order and deletes the
part files. `path`'s folder must be on a file system every process shares.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rag_jax.distributed import (
  barrier,
  describe,
  is_primary,
  on_primary,
  process_count,
  process_index,
)
from rag_jax.utils.atomic import atomic_file
from rag_jax.utils.errors import InputError

# Processes wait for each other's share this long (the slowest one's questions), and for
# process 0's merge.
SHARE_TIMEOUT_S = 7 * 24 * 3600
MERGE_TIMEOUT_S = 3600

# A batch of examples -> one record per example (JSON-ready: prediction, passages, ...).
PredictFn = Callable[[list["EvalExample"]], list[dict[str, Any]]]
# (prediction, example) -> whether it is correct (None: the task has no per-question verdict).
CorrectFn = Callable[[str, "EvalExample"], bool | None]


@dataclasses.dataclass(frozen=True)
class EvalExample:
  """One evaluation question with its references.

  answers: every gold output (QA: answers or CuratedTrec regexes; generation: references;
    FEVER: the label target).
  titles: gold Wikipedia titles when the task has them (precision@k).
  gold_ids: gold passage ids when known (the synthetic world: id recall@k).
  """

  question: str
  answers: tuple[str, ...]
  id: str | None = None
  titles: tuple[str, ...] = ()
  gold_ids: tuple[str, ...] = ()


def gold_fields(example: EvalExample) -> dict[str, Any]:
  """The gold retrieval fields a record carries when the task has them."""
  out: dict[str, Any] = {}
  if example.titles:
    out["gold_titles"] = list(example.titles)
  if example.gold_ids:
    out["gold_ids"] = list(example.gold_ids)
  return out


def read_predictions(path: str | os.PathLike, truncate_partial: bool = False
                     ) -> list[dict[str, Any]]:
  """The complete records of a predictions.jsonl ([] when absent).

  A last line without its newline is a write cut by a kill (the loop writes whole lines): it is
  left out, and with truncate_partial cut from the file, so that its question is answered again.
  A complete line that is not a JSON record, or whose gold `answers` are not a list of strings
  (a damaged or foreign file), is refused by file:line: resuming past it would mix its
  questions' results with guesses, and a str would be scored letter by letter.
  """
  path = Path(path)
  if not path.exists():
    return []
  data = path.read_bytes()
  complete = data[:data.rfind(b"\n") + 1]
  records = []
  for number, line in enumerate(complete.splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise InputError(f"{path}:{number}: not a prediction record ({_reason(e)}); the file is "
                       "damaged: delete it (or its folder) to evaluate again") from None
    if not isinstance(record, dict):
      raise InputError(f"{path}:{number}: not a prediction record (a JSON "
                       f"{type(record).__name__}, not an object); the file is damaged: delete "
                       "it (or its folder) to evaluate again")
    answers = record.get("answers", [])
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
      raise InputError(f"{path}:{number}: answers {str(answers)[:40]!r} is not a list of "
                       "strings; the file is damaged: delete it (or its folder) to evaluate "
                       "again")
    records.append(record)
  if truncate_partial and len(complete) != len(data):
    with path.open("r+b") as f:
      f.truncate(len(complete))
  return records


def _reason(error: UnicodeDecodeError | json.JSONDecodeError) -> str:
  if isinstance(error, UnicodeDecodeError):
    return f"not UTF-8 at byte {error.start}"
  return f"invalid JSON at column {error.colno}: {error.msg}"


def run_loop(examples: Sequence[EvalExample], predict: PredictFn, path: str | os.PathLike,
             batch_size: int, *, correct: CorrectFn | None = None, desc: str = "evaluate",
             progress: bool = True) -> list[dict[str, Any]]:
  """Predicts every example not yet in `path` and returns all records, in order.

  Each record: index, question, id, answers (gold), the predictor's fields, and `correct`
  (correct(prediction, example) when given and the record has a prediction). Several
  processes: each answers its share (module docstring); every one returns all records.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  done = read_predictions(path, truncate_partial=is_primary())
  if len(done) > len(examples):
    raise InputError(f"{path} holds {len(done)} predictions for {len(examples)} questions; "
                     "use another --workdir or delete it")
  for i, record in enumerate(done):
    if record.get("question") != examples[i].question:
      raise InputError(f"{path}:{i + 1}: written for question {record.get('question')!r}, not "
                       f"{examples[i].question!r}: another evaluation's file; use another "
                       "--workdir or delete it")
  starts = list(range(len(done), len(examples), batch_size))
  if process_count() == 1:
    return done + answer_batches(examples, predict, path, starts, batch_size, correct, desc,
                                 progress, initial=len(done))
  mine = starts[process_index()::process_count()]
  part = part_path(path, process_index())
  kept, batches = resumable(read_predictions(part, truncate_partial=True), examples, mine,
                            batch_size)
  with atomic_file(part) as f:  # the whole batches of this share already answered
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept).encode())
  answer_batches(examples, predict, part, mine[batches:], batch_size, correct, desc,
                 progress and is_primary(), initial=len(done) + len(kept))
  logging.getLogger(__name__).info("%s: answered %d batch(es) of %s (%d kept from an earlier "
                                   "run)", describe(), len(mine) - batches, path, batches)
  barrier(f"eval/{path.parent.name}/answered", SHARE_TIMEOUT_S)
  on_primary(f"eval/{path.parent.name}/merged",
             lambda: merge_parts(path, done, len(examples)), MERGE_TIMEOUT_S)
  return read_predictions(path)


def part_path(path: Path, process: int) -> Path:
  """Where process `process` writes its share of `path`'s records."""
  return path.with_name(f"{path.stem}.process-{process}{path.suffix}")


def resumable(records: list[dict[str, Any]], examples: Sequence[EvalExample],
              starts: Sequence[int], batch_size: int) -> tuple[list[dict[str, Any]], int]:
  """(the records of a part file that answer, in order, the first whole batches of `starts`,
  how many batches they are); a part file of another share, or a batch cut by a kill, is
  answered again."""
  kept, batches = [], 0
  for start in starts:
    stop = min(start + batch_size, len(examples))
    batch = records[len(kept):len(kept) + stop - start]
    if [(r.get("index"), r.get("question")) for r in batch] != [
        (i, examples[i].question) for i in range(start, stop)]:
      break
    kept += batch
    batches += 1
  return kept, batches


def merge_parts(path: Path, done: list[dict[str, Any]], count: int) -> None:
  """Process 0: `done` then every process's part records, in question order, into `path`
  (atomically), and the part files deleted."""
  parts = sorted(path.parent.glob(f"{path.stem}.process-*{path.suffix}"))
  by_index = {r["index"]: r for part in parts for r in read_predictions(part)}
  missing = [i for i in range(len(done), count) if i not in by_index]
  if missing:
    raise InputError(f"{path}: no process answered question(s) {missing[:10]} (part files "
                     f"{[p.name for p in parts]}); run the evaluation again")
  records = done + [by_index[i] for i in range(len(done), count)]
  with atomic_file(path) as f:
    f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
  for part in parts:
    part.unlink()


def answer_batches(examples: Sequence[EvalExample], predict: PredictFn, path: Path,
                   starts: Sequence[int], batch_size: int, correct: CorrectFn | None, desc: str,
                   progress: bool, initial: int) -> list[dict[str, Any]]:
  """Answers the batches beginning at `starts`, appending their records to `path`."""
  records = []
  with path.open("a", encoding="utf-8") as f, tqdm(
      total=len(examples), initial=initial, desc=desc, unit="question", dynamic_ncols=True,
      disable=not progress) as bar:
    for start in starts:
      chunk = list(examples[start:start + batch_size])
      outputs = predict(chunk + [chunk[-1]] * (batch_size - len(chunk)))[:len(chunk)]
      lines = []
      for i, (example, output) in enumerate(zip(chunk, outputs, strict=True)):
        record = {"index": start + i, "question": example.question, "id": example.id,
                  "answers": list(example.answers), **gold_fields(example), **output}
        if correct is not None and "prediction" in record:
          record["correct"] = correct(record["prediction"], example)
        records.append(record)
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
      f.write("".join(lines))
      f.flush()
      bar.update(len(chunk))
  return records
