"""Corpus file -> passage store -> embeddings -> saved index, and questions -> top-k passages.

The two command-line tools (``python -m rag_jax.retrieval.build_index`` / ``.search``) are thin
wrappers around :func:`build_from_corpus` and :class:`Retriever`. A built directory holds::

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rag_jax.retrieval.embeddings import EmbeddingStore, convert_dpr_pickles
from rag_jax.retrieval.encode import EncodeConfig, encode_from_checkpoint
from rag_jax.retrieval.exact import ExactConfig, ExactIndex
from rag_jax.retrieval.index import Index, load_index
from rag_jax.retrieval.scann_index import ScannConfig, ScannIndex
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


def build_index(embeddings: EmbeddingStore, kind: str, *, scann_config: ScannConfig | None = None,
                exact_config: ExactConfig | None = None, progress: bool = True) -> Index:
  if kind == "scann":
    return ScannIndex.build(embeddings, scann_config, progress=progress)
  if kind == "exact":
    return ExactIndex.build(embeddings, exact_config)
  raise ValueError(f"unknown index type {kind!r}; expected 'scann' or 'exact'")


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
  index = build_index(emb, index_type, scann_config=scann_config, exact_config=exact_config,
                      progress=progress)
  index.save(out / "index")
  record = {"corpus": str(Path(corpus).resolve()), "format": fmt, "split_words": split_words,
            "passages": len(store), "encoder": emb.encoder, "index_type": index_type,
            "encode_config": asdict(encode_config or EncodeConfig())}
  with atomic_file(out / "build.json", "w") as f:
    json.dump(record, f, indent=2)
  return index


def tokenize_questions(tokenizer: Any, questions: list[str], max_length: int,
                       bucket: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Question-encoder ids and mask [Q, Lq] int32, Lq padded up to a multiple of `bucket` so
  that a jitted encoder compiles for a few lengths only (DPR pools [CLS]: padding is masked)."""
  seqs = tokenizer(questions, truncation=True, max_length=max_length)["input_ids"]
  length = -(-max(len(s) for s in seqs) // bucket) * bucket
  ids = np.full((len(seqs), length), tokenizer.pad_token_id or 0, np.int32)  # [Q, Lq]
  mask = np.zeros_like(ids)
  for i, s in enumerate(seqs):
    ids[i, :len(s)], mask[i, :len(s)] = s, 1
  return ids, mask


@dataclass(frozen=True)
class Hit:
  """One retrieved passage: its store row, exact inner-product score, id, title and text."""

  row: int
  score: float
  id: str
  title: str
  text: str


class Retriever:
  """Questions -> top-k passages, with a DPR question encoder and a built directory.

  Args:
    directory: a directory written by :func:`build_from_corpus`.
    question_encoder: DPRQuestionEncoder directory (config.json + weights).
    tokenizer: its tokenizer directory (default: the encoder's).
    max_length: question token budget.
    index_kwargs: passed to :func:`load_index` (e.g. ``mesh=`` for an exact index).
  """

  def __init__(self, directory: str | os.PathLike, question_encoder: str,
               tokenizer: str | None = None, max_length: int = 128, **index_kwargs):
    from transformers import AutoTokenizer

    from rag_jax.checkpoints import load_pretrained

    directory = Path(directory)
    self.store = PassageStore(directory / "passages")
    self.index = load_index(directory / "index", **index_kwargs)
    self.model, self.params = load_pretrained(question_encoder)
    self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or question_encoder)
    self.max_length = max_length
    self._encode = jax.jit(lambda p, ids, mask: self.model.apply(
        {"params": p}, input_ids=ids, attention_mask=mask,
        token_type_ids=jnp.zeros_like(ids)).pooler_output)

  def encode(self, questions: list[str]) -> np.ndarray:
    """(len(questions), D) float32 question embeddings."""
    ids, mask = tokenize_questions(self.tokenizer, questions, self.max_length)
    return np.asarray(self._encode(self.params, ids, mask), dtype=np.float32)

  def retrieve(self, questions: list[str], k: int = 5) -> list[list[Hit]]:
    """Top-k :class:`Hit` lists, best first, one per question."""
    scores, rows = self.index.search(self.encode(questions), k)
    out = []
    for sc, rw in zip(scores, rows, strict=True):
      hits = []
      for s, r in zip(sc, rw, strict=True):
        if r >= 0:
          p = self.store[int(r)]
          hits.append(Hit(int(r), float(s), p.id, p.title, p.text))
      out.append(hits)
    return out
