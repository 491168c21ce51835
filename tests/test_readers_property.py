"""Property-based tests of the corpus and task readers: random text, quoting, line endings and
bytes that are not UTF-8. Every generated file is either read exactly (equal to the rows it was
written from, or to DPR's per-line reading of them, modelled here by hand) or refused by a named
error (a UserError subclass) naming the file and the line where the test knows the fault is;
never merged, skipped or truncated in silence."""

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from rag_jax.data import qa
from rag_jax.data import tasks as t
from rag_jax.retrieval.corpus import CorpusFormatError, iter_passages
from rag_jax.utils.errors import UserError

# Derandomized and without an example database: CI runs the same cases every time.
SETTINGS = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Characters that stress the formats: quotes, tabs, line ends (also Unicode ones that universal
# newlines do not split on), non-ASCII, NUL; plain letters more often, so that most rows are
# well-formed and some are not.
ALPHABET = "ab " * 8 + '"\'\t\r\n,[]{}\\é€😀\x85\u2028\x00'


def padding(draw, rows: list) -> int:
  """Characters to add to each row: none, a few, or enough for a file past the 8 KiB that the
  text layer decodes ahead of the line being parsed."""
  size = draw(st.sampled_from(["none", "some", "past the look-ahead"]))
  if size == "past the look-ahead":
    return 20000 // len(rows)
  return 0 if size == "none" else draw(st.integers(0, 200))


LINE_ENDS = st.sampled_from(["\n", "\r\n", "\r"])
MARK = "\ue000"  # Stands for bytes that are not UTF-8; replaced after encoding.
BAD_BYTES = st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80", b"\x80", b"\xfe\xfe"])


def text(exclude: str = "", min_size: int = 0, max_size: int = 12) -> st.SearchStrategy[str]:
  alphabet = st.sampled_from([c for c in ALPHABET if c not in exclude])
  return st.text(alphabet, min_size=min_size, max_size=max_size)


def encode(content: str, bad: bytes) -> bytes:
  return content.encode("utf-8").replace(MARK.encode("utf-8"), bad)


def first_bad_line(data: bytes) -> int | None:
  """Brute force: the 1-based line (ends "\\n", "\\r\\n", "\\r") of the first bytes that are
  not UTF-8."""
  offset = 0
  for number, line in enumerate(data.splitlines(keepends=True), start=1):
    try:
      line.decode("utf-8")
    except UnicodeDecodeError:
      # The readers decode 8 KiB ahead of the line they parse: past it, the old code misplaced.
      event("bad bytes past the first 8 KiB" if offset > 8192 else "bad bytes in the first 8 KiB")
      return number
    offset += len(line)
  return None


def with_mark(draw, rows: list[list[str]], field_choices: list[int]) -> tuple[int, bytes]:
  """Puts MARK into a random field of the last row (half the time: the file's end is past the
  text layer's look-ahead when the rows are padded) or of any row; returns (row, bad bytes)."""
  row = draw(st.sampled_from([len(rows) - 1, None]))
  row = draw(st.integers(0, len(rows) - 1)) if row is None else row
  field = draw(st.sampled_from(field_choices))
  value = rows[row][field]
  at = draw(st.integers(0, len(value)))
  rows[row][field] = value[:at] + MARK + value[at:]
  return row, draw(BAD_BYTES)


def read(reader, data: bytes, name: str, *args, **kwargs):
  """reader(file holding data) -> (result, None) or (None, the UserError it raised)."""
  with tempfile.TemporaryDirectory() as folder:
    path = Path(folder) / name
    path.write_bytes(data)
    try:
      result = reader(path, *args, **kwargs)
    except UserError as e:
      assert str(e).startswith(str(path)), e  # Named: the message starts with the file.
      event(f"refused: {type(e).__name__}")
      return None, e
    event("read")
    return result, None


def tsv_field(value: str, quoting: str) -> str:
  """A TSV field as the format writes it: quoted (inner quotes doubled) when `quoting` is "all",
  or when it holds a tab, a line end or a quote ("minimal"), or a tab, a line end or a leading
  quote ("needed": a quote inside an unquoted field is a literal)."""
  special = '\t\r\n"' if quoting == "minimal" else "\t\r\n"
  if quoting == "all" or set(value) & set(special) or value.startswith('"'):
    return '"' + value.replace('"', '""') + '"'
  return value


QUOTING = st.sampled_from(["all", "minimal", "needed"])

# ---------------------------------------------------------------- corpus: DPR psgs_w100.tsv


def inject(draw, rows: list[list], faults: dict) -> None:
  """Maybe (one time in two) applies one of `faults` (name -> function(row)) to a random row."""
  fault = draw(st.sampled_from([None] * len(faults) + sorted(faults)))
  if fault is not None:
    faults[fault](rows[draw(st.integers(0, len(rows) - 1))])


def insert(draw, value: str, what: str) -> str:
  at = draw(st.integers(0, len(value)))
  return value[:at] + what + value[at:]


@st.composite
def dpr_corpus(draw, bad: bool):
  rows = draw(st.lists(st.tuples(text("\r\n", min_size=1, max_size=6), text("\r\n"),
                                 text("\r\n", max_size=6)).map(list), min_size=1, max_size=40))
  pad = padding(draw, rows)
  rows = [[pid, body + "y" * pad, title] for pid, body, title in rows]

  def line_end(row):  # Legal in a quoted field, never in a DPR passage.
    field = draw(st.integers(0, 2))
    row[field] = insert(draw, row[field], draw(st.sampled_from(["\r", "\n", "\r\n"])))

  inject(draw, rows, {"line end": line_end, "empty id": lambda row: row.__setitem__(0, "")})
  marked = with_mark(draw, rows, [0, 1, 2]) if bad else None
  quoting, end = draw(QUOTING), draw(LINE_ENDS)
  lines = ["id\ttext\ttitle"] + ["\t".join(tsv_field(f, quoting) for f in row) for row in rows]
  content = "".join(line + end for line in lines)
  return rows, encode(content, marked[1] if marked else b"")


@SETTINGS
@given(dpr_corpus(bad=False))
def test_dpr_corpus_read_exactly_or_refused_at_the_row(case):
  rows, data = case
  got, error = read(lambda p: list(iter_passages(p, "dpr")), data, "psgs_w100.tsv")
  # DPR's passages hold no line end (a field that does means a quote ran on) and have an id.
  faults = [i for i, (pid, body, title) in enumerate(rows)
            if not pid or set(pid + body + title) & set("\r\n")]
  if faults:
    assert isinstance(error, CorpusFormatError) and error.line == faults[0] + 2, error
  else:
    assert error is None, error
    assert [(p.id, p.text, p.title) for p in got] == [tuple(row) for row in rows]


@SETTINGS
@given(dpr_corpus(bad=True))
def test_dpr_corpus_bytes_not_utf8_refused_on_their_line(case):
  rows, data = case
  got, error = read(lambda p: list(iter_passages(p, "dpr")), data, "psgs_w100.tsv")
  bad_line = first_bad_line(data)
  faults = [i + 2 for i, (pid, body, title) in enumerate(rows)
            if not pid or set(pid + body + title) & set("\r\n")]
  assert isinstance(error, CorpusFormatError), error
  # The look-ahead may meet the bad bytes before an earlier row's fault: either line is right.
  assert error.line in {bad_line, *faults[:1]} and error.line <= bad_line, (error, bad_line)
  if not faults or faults[0] > bad_line:
    assert error.line == bad_line and "not valid UTF-8" in str(error)


# ---------------------------------------------------------------- corpus: own TSV and JSONL


@st.composite
def own_tsv(draw, bad: bool):
  rows = draw(st.lists(st.tuples(text(), text()).map(list), min_size=1, max_size=40))
  pad = padding(draw, rows)
  rows = [[title, body + "y" * pad] for title, body in rows]
  marked = with_mark(draw, rows, [0, 1]) if bad else None
  quoting, end = draw(QUOTING), draw(LINE_ENDS)
  blank = draw(st.lists(st.integers(0, len(rows)), max_size=3))  # Blank lines are skipped.
  lines = ["\t".join(tsv_field(f, quoting) for f in row) for row in rows]
  for at in sorted(blank, reverse=True):
    lines.insert(at, "")
  return rows, encode("".join(line + end for line in lines), marked[1] if marked else b"")


@SETTINGS
@given(own_tsv(bad=False))
def test_own_tsv_read_exactly(case):
  rows, data = case
  got, error = read(lambda p: list(iter_passages(p, "tsv", split_words=None)), data, "mine.tsv")
  assert error is None, error
  assert [(p.title, p.text) for p in got] == [tuple(row) for row in rows]
  assert [p.id for p in got] == [str(i) for i in range(len(rows))]


@SETTINGS
@given(own_tsv(bad=True))
def test_own_tsv_bytes_not_utf8_refused_on_their_line(case):
  _, data = case
  _, error = read(lambda p: list(iter_passages(p, "tsv", split_words=None)), data, "mine.tsv")
  assert isinstance(error, CorpusFormatError) and error.line == first_bad_line(data), error


@st.composite
def own_jsonl(draw):
  docs = draw(st.lists(st.tuples(st.none() | text(), text()), min_size=1, max_size=30))
  ascii_only, end = draw(st.booleans()), draw(LINE_ENDS)
  lines = [json.dumps({"title": title, "text": body}, ensure_ascii=ascii_only)
           for title, body in docs]
  blank = draw(st.lists(st.integers(0, len(lines)), max_size=3))
  for at in sorted(blank, reverse=True):
    lines.insert(at, draw(st.sampled_from(["", " ", "\t"])))
  return docs, end, "".join(line + end for line in lines).encode("utf-8")


@SETTINGS
@given(own_jsonl())
def test_own_jsonl_read_exactly_or_refused(case):
  docs, end, data = case
  got, error = read(lambda p: list(iter_passages(p, "jsonl", split_words=None)), data,
                    "mine.jsonl")
  if end == "\r" and len(docs) > 1:  # Not JSON lines: one line holding several objects.
    assert isinstance(error, CorpusFormatError) and error.line == 1, error
  else:
    assert error is None, error
    assert [(p.title, p.text) for p in got] == [(title or "", body) for title, body in docs]


# ---------------------------------------------------------------- DPR qa.csv and CuratedTrec


def dpr_question(written: str) -> tuple[str | None, bool]:
  """What DPR's csv.reader (excel-tab dialect, not strict) reads from a question written
  unquoted at the start of a line: (question, True), or (None, False) when it opens a quote that
  does not close on the line. An opening quote's field runs to the first single quote (a doubled
  one is a literal quote); what follows it is kept literally."""
  if not written.startswith('"'):
    return written, True
  out, i = [], 1
  while i < len(written):
    if written[i] == '"':
      if written[i + 1:i + 2] == '"':
        out.append('"')
        i += 2
        continue
      return "".join(out) + written[i + 1:], True
    out.append(written[i])
    i += 1
  return None, False


@st.composite
def dpr_qa_csv(draw, bad: bool):
  # Questions hold quotes anywhere (one that opens a line opens a quoted field), answers anything.
  rows = draw(st.lists(st.tuples(text("\t\r\n\x00", min_size=1),
                                 st.lists(text(), min_size=1, max_size=3)).map(list),
                       min_size=1, max_size=40))
  pad = padding(draw, rows)
  rows = [[question + "q" * pad, answers] for question, answers in rows]
  if bad:  # Only well-formed rows: the bytes are the one fault.
    rows = [[q if q.strip() and not q.startswith('"') else "q" + q, a] for q, a in rows]
  else:
    inject(draw, rows, {
        "NUL": lambda row: row.__setitem__(0, insert(draw, row[0], "\x00")),
        "blank question": lambda row: row.__setitem__(0, draw(st.sampled_from(["", " ", "\x85"]))),
        "no answers": lambda row: row.__setitem__(1, [])})
  marked = with_mark(draw, rows, [0]) if bad else None
  quoted, end = draw(st.booleans()), draw(LINE_ENDS)  # csv quoting, or DPR's own plain rows.
  lines = [tsv_field(q, "minimal") + "\t" + tsv_field(repr(a), "minimal") if quoted
           else q + "\t" + repr(a) for q, a in rows]
  return rows, quoted, encode("".join(line + end for line in lines), marked[1] if marked else b"")


@SETTINGS
@given(dpr_qa_csv(bad=False), st.booleans())
def test_dpr_qa_csv_read_as_dpr_reads_each_line_or_refused(case, curatedtrec):
  rows, quoted, data = case
  reader = t.read_curatedtrec if curatedtrec else t.read_dpr_qa_csv
  got, error = read(reader, data, "nq-test.qa.csv")
  expected, fault = [], None
  for line, (written, answers) in enumerate(rows, start=1):
    question, closed = (written, True) if quoted else dpr_question(written)
    if not closed or "\x00" in written or not answers or not question.strip():
      fault = line
      break
    expected.append((question, tuple(answers)))
  if fault is not None:
    assert isinstance(error, t.TaskFileError) and error.where == fault, (error, fault)
  else:
    assert error is None, error
    assert [(ex.source, ex.targets) for ex in got] == expected
    assert all(ex.targets_are_regex == curatedtrec for ex in got)


@SETTINGS
@given(dpr_qa_csv(bad=True))
def test_dpr_qa_csv_bytes_not_utf8_refused_on_their_line(case):
  _, _, data = case
  _, error = read(t.read_dpr_qa_csv, data, "nq-test.qa.csv", skip_malformed=True)
  assert isinstance(error, t.TaskFileError) and error.where == first_bad_line(data), error


# ---------------------------------------------------------------- MS-MARCO NLG (columnar JSON)


@st.composite
def msmarco(draw, bad: bool):
  records = draw(st.lists(st.tuples(text(min_size=1), st.lists(text(min_size=1), min_size=1,
                                                              max_size=2),
                                    st.just("[]") | st.lists(text(min_size=1), max_size=2)),
                          min_size=1, max_size=15).map(lambda rs: [list(r) for r in rs]))
  pad = padding(draw, records)
  records = [[query + "q" * pad, answers, wfa] for query, answers, wfa in records]
  marked = with_mark(draw, records, [0]) if bad else None
  columns = {"query": {}, "answers": {}, "wellFormedAnswers": {}, "query_id": {}}
  for key, (query, answers, wfa) in enumerate(records):
    columns["query"][str(key)] = query
    columns["answers"][str(key)] = answers
    columns["wellFormedAnswers"][str(key)] = wfa
    columns["query_id"][str(key)] = 5000 + key
  indent, end = draw(st.sampled_from([None, 1])), draw(LINE_ENDS)
  # ensure_ascii would write MARK as an escape: keep it raw where bytes replace it.
  content = json.dumps(columns, indent=indent, ensure_ascii=draw(st.booleans()) and not bad)
  content = content.replace("\n", end)  # JSON whitespace: any line end.
  return records, encode(content, marked[1] if marked else b"")


@SETTINGS
@given(msmarco(bad=False), st.booleans())
def test_msmarco_nlg_read_exactly_or_refused(case, fallback):
  records, data = case
  got, error = read(t.read_msmarco_nlg, data, "dev_v2.1.json", answers_fallback=fallback)
  blank = [key for key, (query, answers, wfa) in enumerate(records)
           if not query.strip()
           or any(not x.strip() for x in (wfa if wfa != "[]" and wfa else
                                          answers if fallback else []))]
  if blank:
    assert isinstance(error, t.TaskFileError) and error.where == f"record {blank[0]}", error
    return
  assert error is None, error
  expected = [(query, tuple(wfa if wfa != "[]" and wfa else answers), str(5000 + key))
              for key, (query, answers, wfa) in enumerate(records)
              if (wfa != "[]" and wfa) or fallback]
  assert [(ex.source, ex.targets, ex.id) for ex in got] == expected
  assert got.dropped == len(records) - len(expected)


@SETTINGS
@given(msmarco(bad=True))
def test_msmarco_nlg_bytes_not_utf8_refused_on_their_line(case):
  _, data = case
  _, error = read(t.read_msmarco_nlg, data, "dev_v2.1.json", skip_malformed=True)
  assert isinstance(error, t.TaskFileError) and error.where == first_bad_line(data), error


# ---------------------------------------------------------------- JSON lines: Jeopardy, FEVER

LABELS = ["SUPPORTS", "REFUTES", "NOT ENOUGH INFO"]


@st.composite
def json_lines(draw, kind: str, bad: bool):
  if kind == "jeopardy":
    rows = draw(st.lists(st.tuples(text(), text()).map(list), min_size=1, max_size=30))
  else:
    rows = draw(st.lists(st.tuples(text(), st.sampled_from(LABELS + ["MAYBE"])).map(list),
                         min_size=1, max_size=30))
  if bad:
    rows = [[a.strip() or "a", b.strip() or "b"] for a, b in rows]
  pad = padding(draw, rows)
  rows = [[a + "q" * pad, b] for a, b in rows]
  marked = with_mark(draw, rows, [0]) if bad else None
  kilt, end = draw(st.booleans()), draw(LINE_ENDS)
  lines = []
  for i, (a, b) in enumerate(rows):
    if kind == "jeopardy":
      record = {"question": a, "answer": b, "id": f"sqa-{i}", "category": "X"}
    elif kilt:
      record = {"id": str(i), "input": a, "output": [{"answer": b, "provenance": []}]}
    else:
      record = {"id": i, "claim": a, "label": b}
    lines.append(json.dumps(record, ensure_ascii=draw(st.booleans()) and not bad))
  return rows, encode("".join(line + end for line in lines), marked[1] if marked else b"")


@SETTINGS
@given(json_lines("jeopardy", bad=False))
def test_searchqa_jeopardy_read_exactly_or_refused(case):
  rows, data = case
  got, error = read(t.read_searchqa_jeopardy, data, "test.jsonl")
  faults = [i + 1 for i, (question, answer) in enumerate(rows)
            if not question.strip() or not answer.strip()]
  if faults:
    assert isinstance(error, t.TaskFileError) and error.where == faults[0], error
  else:
    assert error is None, error
    assert [(ex.source, ex.targets, ex.id) for ex in got] == [
        (answer, (question,), f"sqa-{i}") for i, (question, answer) in enumerate(rows)]


@SETTINGS
@given(json_lines("fever", bad=False), st.sampled_from([2, 3]))
def test_fever_read_exactly_or_refused(case, num_classes):
  rows, data = case
  got, error = read(t.read_fever, data, "fever-dev.jsonl", num_classes=num_classes)
  faults = [i + 1 for i, (claim, label) in enumerate(rows)
            if not claim.strip() or label not in LABELS]
  if faults:
    assert isinstance(error, t.TaskFileError) and error.where == faults[0], error
    return
  assert error is None, error
  kept = [(claim, label) for claim, label in rows if num_classes == 3 or label != LABELS[2]]
  assert [(ex.source, ex.targets) for ex in got] == [
      (claim, (t.FEVER_LABEL_TARGETS[label],)) for claim, label in kept]
  assert got.dropped == len(rows) - len(kept)


@pytest.mark.parametrize("kind", ["jeopardy", "fever"])
def test_json_lines_bytes_not_utf8_refused_on_their_line(kind):
  reader = t.read_searchqa_jeopardy if kind == "jeopardy" else t.read_fever

  @SETTINGS
  @given(json_lines(kind, bad=True))
  def check(case):
    _, data = case
    _, error = read(reader, data, "test.jsonl", skip_malformed=True)
    assert isinstance(error, t.TaskFileError) and error.where == first_bad_line(data), error

  check()


# ---------------------------------------------------------------- source / target files


@st.composite
def source_target(draw, bad: bool):
  pairs = draw(st.lists(st.tuples(text(exclude="\r\n"), text(exclude="\r\n")).map(list),
                        min_size=1, max_size=40))
  if bad:
    pairs = [[s.strip() or "s", g.strip() or "g"] for s, g in pairs]
  pad = padding(draw, pairs)
  pairs = [[source + "q" * pad, target + "a" * pad] for source, target in pairs]
  marked = with_mark(draw, pairs, [0, 1]) if bad else None
  ends = draw(LINE_ENDS), draw(LINE_ENDS)
  files = [encode("".join(pair[i] + ends[i] for pair in pairs), marked[1] if marked else b"")
           for i in range(2)]
  return pairs, files


def read_source_target(files: list[bytes]):
  with tempfile.TemporaryDirectory() as folder:
    for suffix, data in zip(("source", "target"), files, strict=True):
      (Path(folder) / f"test.{suffix}").write_bytes(data)
    try:
      result = t.read_source_target_task(folder, "test")
    except UserError as e:
      assert str(e).startswith(folder), e
      event(f"refused: {type(e).__name__}")
      return None, e
    event("read")
    return result, None


@SETTINGS
@given(source_target(bad=False))
def test_source_target_read_exactly_or_refused(case):
  pairs, files = case
  got, error = read_source_target(files)
  blank = [(i + 1, side) for i, pair in enumerate(pairs) for side in (0, 1)
           if not pair[side].strip()]
  if blank:
    line, side = min(blank, key=lambda b: (b[1], b[0]))  # The .source file is read first.
    assert isinstance(error, qa.QAFormatError), error
    assert f"test.{('source', 'target')[side]}:{line}: empty line" in str(error), error
  else:
    assert error is None, error
    assert [(ex.source, ex.targets) for ex in got] == [(s, (g,)) for s, g in pairs]


@SETTINGS
@given(source_target(bad=True))
def test_source_target_bytes_not_utf8_refused_on_their_line(case):
  _, files = case
  _, error = read_source_target(files)
  side = 0 if first_bad_line(files[0]) else 1
  name = ("source", "target")[side]
  assert isinstance(error, qa.QAFormatError), error
  assert f"test.{name}:{first_bad_line(files[side])}: not valid UTF-8" in str(error), error
