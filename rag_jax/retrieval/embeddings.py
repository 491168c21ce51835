"""Sharded on-disk passage embeddings: a manifest plus ``.npy`` shards of consecutive rows.

Layout of an embeddings directory::

  manifest.json      {"format", "count", "dim", "dtype", "shard_size", "num_shards",
                      "encoder": {...}, "complete": bool}
  shard-00000.npy    rows [0, shard_size) as a (rows, dim) array
  shard-00001.npy    rows [shard_size, 2 * shard_size) ...

Row i of the embeddings is passage row i of the :class:`~rag_jax.retrieval.store.PassageStore`.
Every shard is written with :func:`~rag_jax.utils.atomic.atomic_file`, so a shard file either is
complete or does not exist: an encoding job killed at any point resumes from the shards that
exist (see :mod:`rag_jax.retrieval.encode`). The manifest is written first (``complete: false``)
and rewritten with ``complete: true`` after the last shard.

``bfloat16`` has no numpy dtype; its shards hold the raw bits as ``uint16`` and are viewed as
``ml_dtypes.bfloat16`` on load. Shards are memory-mapped on load.

DPR's published ``wikipedia_passages_*.pkl`` files (pickled lists of ``(id, vector)``) are read
by :func:`convert_dpr_pickles` only with ``allow_pickle=True``: unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from rag_jax.utils.atomic import atomic_directory, atomic_file
from rag_jax.utils.errors import UserError

log = logging.getLogger(__name__)

EMBEDDINGS_FORMAT = "rag_jax.embeddings/1"
DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
          "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_STORAGE = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2")}


class EmbeddingFormatError(UserError, ValueError):
  """An embeddings directory whose files disagree with its manifest."""


class PickleNotAllowedError(UserError, PermissionError):
  """Refusal to unpickle a file without the explicit opt-in."""


def shard_name(i: int) -> str:
  return f"shard-{i:05d}.npy"


def shard_bounds(count: int, shard_size: int) -> list[tuple[int, int]]:
  """[(start, stop)] of each shard: consecutive rows, all full except possibly the last."""
  return [(s, min(s + shard_size, count)) for s in range(0, count, shard_size)]


def make_manifest(count: int, dim: int, dtype: str, shard_size: int,
                  encoder: dict | None = None, complete: bool = False) -> dict:
  if dtype not in DTYPES:
    raise ValueError(f"unsupported embedding dtype {dtype!r}; expected one of {list(DTYPES)}")
  if count < 0 or dim <= 0 or shard_size <= 0:
    raise ValueError(f"bad embeddings shape: count={count} dim={dim} shard_size={shard_size}")
  return {"format": EMBEDDINGS_FORMAT, "count": int(count), "dim": int(dim), "dtype": dtype,
          "shard_size": int(shard_size), "num_shards": len(shard_bounds(count, shard_size)),
          "encoder": encoder or {}, "complete": complete}


def write_manifest(directory: Path, manifest: dict) -> None:
  with atomic_file(directory / "manifest.json", "w") as f:
    json.dump(manifest, f, indent=2)


def write_shard(directory: Path, index: int, array: np.ndarray, dtype: str) -> None:
  """Writes one shard atomically, converting `array` (rows, dim) to the manifest dtype."""
  arr = np.asarray(array, dtype=DTYPES[dtype])
  if dtype == "bfloat16":
    arr = arr.view(np.uint16)
  with atomic_file(directory / shard_name(index), "wb") as f:
    np.save(f, np.ascontiguousarray(arr, dtype=_STORAGE[dtype]))


def _read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
  """(shape, dtype, offset of the data) of a .npy file, from its header alone."""
  with open(path, "rb") as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    else:
      shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, dtype, f.tell()


REBUILD_HINT = ("rerun python -m rag_jax.commands.build_index with the same --corpus and --out: it "
                "encodes a damaged shard again and rebuilds the index from the shards")


class EmbeddingStore:
  """Read access to an embeddings directory, validated against its manifest.

  Args:
    path: the directory.
    require_complete: refuse a directory whose encoding has not finished (default).
  """

  def __init__(self, path: str | os.PathLike, require_complete: bool = True):
    self.path = Path(path)
    mpath = self.path / "manifest.json"
    if not mpath.exists():
      raise FileNotFoundError(f"{mpath} not found: {self.path} is not an embeddings directory")
    self.manifest = json.loads(mpath.read_text())
    if self.manifest.get("format") != EMBEDDINGS_FORMAT:
      raise EmbeddingFormatError(f"{mpath}: unknown format {self.manifest.get('format')!r}")
    if require_complete and not self.manifest.get("complete"):
      raise EmbeddingFormatError(f"{mpath}: encoding has not finished (complete=false); resume it")
    self.count = int(self.manifest["count"])
    self.dim = int(self.manifest["dim"])
    self.dtype_name = self.manifest["dtype"]
    if self.dtype_name not in DTYPES:
      raise EmbeddingFormatError(f"{mpath}: unsupported dtype {self.dtype_name!r}")
    self.dtype = DTYPES[self.dtype_name]
    self.bounds = shard_bounds(self.count, int(self.manifest["shard_size"]))
    if require_complete:
      for i in range(len(self.bounds)):
        self.check_shard(i)

  @property
  def encoder(self) -> dict:
    return self.manifest.get("encoder", {})

  def check_shard(self, i: int) -> bool:
    """Raises EmbeddingFormatError if shard `i` disagrees with the manifest; False if absent."""
    path = self.path / shard_name(i)
    if not path.exists():
      if self.manifest.get("complete"):
        raise EmbeddingFormatError(f"{path} is missing (manifest lists {len(self.bounds)} "
                                   f"shards); {REBUILD_HINT}")
      return False
    start, stop = self.bounds[i]
    try:
      shape, dtype, offset = _read_npy_header(path)
    except (ValueError, EOFError) as e:  # EOFError: cut inside the header
      raise EmbeddingFormatError(f"{path}: not a valid .npy file ({e}); {REBUILD_HINT}") from None
    if shape != (stop - start, self.dim):
      raise EmbeddingFormatError(
          f"{path}: shape {shape} disagrees with the manifest: rows [{start}, {stop}) x dim "
          f"{self.dim} expect {(stop - start, self.dim)}")
    if dtype != _STORAGE[self.dtype_name]:
      raise EmbeddingFormatError(f"{path}: dtype {dtype} but the manifest says {self.dtype_name}")
    expected = offset + (stop - start) * self.dim * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
      raise EmbeddingFormatError(
          f"{path}: {actual} bytes, expected {expected} (a {offset}-byte header and "
          f"{stop - start} x {self.dim} {self.dtype_name} values): the shard is truncated or "
          f"damaged; {REBUILD_HINT}")
    return True

  def shard(self, i: int) -> np.ndarray:
    """Shard `i` as a read-only memory map of shape (rows, dim) in the manifest dtype."""
    self.check_shard(i)
    arr = np.load(self.path / shard_name(i), mmap_mode="r")
    return arr.view(self.dtype) if self.dtype_name == "bfloat16" else arr

  def iter_shards(self) -> Iterator[tuple[int, int, np.ndarray]]:
    for i, (start, stop) in enumerate(self.bounds):
      yield start, stop, self.shard(i)

  def to_array(self, dtype: np.dtype | str = np.float32, progress: bool = False) -> np.ndarray:
    """All embeddings as one in-memory (count, dim) array (what index building needs)."""
    out = np.empty((self.count, self.dim), dtype=dtype)
    for start, stop, shard in tqdm(self.iter_shards(), total=len(self.bounds), disable=not progress,
                                   unit=" shards", desc="loading embeddings"):
      out[start:stop] = shard
    return out

  def rows(self, ids: np.ndarray) -> np.ndarray:
    """Embeddings of arbitrary rows, any shape of `ids` -> ids.shape + (dim,), float32."""
    ids = np.asarray(ids)
    flat = ids.reshape(-1)  # (n,) rows to gather
    if flat.size and (flat.min() < 0 or flat.max() >= self.count):
      raise IndexError(f"embedding rows must lie in [0, {self.count})")
    out = np.empty((flat.size, self.dim), np.float32)
    size = int(self.manifest["shard_size"])
    shard_of = flat // size
    for s in np.unique(shard_of):
      sel = np.nonzero(shard_of == s)[0]
      out[sel] = self.shard(int(s))[flat[sel] - s * size]
    return out.reshape(*ids.shape, self.dim)  # ids.shape + (dim,)

  def copy_to(self, directory: str | os.PathLike) -> None:
    """Places this store's files in `directory` (existing, empty): hard links when possible.

    Shards are immutable once written (a rewrite replaces the inode), so a hard link is a safe
    zero-cost copy; across file systems it falls back to a real copy.
    """
    directory = Path(directory)
    for i in range(len(self.bounds)):
      src, dst = self.path / shard_name(i), directory / shard_name(i)
      try:
        os.link(src, dst)
      except OSError:
        shutil.copy2(src, dst)
    write_manifest(directory, self.manifest)


def save_embeddings(array: np.ndarray, path: str | os.PathLike, *, dtype: str = "float32",
                    shard_size: int = 1 << 20, encoder: dict | None = None,
                    overwrite: bool = True) -> EmbeddingStore:
  """Writes an in-memory (count, dim) array as a complete embeddings directory, atomically."""
  array = np.asarray(array)
  if array.ndim != 2:
    raise ValueError(f"embeddings must be (count, dim), got shape {array.shape}")
  with atomic_directory(path, overwrite=overwrite) as tmp:
    write_into(tmp, array, dtype=dtype, shard_size=shard_size, encoder=encoder)
  return EmbeddingStore(path)


def write_into(directory: Path, array: np.ndarray, *, dtype: str = "float32",
               shard_size: int = 1 << 20, encoder: dict | None = None) -> None:
  """Writes manifest and shards of `array` into an existing directory (e.g. an index's temp dir)."""
  manifest = make_manifest(array.shape[0], array.shape[1], dtype, shard_size, encoder)
  for i, (start, stop) in enumerate(shard_bounds(array.shape[0], shard_size)):
    write_shard(directory, i, array[start:stop], dtype)
  manifest["complete"] = True
  write_manifest(directory, manifest)


def convert_dpr_pickles(pickle_paths: Sequence[str | os.PathLike], out: str | os.PathLike, *,
                        allow_pickle: bool = False, dtype: str = "float32",
                        store=None, id_prefix: str = "wiki:",
                        progress: bool = True) -> EmbeddingStore:
  """One-time conversion of DPR's ``wikipedia_passages_*.pkl`` into our embeddings format.

  DPR's ``generate_dense_embeddings.py`` pickles a list of ``(passage id, float32 vector)`` per
  file, in corpus order. Each pickle becomes one shard (kept on a crash; a rerun skips finished
  ones). Rows must follow the passage store's order: with `store` given, every id (an int or a
  string, `id_prefix` such as DPR's ``wiki:`` removed) is checked against the store's id at that
  row, and a mismatch names the file and the first bad entry.

  Args:
    pickle_paths: the files in corpus order (``wikipedia_passages_0.pkl`` ...).
    out: the embeddings directory to create.
    allow_pickle: must be True. Unpickling executes code embedded in the file; pass it (flag
      ``--allow_pickle`` on the command line) only for files from a source you trust.
    dtype: storage dtype of the converted shards.
    store: optional :class:`~rag_jax.retrieval.store.PassageStore` to verify the alignment against.
    id_prefix: prefix stripped from string ids before comparing with the store.
  """
  if not allow_pickle:
    raise PickleNotAllowedError(
        "refusing to unpickle DPR embedding files: unpickling runs arbitrary code from the file. "
        "If you trust the source, pass allow_pickle=True (command line: --allow_pickle); the "
        "files are converted once into the safe .npy shard format.")
  pickle_paths = [Path(p) for p in pickle_paths]
  out = Path(out)
  if (out / "manifest.json").exists() and EmbeddingStore(out, require_complete=False).manifest.get(
      "complete"):
    try:
      return EmbeddingStore(out)
    except EmbeddingFormatError as e:  # a shard damaged since: the conversion is done again
      log.warning("%s; converting the DPR files again", str(e).split("; ")[0])
  work = out.with_name(out.name + ".partial")
  work.mkdir(parents=True, exist_ok=True)
  sizes_path = work / "sizes.json"
  sizes = json.loads(sizes_path.read_text()) if sizes_path.exists() else {}
  dim = None
  start = 0
  for i, p in enumerate(tqdm(pickle_paths, unit=" files", disable=not progress,
                             desc="converting DPR pickles")):
    key = shard_name(i)
    if key in sizes and (work / key).exists():
      start += sizes[key][0]
      dim = sizes[key][1]
      continue
    with open(p, "rb") as f:
      items = pickle.load(f)  # noqa: S301 (explicit opt-in above)
    ids = [str(x[0]) for x in items]
    vecs = np.stack([np.asarray(x[1], dtype=np.float32).reshape(-1) for x in items])  # (n, dim)
    if dim is not None and vecs.shape[1] != dim:
      raise EmbeddingFormatError(f"{p}: vectors have dim {vecs.shape[1]}, earlier files {dim}")
    dim = vecs.shape[1]
    if store is not None:
      clean = [i[len(id_prefix):] if id_prefix and i.startswith(id_prefix) else i for i in ids]
      rows = store.rows_for_ids(clean)
      bad = np.nonzero(rows != np.arange(start, start + len(ids)))[0]
      if bad.size:
        j = int(bad[0])
        raise EmbeddingFormatError(
            f"{p}: entry {j} has passage id {ids[j]!r}, expected the id of passage row "
            f"{start + j} ({store.doc_id(start + j) if start + j < len(store) else 'past the end'})"
            "; DPR pickles must be given in corpus order")
    write_shard(work, i, vecs, dtype)
    sizes[key] = [len(ids), dim]
    with atomic_file(sizes_path, "w") as f:
      json.dump(sizes, f)
    start += len(ids)
  # Our format wants equal-sized shards; DPR's files are near-equal, so re-shard at the end only
  # if needed (cheap relative to unpickling, which is what resumption protects).
  counts = [sizes[shard_name(i)][0] for i in range(len(pickle_paths))]
  shard_size = counts[0] if counts else 1
  with atomic_directory(out) as tmp:
    if all(c == shard_size for c in counts[:-1]) and counts[-1] <= shard_size:
      for i in range(len(pickle_paths)):
        os.replace(work / shard_name(i), tmp / shard_name(i))
    else:
      _reshard(work, len(counts), tmp, shard_size := max(counts), dtype)
    write_manifest(tmp, make_manifest(sum(counts), dim or 0, dtype, shard_size,
                                      {"source": "dpr_pickles",
                                       "files": [str(p) for p in pickle_paths]}, complete=True))
  shutil.rmtree(work, ignore_errors=True)
  return EmbeddingStore(out)


def _reshard(src: Path, num_src: int, dst: Path, shard_size: int, dtype: str) -> None:
  """Streams shards of unequal sizes from `src` into equal `shard_size` shards in `dst`."""
  buf: list[np.ndarray] = []
  buffered = 0
  out_i = 0
  for i in range(num_src):
    part = np.load(src / shard_name(i), mmap_mode="r")
    part = part.view(DTYPES[dtype]) if dtype == "bfloat16" else part
    buf.append(part)
    buffered += part.shape[0]
    while buffered >= shard_size:
      block = np.concatenate(buf)  # (buffered, dim)
      write_shard(dst, out_i, block[:shard_size], dtype)
      out_i += 1
      buf, buffered = [block[shard_size:]], buffered - shard_size
  if buffered:
    write_shard(dst, out_i, np.concatenate(buf), dtype)
