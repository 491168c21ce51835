"""Corpus file -> passage store -> embeddings -> saved index, in one call.

``python -m rag_jax.commands.build_index`` is a thin wrapper around :func:`build_from_corpus`;
rag_jax.retrieval.retriever searches what it builds. A built directory holds::

  OUT/passages/     PassageStore (text and title by row)
  OUT/embeddings/   passage embeddings (resumable shards + manifest)
  OUT/index/        the saved index (exact or scann), with its own copy/hard links of the vectors
  OUT/build.json    what was built from what (corpus, encoder, index type and config)

Every stage is idempotent: a rerun reuses a complete passage store built from the same file,
resumes encoding from the finished shards, and replaces the index atomically.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

from rag_jax.retrieval.backends import make_index
from rag_jax.retrieval.embeddings import convert_dpr_pickles
from rag_jax.retrieval.encode import EncodeConfig, encode_from_checkpoint
from rag_jax.retrieval.exact import ExactConfig
from rag_jax.retrieval.index import Index
from rag_jax.retrieval.scann_index import ScannConfig
from rag_jax.retrieval.store import PassageStore, build_store_from_file
from rag_jax.utils.atomic import atomic_file

log = logging.getLogger(__name__)


def _same_source(store_dir: Path, corpus: Path, fmt: str, split_words: int | None) -> bool:
  meta = json.loads((store_dir / "store.json").read_text()).get("source", {})
  st = corpus.stat()
  return (meta.get("path") == str(corpus.resolve()) and meta.get("size") == st.st_size
          and meta.get("mtime_ns") == st.st_mtime_ns and meta.get("format") == fmt
          and meta.get("split_words") == split_words)


def build_store(corpus: str | os.PathLike, out: Path, fmt: str = "auto",
                split_words: int | None = 100, progress: bool = True) -> PassageStore:
  """OUT/passages from `corpus`, reused when it was already built from the same file."""
  corpus, path = Path(corpus), out / "passages"
  if (path / "store.json").exists():
    if _same_source(path, corpus, fmt, split_words):
      log.info("reusing passage store %s", path)
      return PassageStore(path)
    raise FileExistsError(
        f"{path} was built from another corpus file or with other settings; choose a new output "
        "directory (embeddings there belong to that store, nothing was overwritten)")
  return build_store_from_file(corpus, path, fmt=fmt, split_words=split_words, progress=progress)


def build_from_corpus(corpus: str | os.PathLike, out: str | os.PathLike, *,
                      encoder: str | None = None, tokenizer: str | None = None,
                      fmt: str = "auto", split_words: int | None = 100, index_type: str = "scann",
                      encode_config: EncodeConfig | None = None, compute_dtype: str = "float32",
                      scann_config: ScannConfig | None = None,
                      exact_config: ExactConfig | None = None,
                      dpr_embeddings: list[str] | None = None, allow_pickle: bool = False,
                      progress: bool = True) -> Index:
  """Runs every stage; see the module docstring for the layout of `out`.

  Args:
    corpus: a DPR ``psgs_w100.tsv``, an own ``title<TAB>text`` TSV or a JSONL file.
    encoder / tokenizer: DPRContextEncoder (and tokenizer) directory used to embed passages.
    dpr_embeddings: instead of encoding, DPR's published ``wikipedia_passages_*.pkl`` files in
      corpus order (requires `allow_pickle`, since unpickling runs code).
  Returns:
    The built index (also saved in OUT/index).
  """
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  store = build_store(corpus, out, fmt, split_words, progress)
  if dpr_embeddings:
    emb = convert_dpr_pickles(dpr_embeddings, out / "embeddings", allow_pickle=allow_pickle,
                              store=store, progress=progress)
  elif encoder is not None:
    emb = encode_from_checkpoint(store, out / "embeddings", encoder, tokenizer,
                                 config=encode_config, compute_dtype=compute_dtype,
                                 progress=progress)
  else:
    raise ValueError("give a passage encoder (--encoder) or DPR embedding files (--dpr_embeddings)")
  if emb.count != len(store):
    log.warning("%d embeddings for %d passages: rows past %d are not searchable", emb.count,
                len(store), emb.count)
  index = make_index(emb, index_type, scann_config=scann_config, exact_config=exact_config,
                      progress=progress)
  index.save(out / "index")
  record = {"corpus": str(Path(corpus).resolve()), "format": fmt, "split_words": split_words,
            "passages": len(store), "encoder": emb.encoder, "index_type": index_type,
            "encode_config": asdict(encode_config or EncodeConfig())}
  with atomic_file(out / "build.json", "w") as f:
    json.dump(record, f, indent=2)
  return index
