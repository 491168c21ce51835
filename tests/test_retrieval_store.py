"""A damaged passage store is refused by name: each file cut, missing or garbled gives a
StoreFormatError (or StoreFileError) naming the file, its size against the size store.json
implies, and how to rebuild it; none is a numpy or mmap traceback."""

import pytest

from rag_jax.retrieval.corpus import Passage
from rag_jax.retrieval.store import PassageStore, StoreFileError, StoreFormatError, write_store
from rag_jax.utils.errors import UserError

PASSAGES = [Passage("1", "Rome", "the capital"), Passage("2", "Rome", "a river"),
            Passage("3", "Oslo", "fjords")]


@pytest.fixture
def store_dir(tmp_path):
  write_store(PASSAGES, tmp_path / "passages", progress=False).close()
  return tmp_path / "passages"


def _hint(directory) -> str:
  return (f"the passage store {directory} is truncated or damaged; rebuild it: delete {directory} "
          "and rerun python -m rag_jax.commands.build_index with the same --corpus and --out "
          "(the embeddings already computed are kept)")


def _cut(path, size: int) -> int:
  """Cuts `path` to `size` bytes; returns its whole size (the reference: what was written)."""
  data = path.read_bytes()
  path.write_bytes(data[:size])
  return len(data)


def test_a_whole_store_reads_back(store_dir):
  assert list(PassageStore(store_dir)) == PASSAGES


@pytest.mark.parametrize("name,size,what", [
    ("text.bin", 5, "where text.offsets ends"),
    ("title.bin", 0, "where title.offsets ends"),
    ("text.offsets", 13, "4 int64 offsets of the 3 items in {meta}"),
    ("ids.offsets", 0, "4 int64 offsets of the 3 items in {meta}"),
    ("title.offsets", 8, "3 int64 offsets of the 2 items in {meta}"),
    ("title.index", 6, "one int32 title number for each of the 3 passages"),
])
def test_a_cut_file_is_named_with_its_expected_size(store_dir, name, size, what):
  # The old store: ValueError (a traceback in the commands), or numpy's own memmap errors ("Size
  # of available data is not a multiple of the data-type size", "cannot mmap an empty file").
  whole = _cut(store_dir / name, size)
  with pytest.raises(StoreFormatError) as e:
    PassageStore(store_dir)
  assert isinstance(e.value, UserError)
  assert str(e.value) == (f"{store_dir / name}: {size} bytes, expected {whole} "
                          f"({what.format(meta=store_dir / 'store.json')}): {_hint(store_dir)}")


def test_a_missing_or_garbled_file_is_named(store_dir):
  (store_dir / "ids.bin").unlink()
  with pytest.raises(StoreFileError) as e:
    PassageStore(store_dir)
  assert isinstance(e.value, FileNotFoundError)
  assert str(e.value) == f"{store_dir / 'ids.bin'} is missing: {_hint(store_dir)}"
  (store_dir / "store.json").write_text('{"format": "rag_jax.passages/1", "cou')
  with pytest.raises(StoreFormatError, match=r"store\.json: not a passage store's record "):
    PassageStore(store_dir)
