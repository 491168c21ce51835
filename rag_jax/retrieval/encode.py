"""Passage encoding: DPR context encoder over a passage store, into resumable embedding shards.

Input per passage is DPR's ``[CLS] title [SEP] text [SEP]`` (the tokenizer's pair encoding,
truncated to `max_length` longest-first as DPR and transformers' ``use_own_knowledge_dataset.py``
do) with all-zero segment ids: DPR trained its encoders with zero token types, and the reference
passes only ``input_ids`` so the encoder's zero default applies; the tokenizer's pair type ids
would change every embedding.

Throughput: passages of a shard are sorted by token length and batched, each batch padded to a
multiple of `length_bucket` (few distinct shapes, so few compilations, little padding); the
jitted encoder is a ``shard_map`` over all local devices (batch split on the mesh axis, params
replicated); the next shard is tokenized on a background thread (the Rust tokenizer releases
the GIL) while the devices work, and device results are fetched one batch late so dispatch
overlaps compute.

Resumption: shards are written atomically in order; a rerun with the same settings skips every
shard file that exists (it was complete, or it would not exist) and deletes stale temporaries.
The manifest records the encoder's checksum, the tokenizer and `max_length`, and a rerun with
different ones refuses to mix embeddings from two encoders.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from rag_jax.checkpoints import load_pretrained, load_tokenizer
from rag_jax.parallel import local_data_mesh
from rag_jax.retrieval.embeddings import (
  EmbeddingFormatError,
  EmbeddingStore,
  make_manifest,
  shard_bounds,
  write_manifest,
  write_shard,
)
from rag_jax.retrieval.store import PassageStore
from rag_jax.utils.faults import kill_point

log = logging.getLogger(__name__)

# Manifest fields that must agree for a rerun to resume instead of refusing.
_RESUME_KEYS = ("count", "dim", "dtype", "shard_size")


@dataclass(frozen=True)
class EncodeConfig:
  """Passage-encoding settings.

  Attributes:
    batch_size: passages per device step over all devices (rounded up to a multiple of them).
    max_length: token budget of ``[CLS] title [SEP] text [SEP]`` (DPR used 256 for passages);
      capped at the encoder's max_position_embeddings.
    shard_size: passages per output shard (the unit of resumption).
    dtype: storage dtype of the embeddings: float32, float16 or bfloat16.
    length_bucket: sequence lengths are padded to a multiple of this.
    axis: mesh axis name the batch is split over.
  """

  batch_size: int = 128
  max_length: int = 256
  shard_size: int = 100_000
  dtype: str = "float32"
  length_bucket: int = 32
  axis: str = "data"


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
  """{"path", "sha256"} over the config and weight files of a checkpoint directory."""
  path = Path(path)
  h = hashlib.sha256()
  names = sorted(p.name for p in path.iterdir()
                 if p.name == "config.json" or p.suffix in (".safetensors", ".bin"))
  for name in names:
    h.update(name.encode())
    with open(path / name, "rb") as f:
      while chunk := f.read(1 << 24):
        h.update(chunk)
  return {"path": str(path.resolve()), "sha256": h.hexdigest()}


def tokenize_passages(tokenizer, titles: list[str], texts: list[str],
                      max_length: int) -> list[list[int]]:
  """Token ids of ``[CLS] title [SEP] text [SEP]`` per passage (longest-first truncation)."""
  enc = tokenizer(titles, texts, truncation=True, max_length=max_length,
                  return_attention_mask=False, return_token_type_ids=False)
  return enc["input_ids"]


def pack_batch(seqs: list[list[int]], batch_size: int, pad_id: int,
               bucket: int) -> tuple[np.ndarray, np.ndarray]:
  """(input_ids, attention_mask) int32 (batch_size, L): L = longest rounded up to `bucket`.

  Rows beyond len(seqs) repeat the first sequence (valid input, outputs discarded).
  """
  longest = max(len(s) for s in seqs)
  length = -(-longest // bucket) * bucket
  ids = np.full((batch_size, length), pad_id, dtype=np.int32)
  mask = np.zeros((batch_size, length), dtype=np.int32)
  for r in range(batch_size):
    s = seqs[r] if r < len(seqs) else seqs[0]
    ids[r, :len(s)] = s
    mask[r, :len(s)] = 1
  return ids, mask


def make_encode_fn(model, mesh: Mesh, axis: str = "data") -> Callable:
  """jit(shard_map) of pooler_output: (params, ids (B, L), mask (B, L)) -> (B, D) float32."""
  def local(params, ids, mask):
    out = model.apply({"params": params}, input_ids=ids, attention_mask=mask,
                      token_type_ids=jnp.zeros_like(ids))
    return out.pooler_output.astype(jnp.float32)

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis), P(axis)),
                               out_specs=P(axis), check_vma=False))


def embedding_dim(model, params) -> int:
  """Width of the encoder's pooler_output, from shapes only (nothing is computed)."""
  ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  out = jax.eval_shape(lambda p, i: model.apply({"params": p}, input_ids=i, attention_mask=i,
                                                token_type_ids=i), params, ids)
  return int(out.pooler_output.shape[-1])


def _prepare_dir(out: Path, manifest: dict) -> None:
  """Creates `out` with `manifest`, or checks that an existing run used the same settings."""
  mpath = out / "manifest.json"
  if mpath.exists():
    old = EmbeddingStore(out, require_complete=False).manifest
    for key in _RESUME_KEYS:
      if old.get(key) != manifest[key]:
        raise EmbeddingFormatError(
            f"{mpath}: existing embeddings have {key}={old.get(key)!r}, this run "
            f"{manifest[key]!r}; use another output directory (nothing was overwritten)")
    if old.get("encoder") != manifest["encoder"]:
      raise EmbeddingFormatError(
          f"{mpath}: existing embeddings come from another encoder or tokenization "
          f"({old.get('encoder')} vs {manifest['encoder']}); use another output directory")
    for stale in out.glob(".shard-*.tmp-*"):  # temporaries of a killed run
      stale.unlink()
  else:
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, manifest)


def _usable_shard(existing: EmbeddingStore, i: int) -> bool:
  """Whether shard `i` of an earlier run is there and whole. Shards are written atomically, so
  one that disagrees with the manifest (truncated or damaged on disk, or missing from a complete
  manifest) was broken afterwards: it is encoded again (with a warning naming it)."""
  try:
    return existing.check_shard(i)
  except EmbeddingFormatError as e:
    log.warning("%s; encoding it again", str(e).split("; ")[0])
    return False


def encode_passages(store: PassageStore, out: str | os.PathLike, *, model, params, tokenizer,
                    encoder_info: dict[str, Any], config: EncodeConfig | None = None,
                    mesh: Mesh | None = None, progress: bool = True,
                    max_new_shards: int | None = None) -> EmbeddingStore | None:
  """Encodes every passage of `store` into an embeddings directory `out` (resuming if present).

  Args:
    store: the passages; row i of the embeddings is passage row i.
    out: the embeddings directory.
    model, params: a DPR context encoder (``rag_jax.checkpoints.load_pretrained``).
    tokenizer: a transformers BERT tokenizer (pair encoding gives ``[CLS] a [SEP] b [SEP]``).
    encoder_info: identifies encoder + tokenization in the manifest (see file_fingerprint).
    config: see :class:`EncodeConfig`.
    mesh: 1-D device mesh (default: all local devices).
    max_new_shards: stop after writing this many shards (for tests and time-sliced jobs).
  Returns:
    The complete :class:`EmbeddingStore`, or None when stopped early by `max_new_shards`.
  """
  config = config or EncodeConfig()
  positions = model.config.max_position_embeddings
  if config.max_length > positions:  # Longer inputs would run past the position table.
    config = dataclasses.replace(config, max_length=positions)
  mesh = mesh or local_data_mesh(config.axis)
  ndev = mesh.shape[config.axis]
  batch = -(-config.batch_size // ndev) * ndev
  out = Path(out)
  info = {**encoder_info, "max_length": config.max_length, "token_type_ids": "zeros",
          "input": "[CLS] title [SEP] text [SEP]"}
  manifest = make_manifest(len(store), embedding_dim(model, params), config.dtype,
                           config.shard_size, info)
  _prepare_dir(out, manifest)
  existing = EmbeddingStore(out, require_complete=False)
  bounds = shard_bounds(len(store), config.shard_size)
  todo = [i for i in range(len(bounds)) if not _usable_shard(existing, i)]
  todo_now = todo if max_new_shards is None else todo[:max_new_shards]

  encode = make_encode_fn(model, mesh, config.axis)
  params = jax.device_put(params, NamedSharding(mesh, P()))
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  done = len(store) - sum(bounds[i][1] - bounds[i][0] for i in todo)

  def tokenize(i: int) -> list[list[int]]:
    titles, texts = store.titles_and_texts(*bounds[i])
    return tokenize_passages(tokenizer, titles, texts, config.max_length)

  bar = tqdm(total=len(store), initial=done, unit=" passages", unit_scale=True,
             disable=not progress, desc="encoding passages", smoothing=0.1)
  with ThreadPoolExecutor(max_workers=1) as pool:
    future = pool.submit(tokenize, todo_now[0]) if todo_now else None
    for n, i in enumerate(todo_now):
      seqs = future.result()
      future = pool.submit(tokenize, todo_now[n + 1]) if n + 1 < len(todo_now) else None
      order = np.argsort([len(s) for s in seqs], kind="stable")[::-1]  # longest first
      result = np.empty((len(seqs), manifest["dim"]), np.float32)
      pending = None
      for s in range(0, len(seqs), batch):
        rows = order[s:s + batch]
        ids, mask = pack_batch([seqs[r] for r in rows], batch, pad_id, config.length_bucket)
        emb = encode(params, ids, mask)  # async dispatch; (batch, D)
        if pending is not None:
          _collect(result, *pending, bar)
        pending = (rows, emb)
      if pending is not None:
        _collect(result, *pending, bar)
      write_shard(out, i, result, config.dtype)
      kill_point("encode:shard_written")
  bar.close()
  if len(todo_now) < len(todo):
    return None
  manifest["complete"] = True
  write_manifest(out, manifest)
  return EmbeddingStore(out)


def _collect(result: np.ndarray, rows: np.ndarray, emb: jax.Array, bar) -> None:
  result[rows] = np.asarray(emb)[:len(rows)]
  bar.update(len(rows))


def encode_from_checkpoint(store: PassageStore, out: str | os.PathLike, encoder_path: str,
                           tokenizer_path: str | None = None, *,
                           config: EncodeConfig | None = None, compute_dtype: str = "float32",
                           mesh: Mesh | None = None, progress: bool = True,
                           max_new_shards: int | None = None) -> EmbeddingStore | None:
  """:func:`encode_passages` with the encoder and tokenizer read from Hugging Face directories.

  Args:
    encoder_path: a DPRContextEncoder directory (config.json + weights).
    tokenizer_path: its tokenizer (default: the same directory).
    compute_dtype: ``float32`` or ``bfloat16`` (accelerators); params stay float32.
  """


  model, params = load_pretrained(encoder_path, dtype=jnp.dtype(compute_dtype))
  # transformers' own rule, and a directory missing its vocabulary named (AutoTokenizer alone
  # builds an empty vocabulary there: every passage would encode as unknown tokens).
  tokenizer = load_tokenizer(tokenizer_path or encoder_path)
  info = {"encoder": file_fingerprint(encoder_path),
          "tokenizer": str(Path(tokenizer_path or encoder_path).resolve()),
          "compute_dtype": compute_dtype}
  return encode_passages(store, out, model=model, params=params, tokenizer=tokenizer,
                         encoder_info=info, config=config, mesh=mesh, progress=progress,
                         max_new_shards=max_new_shards)

