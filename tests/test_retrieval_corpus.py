"""Corpus readers (DPR psgs_w100.tsv, own TSV, JSONL), 100-word splitting and the passage store."""

import csv
import io
import json

import numpy as np
import pytest

from rag_jax.retrieval.corpus import (
  CorpusFormatError,
  Passage,
  detect_format,
  iter_passages,
  split_text,
)
from rag_jax.retrieval.store import PassageStore, build_store_from_file, write_store

# Written byte for byte as DPR publishes psgs_w100.tsv: header, quoted text with "" escapes,
# titles unquoted unless they hold a quote or a tab.
DPR_TSV = (
    'id\ttext\ttitle\n'
    '1\t"Aaron Aaron ( or ; ""Ahärôn"") is a prophet, high priest, and the brother of Moses."\t'
    'Aaron\n'
    '2\t"His elder sister was ""Miriam""."\tAaron\n'
    '3\t"A tab\tinside quotes, and an ending quote """\t"Title with ""quotes"""\n'
    '4\tunquoted text with an apostrophe\'s\tZ\n'
    '5\t""\tEmpty text\n'
)


def test_dpr_reader_resolves_quoting_like_csv(tmp_path):
  path = tmp_path / "psgs_w100.tsv"
  path.write_text(DPR_TSV, encoding="utf-8")
  got = list(iter_passages(path))
  assert got == [
      Passage("1", "Aaron", 'Aaron Aaron ( or ; "Ahärôn") is a prophet, high priest, and the '
              'brother of Moses.'),
      Passage("2", "Aaron", 'His elder sister was "Miriam".'),
      Passage("3", 'Title with "quotes"', 'A tab\tinside quotes, and an ending quote "'),
      Passage("4", "Z", "unquoted text with an apostrophe's"),
      Passage("5", "Empty text", ""),
  ]
  assert detect_format(path) == "dpr"
  # Independent check: the file as DPR's own loader reads it (csv.reader, tab delimiter).
  rows = list(csv.reader(io.StringIO(DPR_TSV), delimiter="\t"))[1:]
  assert [(p.id, p.text, p.title) for p in got] == [tuple(r) for r in rows]


def test_dpr_written_by_csv_writer_roundtrips(tmp_path):
  rng = np.random.default_rng(0)
  alphabet = list('ab "\t\'xyz,é')
  rows = [(str(i + 1), "".join(rng.choice(alphabet, 30)), "".join(rng.choice(alphabet, 8)))
          for i in range(200)]
  path = tmp_path / "psgs.tsv"
  with open(path, "w", encoding="utf-8", newline="") as f:
    w = csv.writer(f, delimiter="\t", lineterminator="\n")
    w.writerow(["id", "text", "title"])
    w.writerows(rows)
  assert [(p.id, p.text, p.title) for p in iter_passages(path, "dpr")] == rows


@pytest.mark.parametrize("body,line,message", [
    ('1\t"ok"\tA\n2\tonly two\n3\t"x"\tB\n', 3, "expected 3 tab-separated fields, found 2"),
    ('1\t"ok"\tA\n2\t"unclosed\tA\n3\t"x"\tB\n', 3, "malformed TSV record"),  # swallows a line
    ('1\t"ok"\tA\n2\t"bad" quote\tA\n', 3, "malformed TSV record"),
    ('1\t"ok"\tA\n\t"no id"\tA\n', 3, "empty passage id"),
    # Found by tests/test_readers_property.py: a line end in the id or the title.
    ('"\r"\t""\t""\n', 2, "spans several lines"),
    ('1\ttext\t"a\rtitle"\n', 2, "spans several lines"),
])
def test_dpr_malformed_rows_name_file_and_line(tmp_path, body, line, message):
  path = tmp_path / "bad.tsv"
  path.write_text("id\ttext\ttitle\n" + body, encoding="utf-8")
  with pytest.raises(CorpusFormatError, match=message) as err:
    list(iter_passages(path, "dpr"))
  assert str(err.value).startswith(f"{path}:{line}:")
  assert err.value.line == line


def test_dpr_bad_header(tmp_path):
  path = tmp_path / "x.tsv"
  path.write_text("id\ttitle\ttext\n1\ta\tb\n")
  with pytest.raises(CorpusFormatError, match=r"x.tsv:1: expected the header"):
    list(iter_passages(path, "dpr"))
  path.write_text('id\ttext\t"title\n')
  with pytest.raises(CorpusFormatError, match=r"x.tsv:1: bad header: malformed TSV record"):
    list(iter_passages(path, "dpr"))


def test_dpr_bad_byte_after_the_header_is_reported_on_its_line(tmp_path):
  # Found by tests/test_readers_property.py: a bad byte on line 2, met by the decoder while the
  # header is read, was reported as a bad header on line 1.
  path = tmp_path / "x.tsv"
  path.write_bytes(b'id\ttext\ttitle\n"\xff"\t""\t""\n')
  with pytest.raises(CorpusFormatError) as err:
    list(iter_passages(path, "dpr"))
  assert err.value.line == 2
  assert str(err.value) == (f"{path}:2: not valid UTF-8 at byte offset 15 (invalid start byte); "
                            "is it a binary file?")


def _first_bad_line(data: bytes) -> int:
  """Brute force: the 1-based line (ends "\\n", "\\r\\n" or "\\r") that first fails to decode."""
  for number, line in enumerate(data.splitlines(keepends=True), start=1):
    try:
      line.decode("utf-8")
    except UnicodeDecodeError:
      return number
  raise AssertionError("no bad line")


@pytest.mark.parametrize("fmt, newline", [("dpr", "\n"), ("dpr", "\r\n"), ("tsv", "\r")])
def test_bad_byte_past_the_first_mib_is_reported_on_its_line(tmp_path, fmt, newline):
  # Over 1 MiB (past check_corpus's probe), a byte that is not UTF-8 on line 12001.
  if fmt == "dpr":
    lines = ["id\ttext\ttitle"] + [f"{i}\t{'word ' * 18}text {i}\tTitle {i}"
                                   for i in range(1, 12001)]
    lines[12000] = "12000\tan \xff byte\tT"
  else:
    lines = [f"Title {i}\t{'w ' * 40}" for i in range(1, 12002)]
    lines[12000] = "Bad\tan \xff byte"
  data = newline.join(lines).encode("latin-1") + newline.encode()
  assert len(data) > 1 << 20
  path = tmp_path / "psgs.tsv"
  path.write_bytes(data)
  expected, offset = _first_bad_line(data), data.index(b"\xff")
  assert expected == 12001
  with pytest.raises(CorpusFormatError) as err:
    list(iter_passages(path, fmt))
  assert err.value.line == expected
  assert str(err.value).startswith(f"{path}:{expected}: not valid UTF-8 at byte offset {offset} ")


def test_split_text_matches_reference_definition():
  # The reference: text.split(" "), chunks of n joined by " " and stripped.
  words = [f"w{i}" for i in range(250)]
  assert split_text(" ".join(words)) == [" ".join(words[:100]), " ".join(words[100:200]),
                                         " ".join(words[200:])]
  assert split_text("a  b", n=2) == ["a", "b"]  # the empty piece between two spaces is a word
  assert split_text("a  b c", n=2) == ["a", "b c"]
  assert split_text("") == [""]
  assert split_text(" ".join(words[:100])) == [" ".join(words[:100])]


def test_own_tsv_and_jsonl_are_split_with_title_repeated(tmp_path):
  long_text = " ".join(f"t{i}" for i in range(230))
  tsv = tmp_path / "mine.tsv"
  tsv.write_text(f'Doc A\t{long_text}\n\n"Doc ""B"""\t"short, with\ttab"\n\tno title\n',
                 encoding="utf-8")
  got = list(iter_passages(tsv))
  assert detect_format(tsv) == "tsv"
  assert [p.title for p in got] == ["Doc A"] * 3 + ['Doc "B"', ""]
  assert [p.text for p in got] == split_text(long_text) + ["short, with\ttab", "no title"]
  assert [p.id for p in got] == ["0", "1", "2", "3", "4"]

  jsonl = tmp_path / "mine.jsonl"
  docs = [{"title": "Doc A", "text": long_text}, {"title": 'Doc "B"', "text": "short, with\ttab"},
          {"title": None, "text": "no title"}]
  jsonl.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
  assert [(p.title, p.text) for p in iter_passages(jsonl)] == [(p.title, p.text) for p in got]
  assert [p.text for p in iter_passages(jsonl, split_words=None)] == [d["text"] for d in docs]


def test_own_formats_malformed(tmp_path):
  tsv = tmp_path / "mine.tsv"
  tsv.write_text("A\tfine\nB\tone\ttoo many\n")
  with pytest.raises(CorpusFormatError, match=r"mine.tsv:2: expected 2 tab-separated fields"):
    list(iter_passages(tsv, "tsv"))
  jsonl = tmp_path / "mine.jsonl"
  jsonl.write_text('{"title": "a", "text": "b"}\n{"title": "a", "text": \n')
  with pytest.raises(CorpusFormatError, match=r"mine.jsonl:2: invalid JSON"):
    list(iter_passages(jsonl))
  jsonl.write_text('{"title": "a", "text": "b"}\n\n{"title": "a"}\n')
  with pytest.raises(CorpusFormatError, match=r"mine.jsonl:3: .*string \"text\""):
    list(iter_passages(jsonl))


def test_store_roundtrip_and_random_access(tmp_path):
  rng = np.random.default_rng(1)
  passages = [Passage(str(1000 + i), f"Title {i // 3} ✓", "".join(rng.choice(list("ab é\"\t"), i)))
              for i in range(500)]
  passages[7] = Passage("1007", "", "")
  store = write_store(iter(passages), tmp_path / "store", progress=False)
  assert len(store) == 500
  # Titles are stored once per run of equal titles.
  assert store.meta["num_titles"] == len({p.title for p in passages}) + 1  # "" splits a run
  for r in rng.permutation(500)[:100]:
    assert store[r] == passages[r]
  assert store.get(np.array([[3, 4], [499, 0]])) == [passages[i] for i in (3, 4, 499, 0)]
  assert store.titles_and_texts(10, 13) == ([p.title for p in passages[10:13]],
                                           [p.text for p in passages[10:13]])
  np.testing.assert_array_equal(store.rows_for_ids(["1005", "1499", "7", "x"]), [5, 499, -1, -1])
  with pytest.raises(IndexError, match="out of range"):
    store[500]
  reopened = PassageStore(tmp_path / "store")
  assert list(reopened) == passages


def test_store_from_dpr_file_and_non_numeric_ids(tmp_path):
  path = tmp_path / "psgs_w100.tsv"
  path.write_text(DPR_TSV, encoding="utf-8")
  store = build_store_from_file(path, tmp_path / "store", progress=False)
  assert store[2].title == 'Title with "quotes"' and store.doc_id(4) == "5"
  assert store.meta["source"]["size"] == path.stat().st_size
  other = write_store([Passage("wiki:a", "t", "x"), Passage("wiki:b", "t", "y")],
                      tmp_path / "s2", progress=False)
  np.testing.assert_array_equal(other.rows_for_ids(["wiki:b", "nope"]), [1, -1])


def test_failed_store_build_leaves_previous_store(tmp_path):
  good = tmp_path / "good.tsv"
  good.write_text("A\tone two\n")
  build_store_from_file(good, tmp_path / "store", progress=False)
  bad = tmp_path / "bad.tsv"
  bad.write_text("A\tone\nB\ttwo\n" * 1000 + "C\tx\ty\n")
  with pytest.raises(CorpusFormatError, match=r"bad.tsv:2001:"):
    build_store_from_file(bad, tmp_path / "store", progress=False)
  assert list(PassageStore(tmp_path / "store")) == [Passage("0", "A", "one two")]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tsv", "good.tsv", "store"]


def test_truncated_store_is_detected(tmp_path):
  store = write_store([Passage("1", "t", "hello"), Passage("2", "t", "world")],
                      tmp_path / "s", progress=False)
  store.close()
  data = (tmp_path / "s" / "text.bin").read_bytes()
  (tmp_path / "s" / "text.bin").write_bytes(data[:-2])
  with pytest.raises(ValueError, match="truncated"):
    PassageStore(tmp_path / "s")
  with pytest.raises(FileNotFoundError, match="not a complete passage store"):
    PassageStore(tmp_path / "missing")
