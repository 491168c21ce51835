"""On-disk passage store: text and title of any passage by row id, memory-mapped, no Python objects.

Format (a directory, written atomically; all integers little-endian):

  store.json          {"format", "count", "num_titles", "source"}; written last, marks completion
  text.bin            UTF-8 passage texts, concatenated
  text.offsets        int64[count + 1]; passage i is text.bin[off[i]:off[i + 1]]
  ids.bin/.offsets    the external ids (DPR's ``id`` column) in the same layout
  title.bin/.offsets  int64[num_titles + 1]; the distinct titles, consecutive duplicates collapsed
  title.index         int32[count]; passage i has title number title.index[i]

Why this and not a pickle, SQLite or Arrow: the row id that the index returns is the position in
these arrays, so a fetch is two offset reads and one slice of a memory-mapped file (O(1), no
parsing); the page cache, not the Python heap, holds whatever is hot; 21M passages cost 13 GB of
text on disk, 2 x 168 MB of offsets and 84 MB of title numbers, and nothing until touched.
Titles are stored once per run of identical titles (a Wikipedia article gives a run of
passages), so once per article rather than once per passage. The format needs only numpy.
"""

from __future__ import annotations

import json
import mmap
import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from rag_jax.retrieval.corpus import CorpusFormatError, Passage, iter_passages
from rag_jax.utils.atomic import atomic_directory
from rag_jax.utils.errors import InputNotFoundError, UserError

STORE_FORMAT = "rag_jax.passages/1"
_FLUSH_ROWS = 1 << 16


class StoreFormatError(UserError, ValueError):
  """A passage store file whose size or content disagrees with store.json (truncated, damaged or
  foreign); the message names the file, what it holds and what it should, and how to rebuild."""


class StoreFileError(InputNotFoundError):
  """A passage store file that is not there."""


def _rebuild_hint(directory: Path) -> str:
  return (f"the passage store {directory} is truncated or damaged; rebuild it: delete {directory} "
          "and rerun python -m rag_jax.commands.build_index with the same --corpus and --out "
          "(the embeddings already computed are kept)")


def _file_size(path: Path) -> int:
  try:
    return path.stat().st_size
  except FileNotFoundError:
    raise StoreFileError(f"{path} is missing: {_rebuild_hint(path.parent)}") from None


def _check_size(path: Path, expected: int, what: str) -> None:
  """Raises StoreFormatError unless `path` holds exactly `expected` bytes (`what` says why)."""
  actual = _file_size(path)
  if actual != expected:
    raise StoreFormatError(f"{path}: {actual} bytes, expected {expected} ({what}): "
                           f"{_rebuild_hint(path.parent)}")


class _BlobWriter:
  """Appends byte strings to ``<name>.bin`` and their end offsets to ``<name>.offsets``."""

  def __init__(self, directory: Path, name: str):
    self._data = open(directory / f"{name}.bin", "wb")  # noqa: SIM115 (closed in close())
    self._offsets = open(directory / f"{name}.offsets", "wb")  # noqa: SIM115
    self._pending = array("q", [0])
    self._end = 0
    self.count = 0

  def append(self, value: str) -> None:
    data = value.encode("utf-8")
    self._data.write(data)
    self._end += len(data)
    self._pending.append(self._end)
    self.count += 1
    if len(self._pending) >= _FLUSH_ROWS:
      self._flush()

  def _flush(self) -> None:
    np.asarray(self._pending, dtype="<i8").tofile(self._offsets)
    self._pending = array("q")

  def close(self) -> None:
    self._flush()
    for f in (self._data, self._offsets):
      f.flush()
      os.fsync(f.fileno())
      f.close()


class _Blob:
  """Read side of :class:`_BlobWriter`: item i as a str, from memory-mapped files."""

  def __init__(self, directory: Path, name: str, count: int):
    offsets = directory / f"{name}.offsets"
    _check_size(offsets, 8 * (count + 1), f"{count + 1} int64 offsets of the {count} items in "
                f"{directory / 'store.json'}")
    self.offsets = np.memmap(offsets, dtype="<i8", mode="r")
    size = _file_size(directory / f"{name}.bin")
    if size != int(self.offsets[-1]):
      raise StoreFormatError(
          f"{directory / (name + '.bin')}: {size} bytes, expected {int(self.offsets[-1])} (where "
          f"{offsets.name} ends): {_rebuild_hint(directory)}")
    self._file = open(directory / f"{name}.bin", "rb")  # noqa: SIM115 (closed in close())
    # mmap cannot map an empty file; an all-empty column is then served from b"".
    self._data = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""

  def __getitem__(self, i: int) -> str:
    return self._data[int(self.offsets[i]):int(self.offsets[i + 1])].decode("utf-8")

  def close(self) -> None:
    if isinstance(self._data, mmap.mmap):
      self._data.close()
    self._file.close()


def write_store(passages: Iterable[Passage], path: str | os.PathLike, *,
                source: dict | None = None, total: int | None = None,
                overwrite: bool = True, progress: bool = True) -> PassageStore:
  """Streams `passages` into a new store at `path` (atomically) and returns it opened.

  Memory stays constant: strings are written as they arrive, offsets flushed every 65k rows.

  Args:
    passages: any iterable of :class:`Passage` (e.g. :func:`iter_passages`).
    path: the store directory; replaced only once the new store is complete.
    source: free-form provenance recorded in ``store.json`` (file, size, format...).
    total: expected count for the progress bar, if known.
    overwrite: refuse to replace an existing store when False.
    progress: show a tqdm bar (passages/s).
  """
  with atomic_directory(path, overwrite=overwrite) as tmp:
    text, ids, titles = (_BlobWriter(tmp, n) for n in ("text", "ids", "title"))
    title_index = open(tmp / "title.index", "wb")  # noqa: SIM115
    pending = array("i")
    last_title = None
    for p in tqdm(passages, total=total, unit=" passages", unit_scale=True, disable=not progress,
                  desc="storing passages"):
      if p.title != last_title:
        titles.append(p.title)
        last_title = p.title
      pending.append(titles.count - 1)
      text.append(p.text)
      ids.append(p.id)
      if len(pending) >= _FLUSH_ROWS:
        np.asarray(pending, dtype="<i4").tofile(title_index)
        pending = array("i")
    np.asarray(pending, dtype="<i4").tofile(title_index)
    title_index.close()
    for w in (text, ids, titles):
      w.close()
    meta = {"format": STORE_FORMAT, "count": text.count, "num_titles": titles.count,
            "source": source or {}}
    (tmp / "store.json").write_text(json.dumps(meta, indent=2))
  return PassageStore(path)


def build_store_from_file(corpus: str | os.PathLike, path: str | os.PathLike, *, fmt: str = "auto",
                          split_words: int | None = 100, progress: bool = True) -> PassageStore:
  """Reads a corpus file (see :mod:`rag_jax.retrieval.corpus`) into a store at `path`."""
  corpus = Path(corpus)
  st = corpus.stat()
  source = {"path": str(corpus.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "format": fmt, "split_words": split_words}
  return write_store(_nonempty(iter_passages(corpus, fmt, split_words), corpus), path,
                     source=source, progress=progress)


def _nonempty(passages: Iterable[Passage], corpus: Path) -> Iterator[Passage]:
  """`passages`, raising CorpusFormatError at their end if there were none: inside
  write_store's atomic block, so an empty store is never committed."""
  n = 0
  for n, p in enumerate(passages, 1):  # noqa: B007 (n counts)
    yield p
  if n == 0:
    raise CorpusFormatError(corpus, 1, "no passages in the file (nothing was written)")


class PassageStore:
  """Read-only access to a store written by :func:`write_store`; rows are 0-based ints."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)
    meta_path = self.path / "store.json"
    if not meta_path.exists():
      raise StoreFileError(f"{meta_path} not found: {self.path} is not a complete passage store")
    try:
      self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
      self.count = int(self.meta["count"])
      num_titles = int(self.meta["num_titles"])
    except (ValueError, KeyError, TypeError) as e:  # JSON, UTF-8 and field errors
      raise StoreFormatError(f"{meta_path}: not a passage store's record ({e}): "
                             f"{_rebuild_hint(self.path)}") from None
    if self.meta.get("format") != STORE_FORMAT:
      raise StoreFormatError(f"{meta_path}: unknown format {self.meta.get('format')!r}")
    _check_size(self.path / "title.index", 4 * self.count,
                f"one int32 title number for each of the {self.count} passages")
    self._text = _Blob(self.path, "text", self.count)
    self._ids = _Blob(self.path, "ids", self.count)
    self._titles = _Blob(self.path, "title", num_titles)
    # mmap cannot map an empty file: a store of 0 passages has none to read.
    self.title_index = (np.memmap(self.path / "title.index", dtype="<i4", mode="r") if self.count
                        else np.zeros(0, "<i4"))
    self._id_lookup: tuple[np.ndarray, np.ndarray] | dict[str, int] | None = None

  def __len__(self) -> int:
    return self.count

  def _check(self, row: int) -> int:
    row = int(row)
    if not 0 <= row < self.count:
      raise IndexError(f"passage row {row} out of range [0, {self.count})")
    return row

  def text(self, row: int) -> str:
    return self._text[self._check(row)]

  def title(self, row: int) -> str:
    return self._titles[int(self.title_index[self._check(row)])]

  def doc_id(self, row: int) -> str:
    return self._ids[self._check(row)]

  def __getitem__(self, row: int) -> Passage:
    row = self._check(row)
    return Passage(self._ids[row], self.title(row), self._text[row])

  def get(self, rows: Sequence[int] | np.ndarray) -> list[Passage]:
    """Passages for a flat sequence of rows (e.g. one query's top-k ids)."""
    return [self[r] for r in np.asarray(rows).reshape(-1)]

  def titles_and_texts(self, start: int, stop: int) -> tuple[list[str], list[str]]:
    """(titles, texts) of rows [start, stop), the unit that the passage encoder consumes."""
    rows = range(self._check(start), min(stop, self.count))
    return [self.title(r) for r in rows], [self._text[r] for r in rows]

  def __iter__(self) -> Iterator[Passage]:
    for row in range(self.count):
      yield self[row]

  def rows_for_ids(self, ids: Sequence[str]) -> np.ndarray:
    """Row of each external id (int64, -1 where unknown); used to align foreign embeddings.

    Numeric ids (DPR's) are matched through a sorted int64 array (8 bytes a passage, no dict of
    21M strings); other ids through a dict built on first use.
    """
    if self._id_lookup is None:
      self._id_lookup = self._build_id_lookup()
    if isinstance(self._id_lookup, dict):
      return np.array([self._id_lookup.get(str(i), -1) for i in ids], dtype=np.int64)
    keys, rows = self._id_lookup
    numeric = np.array([str(i).isdigit() for i in ids], dtype=bool)
    wanted = np.array([int(i) if ok else -1 for i, ok in zip(ids, numeric, strict=True)],
                      dtype=np.int64)
    pos = np.clip(np.searchsorted(keys, wanted), 0, max(len(keys) - 1, 0))
    found = numeric & (keys[pos] == wanted) if len(keys) else np.zeros(len(ids), bool)
    return np.where(found, rows[pos] if len(keys) else -1, -1).astype(np.int64)

  def _build_id_lookup(self) -> tuple[np.ndarray, np.ndarray] | dict[str, int]:
    keys = np.empty(self.count, dtype=np.int64)
    for r in range(self.count):
      i = self._ids[r]
      if not (i.isdigit() and (i == "0" or not i.startswith("0"))):
        return {self._ids[j]: j for j in range(self.count)}
      keys[r] = int(i)
    order = np.argsort(keys, kind="stable")
    return keys[order], order.astype(np.int64)

  def close(self) -> None:
    for b in (self._text, self._ids, self._titles):
      b.close()
