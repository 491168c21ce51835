"""Streaming readers for passage corpora in the public formats RAG uses.

Three formats, all read one record at a time so that a 13 GB file never sits in memory:

* ``dpr``: DPR's ``psgs_w100.tsv``. A header line ``id<TAB>text<TAB>title``, then one passage per
  line; fields follow the ``csv`` module's excel-tab dialect (a field may be wrapped in double
  quotes, a literal quote inside is written ``""``). DPR reads it with ``csv.reader`` (tab
  delimiter) and so do we, so quoting is resolved exactly as in the reference. Already split.
* ``tsv``: a user's own corpus as in transformers' ``use_own_knowledge_dataset.py``: no header,
  ``title<TAB>text`` per line (same quoting rules, as pandas' ``read_csv`` applies them).
* ``jsonl``: one JSON object per line with string fields ``"text"`` and optionally ``"title"``.

Own corpora (``tsv``/``jsonl``) are split into passages of 100 words exactly as the reference does
(:func:`split_text`): the text is split on single spaces, consecutive runs of 100 pieces are
joined back with a space and stripped, and every piece repeats the document's title.

Malformed input raises :class:`CorpusFormatError`, whose message starts with ``path:line:``.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rag_jax.utils.errors import UserError
from rag_jax.utils.textfile import count_line_breaks, utf8_error

# DPR passages fit the default 128 KiB field limit, but users' documents (unsplit) need not.
csv.field_size_limit(sys.maxsize)

FORMATS = ("dpr", "tsv", "jsonl")
DPR_HEADER = ["id", "text", "title"]


class CorpusFormatError(UserError, ValueError):
  """A corpus file that does not follow its format; the message names the file and line."""

  def __init__(self, path: str | os.PathLike, line: int, message: str):
    self.path = str(path)
    self.line = line
    self.detail = message
    super().__init__(f"{path}:{line}: {message}")


@dataclass(frozen=True)
class Passage:
  """One retrievable unit: external id (DPR's ``id`` column, else the row number), title, text."""

  id: str
  title: str
  text: str


def split_text(text: str, n: int = 100, character: str = " ") -> list[str]:
  """Splits `text` every `n`-th occurrence of `character` (the reference's ``split_text``).

  Identical to transformers' ``examples/research_projects/rag/use_own_knowledge_dataset.py``:
  empty pieces from repeated spaces count as words, and each chunk is ``.strip()``-ed. An empty
  text gives one empty passage, as in the reference.
  """
  words = text.split(character)
  return [character.join(words[i:i + n]).strip() for i in range(0, len(words), n)]


def detect_format(path: str | os.PathLike) -> str:
  """Guesses the format from the file name and first line: ``jsonl``, ``dpr`` or ``tsv``."""
  path = Path(path)
  if path.suffix.lower() in (".jsonl", ".json"):
    return "jsonl"
  with open(path, "rb") as f:  # The first line only, whatever its end, and at most 64 KiB of it.
    raw = f.readline(1 << 16)
  head = raw.splitlines()[0] if raw.strip(b"\r\n") else b""
  try:  # Not final: a character cut by the 64 KiB limit is not an error.
    first = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
  except UnicodeDecodeError as e:
    raise CorpusFormatError(path, 1, f"not valid UTF-8 (byte offset {e.start}: {e.reason}); "
                            "a corpus is a UTF-8 text file") from None
  if first.split("\t") == DPR_HEADER:
    return "dpr"
  if first.lstrip().startswith("{"):
    return "jsonl"
  return "tsv"


def _tsv_rows(path: Path, num_fields: int, skip_blank: bool) -> Iterator[tuple[int, list[str]]]:
  """Yields (first line number of the record, fields) for a tab-separated file, strictly parsed.

  `strict=True` makes the csv module reject a quote in the middle of an unquoted field and a
  quoted field that never closes; a wrong number of fields is rejected here. Line numbers are
  1-based and point at the first physical line of the record (records may span lines when a
  quoted field contains a newline). Bytes that are not UTF-8 are reported on their own line (the
  text layer decodes ahead of the parser, so the file is rescanned to find it).
  """
  with open(path, encoding="utf-8", newline="") as f:
    reader = csv.reader(f, delimiter="\t", quotechar='"', doublequote=True, strict=True)
    start = 1
    while True:
      try:
        row = next(reader)
      except StopIteration:
        return
      except csv.Error as e:
        raise CorpusFormatError(path, start, f"malformed TSV record ({e})") from None
      except UnicodeDecodeError:
        raise CorpusFormatError(path, *utf8_error(path)) from None
      line = start
      start = reader.line_num + 1
      if not row and skip_blank:
        continue
      if len(row) != num_fields:
        raise CorpusFormatError(
            path, line, f"expected {num_fields} tab-separated fields, found {len(row)}: "
            f"{_preview(row)}")
      yield line, row


def _preview(row: list[str], width: int = 80) -> str:
  text = repr("\t".join(row))
  return text if len(text) <= width else text[:width] + "..."


def read_dpr_tsv(path: str | os.PathLike) -> Iterator[Passage]:
  """Streams DPR's ``psgs_w100.tsv`` (header ``id text title``) as :class:`Passage` records.

  DPR passages never contain a newline; a field that does means an unbalanced quote swallowed the
  following lines, which is reported as an error rather than silently merging passages.
  """
  path = Path(path)
  rows = _tsv_rows(path, 3, skip_blank=False)
  try:
    line, header = next(rows)
  except StopIteration:
    raise CorpusFormatError(path, 1, "empty file; expected the header 'id\\ttext\\ttitle'") \
        from None
  except CorpusFormatError as e:
    if e.line != 1:  # Bytes further on, met by the decoder's look-ahead.
      raise
    raise CorpusFormatError(path, 1, f"bad header: {e.detail}") from None
  if header != DPR_HEADER:
    raise CorpusFormatError(path, line, f"expected the header 'id\\ttext\\ttitle', found {header}")
  for line, (pid, text, title) in rows:
    if any("\n" in field or "\r" in field for field in (pid, text, title)):
      raise CorpusFormatError(path, line, "a field spans several lines (unbalanced quote?)")
    if not pid:
      raise CorpusFormatError(path, line, "empty passage id")
    yield Passage(pid, title, text)


def read_title_text_tsv(path: str | os.PathLike) -> Iterator[tuple[int, str, str]]:
  """Streams (line, title, text) documents from a header-less ``title<TAB>text`` file.

  Blank lines are skipped (pandas' default, which the reference's CSV loader uses).
  """
  for line, (title, text) in _tsv_rows(Path(path), 2, skip_blank=True):
    yield line, title, text


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, str, str]]:
  """Streams (line, title, text) documents from JSON lines ``{"title": ..., "text": ...}``."""
  path = Path(path)
  with open(path, "rb") as f:  # bytes: a decoding error is then reported with its line
    for line, data in enumerate(f, start=1):
      try:
        raw = data.decode("utf-8")
      except UnicodeDecodeError as e:
        raise CorpusFormatError(path, line, f"not valid UTF-8 ({e.reason})") from None
      if not raw.strip():
        continue
      try:
        obj = json.loads(raw)
      except json.JSONDecodeError as e:
        raise CorpusFormatError(path, line, f"invalid JSON ({e.msg})") from None
      if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        raise CorpusFormatError(path, line, 'expected an object with a string "text" field')
      title = obj.get("title")
      if title is None:
        title = ""
      if not isinstance(title, str):
        raise CorpusFormatError(path, line, '"title" must be a string or null')
      yield line, title, obj["text"]


class CorpusFileError(UserError, FileNotFoundError):
  """The corpus path names no readable file."""


def check_corpus(path: str | os.PathLike, probe_bytes: int = 1 << 20) -> None:
  """Refuses, before anything is written, a corpus that cannot hold passages: a missing path
  (CorpusFileError), an empty or blank file, or one whose first `probe_bytes` are not UTF-8 text
  (a binary file; CorpusFormatError naming the line and byte offset). Later bad bytes are
  reported by the readers with their line."""
  path = Path(path)
  if not path.is_file():
    raise CorpusFileError(f"{path}: no such corpus file" if not path.exists() else
                          f"{path}: not a file (a corpus is one TSV or JSONL file)")
  with open(path, "rb") as f:
    head = f.read(probe_bytes)
  if not head.strip():
    raise CorpusFormatError(path, 1, "empty file: no passages (nothing was written)")
  try:
    head.decode("utf-8")
  except UnicodeDecodeError as e:
    if e.start < len(head) - 3 or len(head) < probe_bytes:  # not a character cut by the probe
      line = count_line_breaks(head[:e.start]) + 1
      raise CorpusFormatError(path, line, f"not valid UTF-8 at byte offset {e.start} "
                              f"({e.reason}); is it a binary file? (nothing was written)") from None
  nul = head.find(b"\0")
  if nul >= 0:
    raise CorpusFormatError(path, count_line_breaks(head[:nul]) + 1,
                            f"NUL byte at byte offset {nul}; is it a binary file? "
                            "(nothing was written)")


def iter_passages(path: str | os.PathLike, fmt: str = "auto",
                  split_words: int | None = 100) -> Iterator[Passage]:
  """Streams the passages of a corpus file in any supported format.

  Args:
    path: the corpus file.
    fmt: ``auto`` (see :func:`detect_format`), ``dpr``, ``tsv`` or ``jsonl``.
    split_words: own corpora (``tsv``, ``jsonl``) are split into chunks of this many words, as the
      reference does; ``None`` or 0 keeps each document whole. DPR files are never re-split.

  Yields:
    :class:`Passage` records in file order. Own corpora get ids ``"0", "1", ...`` (passage rows).
  """
  if fmt == "auto":
    fmt = detect_format(path)
  if fmt == "dpr":
    yield from read_dpr_tsv(path)
    return
  if fmt not in FORMATS:
    raise ValueError(f"unknown corpus format {fmt!r}; expected one of {('auto',) + FORMATS}")
  docs = read_title_text_tsv(path) if fmt == "tsv" else read_jsonl(path)
  row = 0
  for _, title, text in docs:
    pieces = split_text(text, split_words) if split_words else [text]
    for piece in pieces:
      yield Passage(str(row), title, piece)
      row += 1
