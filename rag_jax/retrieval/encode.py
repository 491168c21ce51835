"""Passage encoding: DPR context encoder over a passage store, into resumable embedding shards.

Input per passage is DPR's ``[CLS] title [SEP] text [SEP]`` (the tokenizer's pair encoding,
truncated to `max_length` longest-first as DPR and transformers' ``use_own_knowledge_dataset.py``
do) with all-zero segment ids: DPR trained its encoders with zero token types, and the reference
passes only ``input_ids`` so the encoder's zero default applies; the tokenizer's pair type ids
would change every embedding.

Throughput: passages of a shard are sorted by token length and cut into batches, each padded
to a multiple of `length_bucket` (:func:`plan_batches`): few distinct shapes, each compiled once
and reused for every shard (:class:`BucketedEncoder`), and little padding, where encoding in
corpus order pads every batch to its longest passage; rows are written back in corpus order. The
jitted encoder is a ``shard_map`` over all local devices (batch split on the mesh axis, params
replicated); the next shard is tokenized on a background thread (the Rust tokenizer releases
the GIL) while the devices work, and device results are fetched one batch late so dispatch
overlaps compute.

Resumption: shards are written atomically in order; a rerun with the same settings skips every
shard file that exists (it was complete, or it would not exist) and deletes stale temporaries.
The manifest records the encoder's checksum, the tokenizer and `max_length`, and a rerun with
different ones refuses to mix embeddings from two encoders.

Several processes (rag_jax/distributed.py; `out` on a file system they share): shard i is
encoded by process i mod P over its local devices, with the same batches as on one process, so
each shard's rows equal a one-process encoding with the same local devices bit for bit. Before
any work the processes compare what they were given (:func:`run_facts`: the corpus's count and
a hash of sampled rows, the encoder's checksum, the tokenizer's vocabulary, the settings) and
refuse, naming the field and the processes, if one differs. Process 0 alone prepares the
directory and writes the manifest; it marks the manifest complete only once every process has
reported its share done and every shard checks against it, so a job with a dead process leaves
``complete: false``, and its rerun encodes only the shards that are missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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
from rag_jax.distributed import (
  DistributedError,
  all_gather_text,
  barrier,
  check_same,
  on_primary,
  process_count,
  process_index,
)
from rag_jax.models import bert
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
# How long processes wait for each other: to agree before work (all start together), and for
# the slowest share (a dead process is found sooner: jax's heartbeat timeout aborts the job).
AGREE_TIMEOUT_S = 600
SHARE_TIMEOUT_S = 7 * 24 * 3600
SAMPLED_ROWS = 64  # passages hashed to tell two corpora apart


@dataclass(frozen=True)
class EncodeConfig:
  """Passage-encoding settings.

  Attributes:
    batch_size: passages per device step over all devices (rounded up to a multiple of them).
    max_length: token budget of ``[CLS] title [SEP] text [SEP]`` (DPR used 256 for passages);
      capped at the encoder's max_position_embeddings.
    shard_size: passages per output shard (the unit of resumption).
    dtype: storage dtype of the embeddings: float32, float16 or bfloat16.
    length_bucket: sequence lengths are padded to a multiple of this (capped at max_length).
    tokens_per_batch: when > 0, the passages per step at padded length L are
      tokens_per_batch // L (a multiple of the devices) instead of batch_size.
    axis: mesh axis name the batch is split over.
  """

  batch_size: int = 128
  max_length: int = 256
  shard_size: int = 100_000
  dtype: str = "float32"
  length_bucket: int = 8
  tokens_per_batch: int = 0
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
  length = padded_length(max(len(s) for s in seqs), bucket)
  ids = np.full((batch_size, length), pad_id, dtype=np.int32)
  mask = np.zeros((batch_size, length), dtype=np.int32)
  for r in range(batch_size):
    s = seqs[r] if r < len(seqs) else seqs[0]
    ids[r, :len(s)] = s
    mask[r, :len(s)] = 1
  return ids, mask


def padded_length(longest: int, bucket: int, max_length: int | None = None) -> int:
  """`longest` rounded up to a multiple of `bucket`; with `max_length`, at most that (but never
  below `longest`)."""
  length = -(-longest // bucket) * bucket
  return length if max_length is None else max(longest, min(length, max_length))


def bucket_batch(length: int, config: EncodeConfig, devices: int) -> int:
  """Passages per step at padded `length`: `batch_size`, or with `tokens_per_batch` set,
  tokens_per_batch // length (so every bucket's step holds about as many tokens); either way
  a multiple of `devices`, at least one per device."""
  rows = config.tokens_per_batch // length if config.tokens_per_batch else config.batch_size
  return max(devices, -(-rows // devices) * devices)


def plan_batches(lengths: list[int] | np.ndarray, config: EncodeConfig,
                 devices: int = 1) -> list[tuple[np.ndarray, int, int]]:
  """Length-sorted batches of a shard: [(rows, batch, length)], rows into `lengths`.

  Rows are sorted longest first (ties by row, so the plan depends on the lengths only) and cut
  into consecutive batches; a batch's padded length is its longest rounded up to
  `length_bucket`, its size :func:`bucket_batch` of that length. The last batch, usually
  partial, is padded only to the next power-of-two multiple of `devices` (not to a whole
  batch). Every (batch, length) pair is one compiled program; there are at most
  max_length / length_bucket lengths, each with one full and a few tail sizes.
  """
  lengths = np.asarray(lengths, np.int64)
  order = np.lexsort((np.arange(len(lengths)), -lengths))  # longest first, then by row
  plan = []
  s = 0
  while s < len(order):
    length = padded_length(int(lengths[order[s]]), config.length_bucket, config.max_length)
    batch = bucket_batch(length, config, devices)
    rows = order[s:s + batch]
    if len(rows) < batch:
      per_device = -(-len(rows) // devices)
      batch = min(batch, devices * (1 << (per_device - 1).bit_length()))
    plan.append((rows, batch, length))
    s += len(rows)
  return plan


def pooled_output(model, params, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """DPREncoder's pooler_output (B, D) float32, with zero token types, the last layer computed
  for the [CLS] row alone (rag_jax.models.bert.cls_pooler_output)."""
  return bert.cls_pooler_output(model, params, ids, mask).astype(jnp.float32)


def make_encode_fn(model, mesh: Mesh, axis: str = "data") -> Callable:
  """jit(shard_map) of :func:`pooled_output`: (params, ids (B, L), mask (B, L)) -> (B, D)
  float32, the batch split over `axis`, params replicated."""
  def local(params, ids, mask):
    return pooled_output(model, params, ids, mask)

  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis), P(axis)),
                               out_specs=P(axis), check_vma=False))


class BucketedEncoder:
  """Token sequences -> pooler_output rows in input order, in length-bucketed batches.

  One jitted encoder (:func:`make_encode_fn`) whose compiled programs, one per (batch, length)
  of :func:`plan_batches`, are kept and reused across calls (shards, refreshes). Results are
  fetched one batch late so that the next batch's dispatch overlaps the device's work.
  """

  def __init__(self, model, mesh: Mesh, axis: str = "data"):
    self.fn = make_encode_fn(model, mesh, axis)
    self.devices = mesh.shape[axis]
    self.shapes: set[tuple[int, int]] = set()  # (batch, length) of every batch run

  def encode(self, params, seqs: list[list[int]], *, pad_id: int, config: EncodeConfig,
             on_batch: Callable[[int], Any] | None = None) -> np.ndarray:
    """(len(seqs), D) float32: row i encodes seqs[i]. `on_batch(n)` after each batch."""
    if not seqs:
      raise ValueError("nothing to encode")
    result = None
    pending = None
    for rows, batch, length in plan_batches([len(s) for s in seqs], config, self.devices):
      ids, mask = pack_batch([seqs[r] for r in rows], batch, pad_id, length)  # (batch, length)
      self.shapes.add(ids.shape)
      emb = self.fn(params, ids, mask)  # async dispatch; (batch, D)
      if pending is not None:
        result = _collect(result, len(seqs), *pending, on_batch)
      pending = (rows, emb)
    return _collect(result, len(seqs), *pending, on_batch)


def _collect(result: np.ndarray | None, count: int, rows: np.ndarray, emb: jax.Array,
             on_batch: Callable[[int], Any] | None) -> np.ndarray:
  emb = np.asarray(emb)
  if result is None:
    result = np.empty((count, emb.shape[-1]), np.float32)
  result[rows] = emb[:len(rows)]
  if on_batch is not None:
    on_batch(len(rows))
  return result


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


def corpus_fingerprint(store: PassageStore, rows: int = SAMPLED_ROWS) -> str:
  """'<count> passages, rows sha256 <hex>': the count and a hash of `rows` evenly spaced rows'
  title and text (cheap at 21M rows; another corpus, split or order differs in it)."""
  h = hashlib.sha256()
  picks = np.unique(np.linspace(0, len(store) - 1, min(rows, len(store))).astype(np.int64))
  for r in picks if len(store) else ():
    h.update(f"{r}\t{store.title(r)}\t{store.text(r)}\n".encode("utf-8", "surrogatepass"))
  return f"{len(store)} passages, rows sha256 {h.hexdigest()[:16]}"


def tokenizer_fingerprint(tokenizer) -> str:
  """The tokenizer's class and a hash of its vocabulary (paths differ between hosts)."""
  vocab = sorted(tokenizer.get_vocab().items())
  digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
  return f"{type(tokenizer).__name__}, {len(vocab)} tokens, sha256 {digest}"


def run_facts(store: PassageStore, tokenizer, encoder_info: dict[str, Any],
              config: EncodeConfig, dim: int) -> dict[str, str]:
  """What every process of one encoding must agree on, as strings to compare."""
  encoder = encoder_info.get("encoder")
  return {"corpus": corpus_fingerprint(store),
          "encoder": str(encoder.get("sha256") if isinstance(encoder, dict) else encoder),
          "tokenizer": tokenizer_fingerprint(tokenizer),
          "compute_dtype": str(encoder_info.get("compute_dtype", "")),
          "config": json.dumps(dataclasses.asdict(config), sort_keys=True),
          "embedding dim": str(dim)}


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
    max_new_shards: stop after writing this many shards (for tests and time-sliced jobs); on
      several processes, this many of each process's share.
  Returns:
    The complete :class:`EmbeddingStore` (on every process), or None when stopped early by
    `max_new_shards` (on any process).
  """
  config = config or EncodeConfig()
  positions = model.config.max_position_embeddings
  if config.max_length > positions:  # Longer inputs would run past the position table.
    config = dataclasses.replace(config, max_length=positions)
  mesh = mesh or local_data_mesh(config.axis)
  out = Path(out)
  info = {**encoder_info, "max_length": config.max_length, "token_type_ids": "zeros",
          "input": "[CLS] title [SEP] text [SEP]"}
  manifest = make_manifest(len(store), embedding_dim(model, params), config.dtype,
                           config.shard_size, info)
  process, processes = process_index(), process_count()
  check_same("encode/facts", run_facts(store, tokenizer, encoder_info, config, manifest["dim"]),
             AGREE_TIMEOUT_S, "every process must encode the same corpus with the same encoder "
             "and settings")
  on_primary("encode/prepared", lambda: _prepare_dir(out, manifest), AGREE_TIMEOUT_S)
  if not (out / "manifest.json").exists():
    raise DistributedError(f"process {process} of {processes} does not see {out}/manifest.json, "
                           "which process 0 wrote: the output must be on a file system every "
                           "process shares")
  existing = EmbeddingStore(out, require_complete=False)
  bounds = shard_bounds(len(store), config.shard_size)
  share = range(process, len(bounds), processes)  # shard i: process i mod P
  todo = [i for i in share if not _usable_shard(existing, i)]
  todo_now = todo if max_new_shards is None else todo[:max_new_shards]
  share_rows = sum(bounds[i][1] - bounds[i][0] for i in share)
  if processes > 1:
    log.info("process %d of %d: shards %s (%d rows) are its share, %d to encode", process,
             processes, list(share), share_rows, len(todo))

  encoder = BucketedEncoder(model, mesh, config.axis)
  params = jax.device_put(params, NamedSharding(mesh, P()))
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  done = share_rows - sum(bounds[i][1] - bounds[i][0] for i in todo)

  def tokenize(i: int) -> list[list[int]]:
    titles, texts = store.titles_and_texts(*bounds[i])
    return tokenize_passages(tokenizer, titles, texts, config.max_length)

  bar = tqdm(total=share_rows, initial=done, unit=" passages", unit_scale=True,
             disable=not progress, desc="encoding passages", smoothing=0.1)
  with ThreadPoolExecutor(max_workers=1) as pool:
    future = pool.submit(tokenize, todo_now[0]) if todo_now else None
    for n, i in enumerate(todo_now):
      seqs = future.result()
      future = pool.submit(tokenize, todo_now[n + 1]) if n + 1 < len(todo_now) else None
      result = encoder.encode(params, seqs, pad_id=pad_id, config=config,
                              on_batch=bar.update)
      write_shard(out, i, result, config.dtype)
      kill_point("encode:shard_written")
      kill_point(f"encode:shard_written:process{process}")
  bar.close()
  left = [str(len(todo) - len(todo_now))]
  if processes > 1:  # every share's outcome, once the slowest is done
    left = all_gather_text("encode/done", left[0], SHARE_TIMEOUT_S)
  if any(n != "0" for n in left):
    return None
  on_primary("encode/complete", lambda: _complete(out, manifest), AGREE_TIMEOUT_S)
  barrier("encode/published", AGREE_TIMEOUT_S)
  return EmbeddingStore(out)


def _complete(out: Path, manifest: dict) -> None:
  """Marks the manifest complete once every shard is there and checks against it."""
  existing = EmbeddingStore(out, require_complete=False)
  missing = [i for i in range(len(existing.bounds)) if not existing.check_shard(i)]
  if missing:
    raise EmbeddingFormatError(f"{out}: shard(s) {missing[:5]} missing after every process "
                               "reported its share done; rerun the encoding")
  manifest["complete"] = True
  write_manifest(out, manifest)


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

