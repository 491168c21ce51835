"""Corpus file -> passage store -> embeddings -> saved index, in one call.

``python -m rag_jax.commands.build_index`` is a thin wrapper around :func:`build_from_corpus`;
rag_jax.retrieval.retriever searches what it builds. A built directory holds::

  OUT/passages/     PassageStore (text and title by row)
  OUT/embeddings/   passage embeddings (resumable shards + manifest)
  OUT/index/        the saved index (exact or scann), with its own copy/hard links of the vectors
  OUT/build.json    what was built from what (corpus, encoder, index type and config)

Every stage is idempotent: a rerun reuses a complete passage store built from the same file,
resumes encoding from the finished shards, and replaces the index atomically.

Ownership: OUT/.rag_build.json (the manifest) lists every file build_index wrote there. A stage
refuses to replace a path holding a file the manifest does not list (a user's file in OUT/index/
is never deleted), and a directory holding any of the names above without a manifest is refused
whole. Other files beside them are left alone.

No partial output under the final name: a new OUT is built as OUT's sibling `.OUT.partial` (a
killed build resumes there) and renamed to OUT when complete; an existing OUT of ours is updated
in place, one atomic stage at a time. The corpus is checked (exists, not empty, UTF-8 text)
before anything is written, and a build that fails before finishing a stage leaves no directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

from jax.sharding import Mesh

from rag_jax.distributed import check_same, is_primary, on_primary
from rag_jax.retrieval.backends import load_index, make_index
from rag_jax.retrieval.calibrate import CalibrationSpec, calibrate_built_index
from rag_jax.retrieval.corpus import check_corpus
from rag_jax.retrieval.embeddings import EmbeddingStore, convert_dpr_pickles
from rag_jax.retrieval.encode import (
  AGREE_TIMEOUT_S,
  SHARE_TIMEOUT_S,
  EncodeConfig,
  encode_from_checkpoint,
)
from rag_jax.retrieval.exact import ExactConfig
from rag_jax.retrieval.index import Index
from rag_jax.retrieval.scann_index import ScannConfig, ScannIndex
from rag_jax.retrieval.store import PassageStore, build_store_from_file
from rag_jax.utils.atomic import atomic_file
from rag_jax.utils.errors import UserError
from rag_jax.utils.faults import kill_point

log = logging.getLogger(__name__)


def _same_source(store_dir: Path, corpus: Path, fmt: str, split_words: int | None) -> bool:
  meta = json.loads((store_dir / "store.json").read_text()).get("source", {})
  st = corpus.stat()
  return (meta.get("path") == str(corpus.resolve()) and meta.get("size") == st.st_size
          and meta.get("mtime_ns") == st.st_mtime_ns and meta.get("format") == fmt
          and meta.get("split_words") == split_words)


class BuildOutputError(UserError, FileExistsError):
  """The output directory holds something build_index did not write (or another build)."""


MANIFEST = ".rag_build.json"
OWNED = ("passages", "embeddings", "index", "build.json")


def build_store(corpus: str | os.PathLike, out: Path, fmt: str = "auto",
                split_words: int | None = 100, progress: bool = True) -> PassageStore:
  """OUT/passages from `corpus`, reused when it was already built from the same file."""
  corpus, path = Path(corpus), out / "passages"
  if (path / "store.json").exists():
    if _same_source(path, corpus, fmt, split_words):
      log.info("reusing passage store %s", path)
      return PassageStore(path)
    raise BuildOutputError(
        f"{path} was built from another corpus file or with other settings; choose a new output "
        "directory (embeddings there belong to that store, nothing was overwritten)")
  return build_store_from_file(corpus, path, fmt=fmt, split_words=split_words, progress=progress)


def _files(root: Path, name: str) -> list[str]:
  """Relative paths of the files under root/name (or root/name itself if a file)."""
  path = root / name
  if path.is_file():
    return [name]
  return sorted(str(p.relative_to(root)) for p in path.rglob("*") if p.is_file())


class Ownership:
  """OUT's manifest: the files build_index wrote, and the stage being written (a kill during a
  stage leaves files the manifest cannot list yet; that stage's path is trusted on resume)."""

  def __init__(self, out: Path):
    self.out, self.path = out, out / MANIFEST
    _remove_leftovers(out, MANIFEST.lstrip("."))
    if self.path.exists():
      self.data = json.loads(self.path.read_text())
    else:
      ours = [n for n in OWNED if (out / n).exists()]
      if ours:
        raise BuildOutputError(
            f"{out} holds {ours} but no {MANIFEST}: build_index did not write them (or an older "
            "version did); refusing to replace them. Choose a new --out, or move them away")
      self.data = {"files": [], "writing": []}

  def _save(self) -> None:
    with atomic_file(self.path, "w") as f:
      json.dump(self.data, f, indent=2)

  @contextlib.contextmanager
  def stage(self, name: str) -> Iterator[None]:
    """Refuses to touch OUT/name if it holds a file not written by build_index; records the
    files there once the block completes. A stage a killed run left unfinished (listed in
    `writing`) is trusted: its files are that run's, not yet recorded."""
    writing = self.data.setdefault("writing", [])
    _remove_leftovers(self.out, name)
    if name not in writing:
      foreign = sorted(set(_files(self.out, name)) - set(self.data["files"]))
      if foreign:
        raise BuildOutputError(
            f"{self.out / foreign[0]} was not written by build_index ({len(foreign)} such "
            f"file(s) under {self.out / name}); refusing to replace it. Move it away and rerun")
      writing.append(name)
      self._save()
    yield
    kept = [f for f in self.data["files"] if f != name and not f.startswith(name + "/")]
    self.data = {"files": sorted(kept + _files(self.out, name)),
                 "writing": [w for w in writing if w != name]}
    self._save()


def _remove_leftovers(out: Path, name: str) -> None:
  """Deletes the temporaries that a killed atomic write of OUT/name left beside it (named
  `.NAME.tmp-*` / `.NAME.old-*` by rag_jax.utils.atomic, so never a user's file)."""
  for pattern in (f".{name}.tmp-*", f".{name}.old-*"):
    for leftover in out.glob(pattern):
      if leftover.is_dir():
        shutil.rmtree(leftover, ignore_errors=True)
      else:
        leftover.unlink(missing_ok=True)


def _finished_stages(work: Path) -> list[str]:
  """The files of the finished stages recorded in `work`'s manifest (none if it has none)."""
  try:
    return json.loads((work / MANIFEST).read_text())["files"]
  except (OSError, ValueError, KeyError):
    return []


def _staging(out: Path) -> Path:
  return out.parent / f".{out.name}.partial"


def build_from_corpus(corpus: str | os.PathLike, out: str | os.PathLike, *,
                      encoder: str | None = None, tokenizer: str | None = None,
                      fmt: str = "auto", split_words: int | None = 100, index_type: str = "scann",
                      encode_config: EncodeConfig | None = None, compute_dtype: str = "float32",
                      scann_config: ScannConfig | None = None,
                      exact_config: ExactConfig | None = None,
                      calibration: CalibrationSpec | None = None,
                      dpr_embeddings: list[str] | None = None, allow_pickle: bool = False,
                      progress: bool = True, mesh: Mesh | None = None) -> Index:
  """Runs every stage; see the module docstring for the layout of `out`.

  Args:
    corpus: a DPR ``psgs_w100.tsv``, an own ``title<TAB>text`` TSV or a JSONL file.
    encoder / tokenizer: DPRContextEncoder (and tokenizer) directory used to embed passages.
    dpr_embeddings: instead of encoding, DPR's published ``wikipedia_passages_*.pkl`` files in
      corpus order (requires `allow_pickle`, since unpickling runs code).
    calibration: for a ScaNN index, the recall its `leaves_to_search` is tuned to before it is
      saved (rag_jax.retrieval.calibrate); None keeps `scann_config`'s width.
    mesh: the devices that encode (default: this process's).
  Returns:
    The built index (also saved in OUT/index).
  """
  check_corpus(corpus)
  if dpr_embeddings is None and encoder is None:
    raise ValueError("give a passage encoder (--encoder) or DPR embedding files (--dpr_embeddings)")
  final = Path(out)
  fresh = not final.exists()
  work = _staging(final) if fresh else final
  work.mkdir(parents=True, exist_ok=True)
  try:
    index = _build(corpus, work, encoder=encoder, tokenizer=tokenizer, fmt=fmt,
                   split_words=split_words, index_type=index_type, encode_config=encode_config,
                   compute_dtype=compute_dtype, scann_config=scann_config,
                   exact_config=exact_config, calibration=calibration,
                   dpr_embeddings=dpr_embeddings, allow_pickle=allow_pickle, progress=progress,
                   mesh=mesh)
  except BaseException:
    if fresh and not _finished_stages(work):
      shutil.rmtree(work, ignore_errors=True)  # nothing worth resuming: leave no directory
    raise
  if fresh:
    kill_point("build_index:before_publish")
    os.rename(work, final)  # atomic: OUT appears complete or not at all
    index = load_index(final / "index")
  return index


def _build(corpus: str | os.PathLike, out: Path, *, encoder: str | None, tokenizer: str | None,
           fmt: str, split_words: int | None, index_type: str,
           encode_config: EncodeConfig | None, compute_dtype: str,
           scann_config: ScannConfig | None, exact_config: ExactConfig | None,
           calibration: CalibrationSpec | None, dpr_embeddings: list[str] | None,
           allow_pickle: bool, progress: bool, mesh: Mesh | None) -> Index:
  """The stages, in `out` (OUT itself or its staging directory), each under the manifest."""
  owner = Ownership(out)
  with owner.stage("passages"):
    store = build_store(corpus, out, fmt, split_words, progress)
  with owner.stage("embeddings"):
    if dpr_embeddings:
      emb = convert_dpr_pickles(dpr_embeddings, out / "embeddings", allow_pickle=allow_pickle,
                                store=store, progress=progress)
    else:
      emb = encode_from_checkpoint(store, out / "embeddings", encoder, tokenizer,
                                   config=encode_config, compute_dtype=compute_dtype,
                                   mesh=mesh, progress=progress)
  if emb.count != len(store):
    log.warning("%d embeddings for %d passages: rows past %d are not searchable", emb.count,
                len(store), emb.count)
  index = make_index(emb, index_type, scann_config=scann_config, exact_config=exact_config,
                     progress=progress)
  if calibration is not None and isinstance(index, ScannIndex):
    calibrate_built_index(index, calibration, progress)
  with owner.stage("index"):
    index.save(out / "index")
  record = {"corpus": str(Path(corpus).resolve()), "format": fmt, "split_words": split_words,
            "passages": len(store), "encoder": emb.encoder, "index_type": index_type,
            "encode_config": asdict(encode_config or EncodeConfig())}
  with owner.stage("build.json"), atomic_file(out / "build.json", "w") as f:
    json.dump(record, f, indent=2)
  return index


def corpus_file_fingerprint(path: str | os.PathLike, edge: int = 1 << 20) -> str:
  """'<name>, <size> bytes, sha256 <hex>' of a corpus file's size and first and last `edge`
  bytes (cheap for a 13 GB file; another file or version differs in it; paths may differ
  between hosts, so only the name counts)."""
  path = Path(path)
  size = path.stat().st_size
  h = hashlib.sha256()
  with open(path, "rb") as f:
    h.update(f.read(edge))
    f.seek(max(edge, size - edge))
    h.update(f.read(edge))
  return f"{path.name}, {size} bytes, sha256 {h.hexdigest()[:16]}"


def encode_corpus(corpus: str | os.PathLike, out: str | os.PathLike, *, encoder: str,
                  tokenizer: str | None = None, fmt: str = "auto",
                  split_words: int | None = 100, encode_config: EncodeConfig | None = None,
                  compute_dtype: str = "float32", progress: bool = True,
                  lock: Callable[[Path], contextlib.AbstractContextManager] | None = None,
                  mesh: Mesh | None = None) -> EmbeddingStore | None:
  """The passage-store and embedding stages of :func:`build_from_corpus`, on every process of
  the job (rag_jax/distributed.py): process 0 builds OUT/passages while the others wait, then
  each encodes its share of OUT/embeddings (rag_jax/retrieval/encode.py). OUT is written in
  place, under the same ownership manifest, so ``build_index --out=OUT`` on one process then
  reuses both stages and builds the index.

  Args:
    lock: process 0 holds lock(OUT) for the run (the command's `output_lock`).
    mesh: this process's devices that encode (default: all of them).
  Returns:
    The complete embeddings (every process), or None if stopped early.
  """
  out = Path(out)
  check_same("pipeline/corpus", {"corpus file": corpus_file_fingerprint(corpus), "format": fmt,
                                 "split_words": str(split_words)}, AGREE_TIMEOUT_S,
             "every process must read the same corpus file the same way")
  held = contextlib.ExitStack()
  owner: list[Ownership] = []

  def passages() -> None:
    check_corpus(corpus)
    if lock is not None:
      held.enter_context(lock(out))
    out.mkdir(parents=True, exist_ok=True)
    owner.append(Ownership(out))
    with owner[0].stage("passages"):
      build_store(corpus, out, fmt, split_words, progress)

  with held:
    on_primary("pipeline/passages", passages, SHARE_TIMEOUT_S)
    store = PassageStore(out / "passages")
    stage = owner[0].stage("embeddings") if is_primary() else contextlib.nullcontext()
    with stage:
      return encode_from_checkpoint(store, out / "embeddings", encoder, tokenizer,
                                    config=encode_config, compute_dtype=compute_dtype,
                                    mesh=mesh, progress=progress)
