"""Retrieval on the devices, inside a jitted program: the train step's and answering's.

The host path (rag_jax.training.retrieval_feed for training, rag_jax.answer for answering) sends
q(x) to the host, searches, gathers passage embeddings, joins generator inputs and sends them
back. Here all of it is part of one program (the train step, or answering from question ids to
answer ids), over arrays resident on the devices and sharded by rows over the mesh like the
exact index's database:

    embeddings  [R, D]   the passage embeddings d(z) (ExactIndex.db)
    tokens      [R, W]   every passage's generator part (rag_jax.data.passage_table)
    lengths     [R]
    doc_tokens  [R, Lc]  optional, when the context encoder is trained: every passage as the
    doc_lengths [R]      context encoder reads it (passage_table.EncoderTable)

For a batch of questions: q(x) with the current question encoder (no gradient: the loss
recomputes doc_scores = q(x) . d(z) with gradients, as in the host path), the exact top-n
(rag_jax.retrieval.exact.make_search_fn: per-device chunked top-k, then a merge), a gather of
the n passages' embeddings and token parts across shards (each device contributes the rows it
holds; a psum joins them), and rag_jax.data.passage_table.assemble_rows. The result is the
batch layout of rag_jax.training.rag_step, with the same ids, scores and generator rows as the
host path (tests/test_device_retrieval.py); answering (rag_jax.answer) feeds the same rows to the
compiled decoding search (tests/test_device_answer.py). With doc_tokens the batch also carries
the retrieved passages' context-encoder inputs, which the step re-encodes: the search reads the
resident embeddings, the loss fresh ones.

Memory: the arrays are arguments of the program, not constants, so hot-swapping the index (another
world, a rebuilt corpus of the same size) passes new arrays without recompiling.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rag_jax.data.passage_table import (
  EncoderTable,
  PassageTable,
  TableSpec,
  assemble_rows,
  encoder_rows,
  load_or_build,
)
from rag_jax.models.rag import RagModel
from rag_jax.retrieval.embeddings import DTYPES
from rag_jax.retrieval.exact import ExactConfig, ExactIndex, make_search_fn, shard_rows

Array = jax.Array

# The batch keys the host sends when retrieval happens on the device.
QUESTION_KEYS = ("input_ids", "attention_mask", "question_tokens", "question_lengths", "labels",
                 "weights")


def index_bytes(count: int, dim: int, width: int, embedding_itemsize: int,
                token_itemsize: int) -> int:
  """Device bytes of an index of `count` passages: embeddings + passage table + lengths."""
  return count * (dim * embedding_itemsize + width * token_itemsize + 4)


def fits_on_devices(count: int, dim: int, width: int, embedding_itemsize: int,
                    token_itemsize: int, budget_bytes: float) -> bool:
  """Whether the index and table fit `budget_bytes` summed over the mesh's devices."""
  return index_bytes(count, dim, width, embedding_itemsize, token_itemsize) <= budget_bytes


@dataclasses.dataclass
class DeviceRetrieval:
  """The device-resident index (see the module docstring) and how to search it.

  arrays: {"embeddings", "tokens", "lengths"} (+ "doc_tokens", "doc_lengths" when built with an
  EncoderTable), sharded by rows over `mesh`'s `axis`; pass them to the step (they are its third
  argument). `swap` replaces them with another index's.
  """

  mesh: Mesh
  spec: TableSpec
  n_docs: int
  count: int
  rows_per_shard: int
  chunk_size: int
  matmul: str
  axis: str
  arrays: dict[str, Array]

  @classmethod
  def build(cls, index: ExactIndex, table: PassageTable, n_docs: int,
            encoder_table: EncoderTable | None = None) -> DeviceRetrieval:
    """Puts `table` (and `encoder_table`, for training the context encoder) beside `index`'s
    database, on the index's mesh, in the same row layout."""
    for name, t in (("passage table", table), ("encoder table", encoder_table)):
      if t is not None and len(t) != index.count:
        raise ValueError(f"{name} has {len(t)} passages but the index has {index.count}")
    total = index.db.shape[0]

    def rows(array: np.ndarray) -> Array:
      return shard_rows(lambda a, b: array[a:b], index.count, total, array.shape[1:],
                        array.dtype, index.mesh, index.config.axis)

    arrays = {"embeddings": index.db, "tokens": rows(table.tokens),
              "lengths": rows(np.asarray(table.lengths, np.int32))}
    if encoder_table is not None:
      arrays["doc_tokens"] = rows(encoder_table.tokens)
      arrays["doc_lengths"] = rows(np.asarray(encoder_table.lengths, np.int32))
      logging.info("device retrieval: encoder table %d x %d (%s) for the context encoder",
                   len(encoder_table), encoder_table.width, encoder_table.tokens.dtype)
    logging.info("device retrieval: %d passages x %d dims (%s) + passage table %d x %d (%s) on "
                 "%d devices", index.count, index.dim, index.db.dtype, len(table),
                 table.spec.width, table.spec.dtype, index.mesh.devices.size)
    return cls(index.mesh, table.spec, n_docs, index.count, index.rows_per_shard,
               index.chunk_size, index.config.matmul, index.config.axis, arrays)

  @classmethod
  def random(cls, mesh: Mesh, spec: TableSpec, count: int, dim: int, n_docs: int, *,
             dtype: str = "bfloat16", chunk_size: int = 16384, matmul: str = "storage",
             axis: str = "data", seed: int = 0) -> DeviceRetrieval:
    """A random index of `count` passages made on the devices, each its own rows, block by
    block (no host copy, no float32 copy of the whole table): embeddings N(0, 1) [R, dim] in
    `dtype`, passage parts of random ids in [4, vocab) [R, spec.width] in spec.dtype, lengths
    uniform in [1, width]. For memory and speed measurements at the paper's scale (21M x 768)
    without the corpus; the layout (rows_per_shard, chunks, padding) is ExactIndex's."""
    shards = mesh.shape[axis]
    per_shard = math.ceil(count / shards)
    chunk = max(1, min(chunk_size, per_shard))
    rows_per_shard = math.ceil(per_shard / chunk) * chunk
    blocks, width = rows_per_shard // chunk, spec.width
    emb_dtype, tok_dtype = DTYPES[dtype], jnp.dtype(spec.dtype)

    def local(key):
      key = jax.random.fold_in(key, jax.lax.axis_index(axis))
      ke, kt, kl = jax.random.split(key, 3)
      emb = jax.lax.map(lambda k: jax.random.normal(k, (chunk, dim)).astype(emb_dtype),
                        jax.random.split(ke, blocks))  # [blocks, chunk, dim]
      tok = jax.lax.map(lambda k: jax.random.randint(k, (chunk, width), 4, spec.vocab_size)
                        .astype(tok_dtype), jax.random.split(kt, blocks))  # [blocks, chunk, W]
      lengths = jax.random.randint(kl, (rows_per_shard,), 1, width + 1, jnp.int32)
      return (emb.reshape(rows_per_shard, dim),  # [blocks, chunk, dim] -> [rows, dim]
              tok.reshape(rows_per_shard, width), lengths)  # [blocks, chunk, W] -> [rows, W]

    make = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=P(), out_specs=(P(axis),) * 3,
                                 check_vma=False))
    emb, tok, lengths = make(jax.random.key(seed))
    logging.info("device retrieval: a random index of %d passages x %d dims (%s) + passage "
                 "table x %d (%s) on %d devices", count, dim, dtype, width, spec.dtype, shards)
    return cls(mesh, spec, n_docs, count, rows_per_shard, chunk, matmul, axis,
               {"embeddings": emb, "tokens": tok, "lengths": lengths})

  def swap(self, index: ExactIndex, table: PassageTable,
           encoder_table: EncoderTable | None = None) -> None:
    """Replaces the resident arrays by another index's (same shapes: no recompilation)."""
    if (encoder_table is None) != ("doc_tokens" not in self.arrays):
      raise ValueError("swap: pass an encoder table exactly when the resident index has one")
    other = DeviceRetrieval.build(index, table, self.n_docs, encoder_table)
    if other.spec != self.spec:
      raise ValueError(f"the new passage table follows {other.spec}, not {self.spec}")
    if (other.count, other.rows_per_shard, other.chunk_size) != (
        self.count, self.rows_per_shard, self.chunk_size):
      logging.info("device retrieval: the new index has another size (%d passages); the step "
                   "recompiles once", other.count)
    self.__dict__.update(other.__dict__)

  @property
  def shardings(self) -> dict[str, NamedSharding]:
    rows = NamedSharding(self.mesh, P(self.axis))
    return {name: rows for name in self.arrays}

  def search(self, queries: Array, embeddings: Array, k: int | None = None
             ) -> tuple[Array, Array]:
    """Exact top-k (default n_docs): (scores [B, k] float32, passage ids [B, k] int32)."""
    fn = make_search_fn(self.mesh, k or self.n_docs, num_valid=self.count,
                        rows_per_shard=self.rows_per_shard, chunk_size=self.chunk_size,
                        axis=self.axis, matmul=self.matmul)
    return fn(queries, embeddings)

  def gather(self, ids: Array, arrays: dict[str, Array]) -> dict[str, Array]:
    """Rows `ids` [B, n] of every array, gathered across shards: each device takes the rows it
    holds (zeros elsewhere) and a psum joins them (exact: one term is not zero)."""
    axis, per_shard = self.axis, self.rows_per_shard

    def local(ids, tables):
      local_ids = ids - jax.lax.axis_index(axis) * per_shard
      mine = (local_ids >= 0) & (local_ids < per_shard)
      safe = jnp.clip(local_ids, 0, per_shard - 1)
      out = {}
      for name, table in tables.items():
        rows = table[safe]  # [B, n, ...]
        keep = mine.reshape(mine.shape + (1,) * (rows.ndim - mine.ndim))
        wide = jnp.float32 if jnp.issubdtype(table.dtype, jnp.floating) else jnp.int32
        out[name] = jax.lax.psum(jnp.where(keep, rows.astype(wide), 0), axis)
      return out

    specs = {k: P(axis) for k in arrays}
    return jax.shard_map(local, mesh=self.mesh, in_specs=(P(), specs),
                         out_specs={k: P() for k in arrays}, check_vma=False)(ids, arrays)

  def retrieve(self, model: RagModel, params: Any, input_ids: Array, attention_mask: Array,
               arrays: dict[str, Array], keys: tuple[str, ...],
               search: Callable[[Array, dict[str, Array]], tuple[Array, Array]] | None = None
               ) -> tuple[Array, Array, dict[str, Array]]:
    """q(x) (no gradient) -> exact top-n -> the n passages' rows of `arrays[keys]`.

    input_ids, attention_mask: [B, Lq] question-encoder inputs. search(q [B, D], arrays) ->
    (scores, ids) [B, n] replaces the exact top-n (rag_jax.retrieval.refresh's rerank).
    Returns (scores [B, n] float32, passage ids [B, n] int32, {key: [B, n, ...]}). Pure.
    """
    q = model.apply({"params": params}, input_ids, attention_mask,
                    method=model.embed_questions)
    q = jax.lax.stop_gradient(q).astype(jnp.float32)  # [B, D]
    scores, ids = (search(q, arrays) if search is not None
                   else self.search(q, arrays["embeddings"]))  # [B, n]
    return scores, ids, self.gather(ids, {k: arrays[k] for k in keys})

  def generator_inputs(self, model: RagModel, params: Any, input_ids: Array,
                       attention_mask: Array, question_tokens: Array, question_lengths: Array,
                       arrays: dict[str, Array]) -> dict[str, Array]:
    """Questions -> the decoding search's inputs: "context_input_ids" and
    "context_attention_mask" [B * n, L] batch-major (row b * n + j), "doc_scores" [B, n]
    float32 and "doc_ids" [B, n] int32. question_tokens [B, W] / question_lengths [B]: the
    questions' parts (rag_jax.data.passage_table.question_parts). Pure; call it inside jit."""
    scores, ids, rows = self.retrieve(model, params, input_ids, attention_mask, arrays,
                                      ("tokens", "lengths"))
    ctx, ctx_mask = assemble_rows(rows["tokens"], rows["lengths"], question_tokens,
                                  question_lengths, self.spec)  # [B, n, L]
    b, n, length = ctx.shape
    return {"context_input_ids": ctx.reshape(b * n, length),  # [B*n, L]
            "context_attention_mask": ctx_mask.reshape(b * n, length),  # [B*n, L]
            "doc_scores": scores, "doc_ids": ids}

  def complete_batch(self, model: RagModel, params: Any, batch: dict[str, Array],
                     arrays: dict[str, Array],
                     search: Callable[[Array, dict[str, Array]], tuple[Array, Array]] | None = None
                     ) -> dict[str, Array]:
    """Questions -> the full train-step batch (rag_step.BATCH_KEYS) plus "doc_ids" and
    "retrieval_scores" [B, n]; with "doc_tokens" among the arrays also "doc_input_ids" and
    "doc_attention_mask" [B, n, Lc], the context encoder's inputs (rag_step.ENCODER_BATCH_KEYS);
    with "encoded_at" (a refreshed index, rag_jax.retrieval.refresh) also "doc_encoded_at" [B, n].
    `search` as in `retrieve`. Pure; call it inside jit."""
    keys = ("embeddings", "tokens", "lengths")
    if "doc_tokens" in arrays:
      keys += ("doc_tokens", "doc_lengths")
    if "encoded_at" in arrays:
      keys += ("encoded_at",)
    scores, ids, rows = self.retrieve(model, params, batch["input_ids"], batch["attention_mask"],
                                      arrays, keys, search)
    ctx, ctx_mask = assemble_rows(rows["tokens"], rows["lengths"], batch["question_tokens"],
                                  batch["question_lengths"], self.spec)
    out = {**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "weights")},
           "context_input_ids": ctx, "context_attention_mask": ctx_mask,
           "doc_embeds": rows["embeddings"].astype(jnp.float32), "doc_ids": ids,
           "retrieval_scores": scores}
    if "doc_tokens" in arrays:
      out["doc_input_ids"], out["doc_attention_mask"] = encoder_rows(
          rows["doc_tokens"], rows["doc_lengths"])  # [B, n, Lc]
    if "encoded_at" in arrays:
      out["doc_encoded_at"] = rows["encoded_at"]
    return out


def device_budget_bytes(fraction: float, devices: Any = None) -> float:
  """`fraction` of the devices' memory (summed), from jax's allocator limits; on CPU, where jax
  reports none, the host's physical memory."""
  devices = jax.devices() if devices is None else devices
  # Only this process's devices report their memory: the others' are taken to be alike.
  local = [d for d in devices if d.process_index == jax.process_index()]
  limits = [(d.memory_stats() or {}).get("bytes_limit") for d in local]
  if local and all(limits):
    return fraction * float(sum(limits)) * len(devices) / len(local)
  try:
    return fraction * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    return math.inf


RETRIEVAL_MODES = ("auto", "device", "host")


def setup(mode: str, index: Any, store: Any, assembler: Any, tables_dir: Any, n_docs: int,
          mesh: Mesh, *, dtype: str = "auto", memory_fraction: float = 0.5,
          progress: bool = True,
          encoder_table: EncoderTable | None = None) -> DeviceRetrieval | None:
  """The choice between device and host retrieval (training and answering); None: the host path.

  mode "host": the host path. "device": retrieval on the devices (an error if the index does not
  fit). "auto": in the step when the passage embeddings (in `dtype`: "auto" = bf16 on
  accelerators, float32 on CPU) plus the passage table fit in `memory_fraction` of the devices'
  memory (summed over the mesh: the rows are sharded), else the host path, said in one log line.
  The passage table is loaded from, or built once into, `tables_dir` (one per tokenizer). An
  `encoder_table` (training the context encoder) goes on the devices too, and counts in the fit.
  An exact `index` in another dtype or on another mesh is re-placed in place
  (ExactIndex.place), so its embeddings are on the devices once.
  """
  if mode not in RETRIEVAL_MODES:
    raise ValueError(f"config.retrieval={mode!r}: expected one of {RETRIEVAL_MODES}")
  if mode == "host":
    logging.info("retrieval: host path (config.retrieval='host')")
    return None
  if dtype == "auto":
    dtype = "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"
  spec = TableSpec.of(assembler)
  need = index_bytes(index.count, index.dim, spec.width, np.dtype(DTYPES[dtype]).itemsize,
                     spec.dtype.itemsize)
  if encoder_table is not None:
    need += encoder_table.tokens.nbytes + 4 * len(encoder_table)
  budget = device_budget_bytes(memory_fraction, list(mesh.devices.flat))
  if need > budget:
    message = (f"the index ({index.count} passages x {index.dim} in {dtype} + passage table "
               f"x {spec.width}: {need / 2**30:.1f} GiB) exceeds {memory_fraction:.0%} of the "
               f"devices' memory ({budget / 2**30:.1f} GiB)")
    if mode == "device":
      raise ValueError(f"config.retrieval='device' but {message}")
    logging.warning("retrieval: host path: %s", message)
    return None
  table = load_or_build(tables_dir, store.titles_and_texts, index.count, assembler,
                        progress=progress)
  exact = index
  if not isinstance(index, ExactIndex):  # ScaNN: its embeddings, exactly, on the devices
    exact = ExactIndex.build(index.source, ExactConfig(dtype=dtype), mesh=mesh)
  elif (index.config.dtype != dtype
        or index.mesh.devices.tolist() != mesh.devices.tolist()):
    # Re-placed in place (one device copy, not two): the host-side searches of the same
    # index (Retriever.search) then run on the same embeddings as the step's.
    index.place(dataclasses.replace(index.config, dtype=dtype), mesh)
  logging.info("retrieval: on the devices (%.1f GiB of %.1f GiB budget)", need / 2**30,
               budget / 2**30)
  return DeviceRetrieval.build(exact, table, n_docs, encoder_table)
