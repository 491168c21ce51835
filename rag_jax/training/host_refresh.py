"""Scheduled refresh of a host-searched index (config.index_refresh = "scheduled" with the index
searched on the host: ScaNN, or an exact index too big for the devices).

Before each step the schedule names (Atlas's --refresh_index syntax,
rag_jax.retrieval.refresh.parse_schedule), every passage is re-encoded by the trained context
encoder over the local devices, from the encoder table's token ids (length-bucketed batches,
rag_jax.retrieval.encode.BucketedEncoder); an index of the same kind and settings is built from
the new embeddings and saved whole into WORKDIR/refreshed_index/step-<s>/ (written to a
temporary directory and renamed, so a kill leaves the earlier one); only then does the feed
search it, so a step never sees a half-built index. The index_dir on disk is never written.

    refresher = HostRefresh(workdir, feed, ctx_model, encoder_table, schedule, mesh)
    refresher.before_step(params["ctx_encoder"], step)   # every step, before it runs

A resumed run first loads the refreshed index of the last refresh before its first step (the
checkpoint holds the parameters, the workdir that index). Refreshed indexes that no kept
checkpoint can resume with are deleted after each refresh. Memory: the host holds the index
being searched and the one being built (two copies of the embeddings) during a refresh.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from rag_jax.data.passage_table import EncoderTable
from rag_jax.models.bert import DPREncoder
from rag_jax.retrieval.backends import load_index
from rag_jax.retrieval.encode import BucketedEncoder, EncodeConfig
from rag_jax.retrieval.exact import ExactIndex
from rag_jax.retrieval.index import read_meta, save_embeddings_into
from rag_jax.retrieval.refresh import refresh_due
from rag_jax.retrieval.scann_index import ScannConfig, ScannIndex
from rag_jax.training.retrieval_feed import RetrievalFeed
from rag_jax.utils.atomic import atomic_directory
from rag_jax.utils.errors import InputNotFoundError

REFRESHED_DIR = "refreshed_index"
BLOCK_ROWS = 65_536  # passages tokenized and encoded per call (bounds the host's token lists)

log = logging.getLogger(__name__)


def last_refresh_before(schedule: tuple[tuple[int, int, int], ...], step: int) -> int | None:
  """The last step < `step` at which `schedule` refreshes (None: none yet)."""
  found = None
  for start, end, every in schedule:
    stop = min(end, step)  # refresh steps start + k * every < stop
    if stop > start:
      last = start + (stop - 1 - start) // every * every
      found = last if found is None else max(found, last)
  return found


def step_dir(workdir: Path, step: int) -> Path:
  return workdir / REFRESHED_DIR / f"step-{step}"


def saved_steps(root: Path, pattern: str) -> list[int]:
  """The integer names (`pattern` with one group) of the entries of `root`, sorted."""
  if not root.is_dir():
    return []
  return sorted(int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(pattern, p.name)))


def encode_table(encoder: BucketedEncoder, table: EncoderTable, ctx_params: Any,
                 config: EncodeConfig, desc: str) -> np.ndarray:
  """[N, D] float32: every passage of `table` encoded by the context encoder with `ctx_params`,
  BLOCK_ROWS at a time, with a progress bar (passages/s, ETA)."""
  n = len(table)
  out = None
  with tqdm(total=n, desc=desc, unit="passage", dynamic_ncols=True, leave=False) as bar:
    for start in range(0, n, BLOCK_ROWS):
      rows = range(start, min(start + BLOCK_ROWS, n))
      seqs = [table.tokens[r, :table.lengths[r]].tolist() for r in rows]
      emb = encoder.encode(ctx_params, seqs, pad_id=table.pad_id, config=config,
                           on_batch=bar.update)
      if out is None:
        out = np.empty((n, emb.shape[1]), np.float32)
      out[rows.start:rows.stop] = emb
  return out


def save_index_like(original: Path, embeddings: np.ndarray, out: Path) -> None:
  """Saves into `out` (atomically) an index of the kind and settings of the saved index
  `original` (a ScaNN tree and its search settings; an exact index's layout) over `embeddings`
  [N, D] float32, the same N passages re-encoded."""
  meta = read_meta(original)
  if (meta["count"], meta["dim"]) != embeddings.shape:
    raise ValueError(f"{original} holds {meta['count']} x {meta['dim']} embeddings, the "
                     f"refreshed ones are {embeddings.shape[0]} x {embeddings.shape[1]}")
  if meta["type"] == ScannIndex.kind:
    ScannIndex.build(embeddings, ScannConfig.from_json(meta["config"]), progress=False).save(out)
  elif meta["type"] == ExactIndex.kind:
    with atomic_directory(out) as tmp:
      save_embeddings_into(embeddings, tmp / "embeddings")
      (tmp / "index.json").write_text(json.dumps(meta, indent=2))
  else:
    raise ValueError(f"{original}: a {meta['type']!r} index has no embeddings to refresh")


def _link_or_copy(src: str, dst: str) -> None:
  try:
    os.link(src, dst)  # the store is never rewritten in place: a hard link is a snapshot
  except OSError:
    shutil.copy2(src, dst)


def export_index(index_dir: Path, embeddings: np.ndarray, out: Path) -> None:
  """Writes `out` as an index directory (build_index's layout) for a trained context encoder:
  index/ of index_dir/index's kind over `embeddings`, the passage store and its token tables
  hard-linked (copied across file systems). Atomic: `out` appears whole or not at all."""
  with atomic_directory(out) as tmp:
    save_index_like(index_dir / "index", embeddings, tmp / "index")
    for name in ("passages", "passage_tables"):
      if (index_dir / name).is_dir():
        shutil.copytree(index_dir / name, tmp / name, copy_function=_link_or_copy)


class HostRefresh:
  """Re-encodes and swaps the feed's index on the schedule (see the module docstring)."""

  def __init__(self, workdir: Path, feed: RetrievalFeed, original: Path, ctx_model: DPREncoder,
               table: EncoderTable, schedule: tuple[tuple[int, int, int], ...], mesh: Mesh,
               batch_size: int = 128):
    self.workdir, self.feed, self.table, self.schedule = workdir, feed, table, schedule
    self.original = original  # the saved index as built (its kind and settings are kept)
    self.encoder = BucketedEncoder(ctx_model, mesh)
    self.encode_config = EncodeConfig(batch_size=batch_size, max_length=table.width)
    self.template = feed.index
    self.started = False
    self.current: Path | None = None  # the refreshed index the feed searches (None: as built)

  def before_step(self, ctx_params: Any, step: int) -> None:
    """Loads the index to resume with (first call), then refreshes if `step` is due."""
    if not self.started:
      self.started = True
      self._resume(step)
    if refresh_due(self.schedule, step):
      self.refresh(ctx_params, step)

  def _resume(self, step: int) -> None:
    active = last_refresh_before(self.schedule, step)
    if active is None:
      return
    path = step_dir(self.workdir, active)
    if not (path / "index.json").is_file():
      raise InputNotFoundError(
          f"{path}: the index refreshed before step {active} is missing, and the checkpoint of "
          f"step {step} resumes with it; restore the directory, or delete "
          f"{self.workdir / 'checkpoints'} and {self.workdir / REFRESHED_DIR} to train anew")
    self._swap(path)
    log.info("index refresh: resumed with %s", path)

  def _swap(self, path: Path) -> None:
    self.feed.swap_index(load_index(path, **self._load_kwargs()))
    self.current = path

  def _load_kwargs(self) -> dict[str, Any]:
    return {"mesh": self.template.mesh} if isinstance(self.template, ExactIndex) else {}

  def refresh(self, ctx_params: Any, step: int) -> None:
    """Re-encodes every passage, saves the new index for `step` and swaps it in."""
    embeddings = encode_table(self.encoder, self.table, ctx_params, self.encode_config,
                              f"refresh index (step {step})")
    path = step_dir(self.workdir, step)
    save_index_like(self.original, embeddings, path)  # renamed into place once complete
    self._swap(path)
    log.info("index refresh: %d passages re-encoded before step %d into %s",
                 len(embeddings), step, path)
    self.prune(step)

  def prune(self, newest: int) -> None:
    """Deletes the refreshed indexes older than the one the oldest kept checkpoint resumes with
    (every later one is kept: a checkpoint still being written may need it)."""
    checkpoints = saved_steps(self.workdir / "checkpoints", r"(\d+)")
    if not checkpoints:
      return
    needed = last_refresh_before(self.schedule, checkpoints[0])
    for old in saved_steps(self.workdir / REFRESHED_DIR, r"step-(\d+)"):
      if old < newest and (needed is None or old < needed):
        shutil.rmtree(step_dir(self.workdir, old))
