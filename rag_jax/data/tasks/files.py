"""Readers for the public file formats of the paper's tasks (Lewis et al., 2020, §3).

  read_dpr_qa_csv        DPR's `*.qa.csv` (NQ, TriviaQA, WebQuestions; CuratedTrec regexes)
  read_msmarco_nlg       MS-MARCO v2.1 columnar JSON, NLG answers
  read_searchqa_jeopardy SearchQA JSON records as Jeopardy question generation (answer -> question)
  read_fever             FEVER claims, KILT jsonl or the original FEVER jsonl, 3-way or 2-way

Every reader returns a TaskSplit. A malformed record raises TaskFileError naming the file and
line (or record key); with skip_malformed=True it is left out instead and counted
(TaskSplit.skipped / skipped_at, also logged).
"""

from __future__ import annotations

import ast
import csv
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from rag_jax.data.tasks.common import Collector, TaskExample, TaskFileError, TaskSplit

NO_ANSWER = "No Answer Present."
FEVER_LABELS_3WAY = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")
FEVER_LABELS_2WAY = ("SUPPORTS", "REFUTES")
# The paper maps FEVER's labels to single output tokens (§3.4) without naming them. These are
# common English words that byte-level BPE vocabularies (BART's) hold as one token; confirm with
# the generator tokenizer you train (is_single_token) or pass your own label_targets.
FEVER_LABEL_TARGETS: Mapping[str, str] = {
    "SUPPORTS": "true", "REFUTES": "false", "NOT ENOUGH INFO": "unknown"}


def _require_file(path: str | os.PathLike) -> Path:
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file")
  return path


def read_dpr_qa_csv(path: str | os.PathLike, regex_answers: bool = False,
                    skip_malformed: bool = False) -> TaskSplit:
  """DPR's question files: `question<TAB>python-literal list of answers`, one per row, no header.

  The format of facebookresearch/DPR's nq-*.qa.csv, trivia-*.qa.csv, webq-*.qa.csv and
  curatedtrec-*.qa.csv, read as DPR reads them (csv.reader with delimiter "\\t") and the answers
  parsed with ast.literal_eval as transformers' eval_rag.py does. regex_answers=True marks the
  answers as regular expressions (CuratedTrec) on every example. A row is malformed when it
  does not have exactly two fields, the question is blank, or the answers are not a non-empty
  list of strings.
  """
  path = _require_file(path)
  out = Collector(path, skip_malformed)
  with path.open(encoding="utf-8", newline="") as f:
    reader = csv.reader(f, delimiter="\t")
    for row in reader:
      line = reader.line_num
      if len(row) != 2:
        out.malformed(line, f"expected 2 tab-separated fields (question, answers), got {len(row)}")
        continue
      question, answers_text = row
      try:
        answers = ast.literal_eval(answers_text)
      except (ValueError, SyntaxError) as e:
        out.malformed(line, f"answers {answers_text[:80]!r} are not a Python literal ({e})")
        continue
      if (not isinstance(answers, list | tuple) or not answers
          or not all(isinstance(a, str) for a in answers)):
        out.malformed(line, "answers must be a non-empty list of strings, got "
                      f"{answers_text[:80]!r}")
        continue
      if not question.strip():
        out.malformed(line, "empty question")
        continue
      out.examples.append(TaskExample(question, tuple(answers), targets_are_regex=regex_answers))
  return out.done()


def read_curatedtrec(path: str | os.PathLike, skip_malformed: bool = False) -> TaskSplit:
  """DPR's CuratedTrec file (curatedtrec-*.qa.csv / .tsv): answers are regexes (flagged so)."""
  return read_dpr_qa_csv(path, regex_answers=True, skip_malformed=skip_malformed)


def _load_json(path: Path) -> Any:
  try:
    with path.open(encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise TaskFileError(path, e.lineno, f"not JSON: {e.msg}") from e


def read_msmarco_nlg(path: str | os.PathLike, skip_no_answer: bool = False,
                     skip_malformed: bool = False) -> TaskSplit:
  """MS-MARCO v2.1 (train/dev) as natural-language generation: query -> well-formed answers.

  The file is one JSON object of columns keyed by record id: {"query": {id: text}, "answers":
  {id: [text, ...]}, "wellFormedAnswers": {id: [text, ...] or "[]"}, "query_id": {id: int}, ...}.
  The NLG targets are the well-formed answers when a record has any, else its answers (the
  paper uses MS-MARCO NLG v2.1 without the supplied passages, §3.2). Records whose only target is
  "No Answer Present." are kept unless skip_no_answer=True; then they are dropped and counted
  (TaskSplit.dropped). Record keys stand in for line numbers in errors.
  """
  path = _require_file(path)
  data = _load_json(path)
  if not isinstance(data, dict) or not isinstance(data.get("query"), dict):
    raise TaskFileError(path, None, 'expected the columnar v2.1 object with a "query" column')
  if not isinstance(data.get("answers"), dict):
    raise TaskFileError(path, None, 'no "answers" column (the public eval file has no answers)')
  well_formed = data.get("wellFormedAnswers") or {}
  query_ids = data.get("query_id") or {}
  out = Collector(path, skip_malformed)
  for key, query in data["query"].items():
    where = f"record {key}"
    wfa = well_formed.get(key)
    targets = wfa if isinstance(wfa, list) and wfa else data["answers"].get(key)
    if wfa is not None and not isinstance(wfa, list) and wfa != "[]":
      out.malformed(where, f"wellFormedAnswers {wfa!r} is neither a list nor '[]'")
      continue
    if not isinstance(query, str) or not query.strip():
      out.malformed(where, f"query {query!r} is not a non-empty string")
      continue
    if (not isinstance(targets, list) or not targets
        or not all(isinstance(t, str) and t.strip() for t in targets)):
      out.malformed(where, f"answers {targets!r} are not a non-empty list of strings")
      continue
    if skip_no_answer and all(t.strip() == NO_ANSWER for t in targets):
      out.dropped += 1
      continue
    qid = query_ids.get(key, key)
    out.examples.append(TaskExample(query, tuple(targets), id=str(qid)))
  return out.done(f'only "{NO_ANSWER}"')


def _json_records(path: Path) -> list[tuple[str | int, Any, str | None]]:
  """(where, record, error) from a .jsonl file (one object per line), a .json object or list of
  objects, or a directory of .json files (SearchQA's release: one question per file). error is
  a message for a line/file that is not JSON (record None), else None."""
  if path.is_dir():
    records = []
    for f in sorted(path.glob("*.json")):
      try:
        records.append((f.name, json.loads(f.read_text(encoding="utf-8")), None))
      except json.JSONDecodeError as e:
        records.append((f.name, None, f"not JSON: {e.msg} (line {e.lineno})"))
    return records
  path = _require_file(path)
  if path.suffix == ".jsonl":
    records = []
    with path.open(encoding="utf-8") as f:
      for i, line in enumerate(f, start=1):
        if not line.strip():
          records.append((i, None, "empty line (one JSON object per line)"))
          continue
        try:
          records.append((i, json.loads(line), None))
        except json.JSONDecodeError as e:
          records.append((i, None, f"not JSON: {e.msg}"))
    return records
  data = _load_json(path)
  items = data if isinstance(data, list) else [data]
  return [(f"record {i}", r, None) for i, r in enumerate(items)]


def _json_objects(path: Path, out: Collector) -> Iterator[tuple[str | int, dict]]:
  """(where, record) of each JSON object of `path`; an unreadable record or one that is not an
  object is reported to `out` as malformed (naming where) and skipped."""
  for where, record, error in _json_records(path):
    if error is not None:
      out.malformed(where, error)
    elif not isinstance(record, dict):
      out.malformed(where, f"expected a JSON object, got {type(record).__name__}")
    else:
      yield where, record


def read_searchqa_jeopardy(path: str | os.PathLike, skip_malformed: bool = False) -> TaskSplit:
  """Jeopardy question generation from SearchQA records: source = answer, target = question.

  SearchQA (Dunn et al., 2017) stores each Jeopardy! clue as a JSON object with "question" (the
  clue), "answer" (the entity), "category", "air_date", "search_results", ...; the paper
  generates the clue from the answer entity (§3.3) on SearchQA's splits. path: a .jsonl file, a
  .json file (one object or a list), or a directory of .json files (one record each).
  """
  path = Path(path)
  out = Collector(path, skip_malformed)
  for where, record in _json_objects(path, out):
    question, answer = record.get("question"), record.get("answer")
    if not (isinstance(question, str) and question.strip()
            and isinstance(answer, str) and answer.strip()):
      out.malformed(where, f"needs non-empty string 'question' and 'answer', got "
                    f"{question!r} / {answer!r}")
      continue
    rid = record.get("id")
    out.examples.append(TaskExample(answer, (question,), id=None if rid is None else str(rid)))
  return out.done()


def _fever_label(record: dict) -> tuple[str | None, tuple[str, ...]]:
  """(label, gold titles) of a KILT record ({"input", "output": [{"answer", "provenance"}]})
  or an original FEVER record ({"claim", "label", "evidence"})."""
  if "output" in record:
    outputs = record["output"] if isinstance(record["output"], list) else []
    labels = {o["answer"] for o in outputs if isinstance(o, dict) and "answer" in o}
    titles = [p.get("title") for o in outputs if isinstance(o, dict)
              for p in o.get("provenance") or [] if isinstance(p, dict) and p.get("title")]
    label = labels.pop() if len(labels) == 1 else None
    return label, tuple(dict.fromkeys(titles))
  return record.get("label"), ()


def read_fever(path: str | os.PathLike, num_classes: int = 3,
               label_targets: Mapping[str, str] = FEVER_LABEL_TARGETS,
               skip_malformed: bool = False) -> TaskSplit:
  """FEVER claims -> single-token label targets (paper §3.4), one jsonl record per line.

  Accepts KILT's fever-*-kilt.jsonl ({"id", "input": claim, "output": [{"answer": "SUPPORTS" |
  "REFUTES", "provenance": [...]}]}; gold titles kept from the provenance) and the original FEVER
  jsonl ({"id", "claim", "label": "SUPPORTS" | "REFUTES" | "NOT ENOUGH INFO", ...}). KILT's
  FEVER has no NOT ENOUGH INFO claims, so the 3-way task needs the original files.
  num_classes=3 keeps all three labels; num_classes=2 (Thorne & Vlachos's 2-way task) drops NOT
  ENOUGH INFO records, counted in TaskSplit.dropped. A record with no single label, an unknown
  label or no claim is malformed. targets = (label_targets[label],).
  """
  if num_classes not in (2, 3):
    raise ValueError(f"num_classes must be 2 or 3, got {num_classes}")
  labels = FEVER_LABELS_3WAY if num_classes == 3 else FEVER_LABELS_2WAY
  missing = [lb for lb in labels if lb not in label_targets]
  if missing:
    raise ValueError(f"label_targets has no target for {missing}")
  path = Path(path)
  out = Collector(path, skip_malformed)
  for where, record in _json_objects(path, out):
    claim = record.get("input", record.get("claim"))
    label, titles = _fever_label(record)
    if not isinstance(claim, str) or not claim.strip():
      out.malformed(where, "no claim ('input' or 'claim')")
      continue
    if label not in FEVER_LABELS_3WAY:
      out.malformed(where, f"label {label!r} is not one of {list(FEVER_LABELS_3WAY)}")
      continue
    if label not in labels:
      out.dropped += 1
      continue
    rid = record.get("id")
    out.examples.append(TaskExample(claim, (label_targets[label],),
                                    id=None if rid is None else str(rid), titles=titles))
  return out.done("NOT ENOUGH INFO in the 2-way task")


def is_single_token(tokenizer: Any, text: str) -> bool:
  """Whether a (transformers) tokenizer encodes `text` as one token, special tokens aside."""
  return len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1

