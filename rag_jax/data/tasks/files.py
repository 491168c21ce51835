"""Readers for the public file formats of the paper's tasks (Lewis et al., 2020, §3).

  read_dpr_qa_csv        DPR's `*.qa.csv` (NQ, TriviaQA, WebQuestions; CuratedTrec regexes)
  read_msmarco_nlg       MS-MARCO v2.1 columnar JSON, NLG answers
  read_searchqa_jeopardy SearchQA JSON records as Jeopardy question generation (answer -> question)
  read_fever             FEVER claims, KILT jsonl or the original FEVER jsonl, 3-way or 2-way

Every reader returns a TaskSplit. A malformed record raises TaskFileError naming the file and
line (or record key); with skip_malformed=True it is left out instead and counted
(TaskSplit.skipped / skipped_at, also logged). A file that is missing (InputNotFoundError), not
UTF-8 text (TaskFileError naming the line of the first bad byte), or whose rows cannot be told
apart (a DPR row running over several lines) is refused whatever skip_malformed says.
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
from rag_jax.utils.errors import InputError, InputNotFoundError
from rag_jax.utils.textfile import utf8_error

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
  if not path.exists():
    raise InputNotFoundError(f"{path}: no such file")
  if not path.is_file():
    raise InputError(f"{path}: not a file (a task file is one text file)")
  return path


def _not_utf8(path: Path) -> TaskFileError:
  """The error for a file whose decoding failed, naming the line of its first bad byte."""
  return TaskFileError(path, *utf8_error(path))


def _dpr_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
  """(line, fields) of each row of a DPR question file, read as DPR reads it (csv.reader with
  delimiter "\\t", quotes resolved) but one row per line.

  DPR's questions never span lines, so a row that does (a field opens a double quote that closes
  on a later line, or never) would silently merge the rows it swallowed: it raises TaskFileError
  naming its first line, as does a byte that is not UTF-8, whatever skip_malformed says.
  """
  with path.open(encoding="utf-8", newline="") as f:
    reader = csv.reader(f, delimiter="\t")
    line = 1
    while True:
      try:
        row = next(reader)
      except StopIteration:
        return
      except csv.Error as e:  # The field size limit, met by a quote left open.
        raise TaskFileError(path, line, f"unreadable row ({e}): a field opens a double quote that "
                            "does not close on its line") from None
      except UnicodeDecodeError:
        raise _not_utf8(path) from None
      end = reader.line_num
      if end > line or any("\n" in field or "\r" in field for field in row):
        closes = f"closes on line {end}" if end > line else "never closes"
        raise TaskFileError(
            path, line, f"a field opens a double quote that {closes}, which would merge rows into "
            "one; a row is one line (start a question with a quote only if it closes there)")
      yield line, row
      line = end + 1


def read_dpr_qa_csv(path: str | os.PathLike, regex_answers: bool = False,
                    skip_malformed: bool = False) -> TaskSplit:
  """DPR's question files: `question<TAB>python-literal list of answers`, one per row, no header.

  The format of facebookresearch/DPR's nq-*.qa.csv, trivia-*.qa.csv, webq-*.qa.csv and
  curatedtrec-*.qa.csv, read as DPR reads them (csv.reader with delimiter "\\t") and the answers
  parsed with ast.literal_eval as transformers' eval_rag.py does. regex_answers=True marks the
  answers as regular expressions (CuratedTrec) on every example. A row is malformed when it
  does not have exactly two fields, the question is blank, or the answers are not a non-empty
  Python list of strings. A row running over several lines is refused (see _dpr_rows).
  """
  path = _require_file(path)
  out = Collector(path, skip_malformed)
  for line, row in _dpr_rows(path):
    if len(row) != 2:
      out.malformed(line, f"expected 2 tab-separated fields (question, answers), got {len(row)}")
      continue
    question, answers_text = row
    if "\0" in question or "\0" in answers_text:
      out.malformed(line, "NUL byte; is it a binary file?")
      continue
    try:
      answers = ast.literal_eval(answers_text)
    except Exception as e:  # ValueError, TypeError ({["a"]: 1}), SyntaxError, RecursionError, ...
      out.malformed(line, f"answers {answers_text[:80]!r} are not a Python literal "
                    f"({type(e).__name__}: {e})")
      continue
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
      out.malformed(line, "answers must be a non-empty Python list of strings such as ['Paris'], "
                    f"got {answers_text[:80]!r}")
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
    raise TaskFileError(path, e.lineno, f"not JSON: {e.msg}") from None
  except UnicodeDecodeError:
    raise _not_utf8(path) from None
  except RecursionError:
    raise TaskFileError(path, None, "not JSON this reader can hold: nested too deeply") from None


def read_msmarco_nlg(path: str | os.PathLike, skip_no_answer: bool = False,
                     skip_malformed: bool = False, answers_fallback: bool = False) -> TaskSplit:
  """MS-MARCO v2.1 (train/dev) as natural-language generation: query -> well-formed answers.

  The file is one JSON object of columns keyed by record id: {"query": {id: text}, "answers":
  {id: [text, ...]}, "wellFormedAnswers": {id: [text, ...] or "[]"}, "query_id": {id: int}, ...}.
  MS-MARCO's NLG task is scored on the well-formed answers, so the targets are a record's
  wellFormedAnswers, and a record without any ("[]", the most of them) is left out and counted
  (TaskSplit.dropped). answers_fallback=True keeps those records too, with their `answers`
  (extractive spans, not the NLG task) as targets. Records whose only target is "No Answer
  Present." are kept unless skip_no_answer=True; then they are dropped and counted too (the paper
  uses MS-MARCO NLG v2.1 without the supplied passages, §3.2). Record keys stand in for line
  numbers in errors.
  """
  path = _require_file(path)
  data = _load_json(path)
  if not isinstance(data, dict) or not isinstance(data.get("query"), dict):
    raise TaskFileError(path, None, 'expected the columnar v2.1 object with a "query" column')
  column = "answers" if answers_fallback else "wellFormedAnswers"
  if not isinstance(data.get(column), dict):
    hint = ('; answers_fallback=True (config.eval.msmarco_answers_fallback) scores the "answers" '
            'column instead'
            if isinstance(data.get("answers"), dict) else " (the public eval file has no answers)")
    raise TaskFileError(path, None, f'no "{column}" column{hint}')
  well_formed = data.get("wellFormedAnswers") or {}
  answers = data.get("answers") or {}
  query_ids = data.get("query_id") or {}
  out = Collector(path, skip_malformed)
  no_well_formed = no_answer = 0
  for key, query in data["query"].items():
    where = f"record {key}"
    wfa = well_formed.get(key, "[]")
    if not isinstance(wfa, list) and wfa != "[]":
      out.malformed(where, f"wellFormedAnswers {wfa!r} is neither a list nor '[]'")
      continue
    if not isinstance(query, str) or not query.strip():
      out.malformed(where, f"query {query!r} is not a non-empty string")
      continue
    if isinstance(wfa, list) and wfa:
      targets, name = wfa, "wellFormedAnswers"
    elif answers_fallback:
      targets, name = answers.get(key), "answers"
    else:
      no_well_formed += 1
      continue
    if (not isinstance(targets, list) or not targets
        or not all(isinstance(t, str) and t.strip() for t in targets)):
      out.malformed(where, f"{name} {targets!r} are not a non-empty list of strings")
      continue
    if skip_no_answer and all(t.strip() == NO_ANSWER for t in targets):
      no_answer += 1
      continue
    qid = query_ids.get(key, key)
    out.examples.append(TaskExample(query, tuple(targets), id=str(qid)))
  out.dropped = no_well_formed + no_answer
  return out.done(f'{no_well_formed} without wellFormedAnswers, {no_answer} only "{NO_ANSWER}"')


def _json_records(path: Path) -> list[tuple[str | int, Any, str | None]]:
  """(where, record, error) from a .jsonl file (one object per line), a .json object or list of
  objects, or a directory of .json files (SearchQA's release: one question per file). error is
  a message for a line/file that is not JSON (record None), else None."""
  if path.is_dir():
    records = []
    files = sorted(path.glob("*.json"))
    if not files:
      raise InputNotFoundError(f"{path}: a directory without .json files (one record a file)")
    for f in files:
      try:
        records.append((f.name, json.loads(f.read_text(encoding="utf-8")), None))
      except json.JSONDecodeError as e:
        records.append((f.name, None, f"not JSON: {e.msg} (line {e.lineno})"))
      except UnicodeDecodeError:
        line, message = utf8_error(f)
        records.append((f.name, None, f"line {line}: {message}"))
      except RecursionError:
        records.append((f.name, None, "not JSON this reader can hold: nested too deeply"))
    return records
  path = _require_file(path)
  if path.suffix == ".jsonl":
    records = []
    with path.open(encoding="utf-8") as f:
      try:
        for i, line in enumerate(f, start=1):
          if not line.strip():
            records.append((i, None, "empty line (one JSON object per line)"))
            continue
          try:
            records.append((i, json.loads(line), None))
          except json.JSONDecodeError as e:
            records.append((i, None, f"not JSON: {e.msg}"))
          except RecursionError:
            records.append((i, None, "not JSON this reader can hold: nested too deeply"))
      except UnicodeDecodeError:
        raise _not_utf8(path) from None
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

