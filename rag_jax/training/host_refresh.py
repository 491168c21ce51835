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

import logging
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
from rag_jax.retrieval.index import Index
from rag_jax.retrieval.scann_index import ScannIndex
from rag_jax.training.retrieval_feed import RetrievalFeed
from rag_jax.utils.errors import InputNotFoundError

REFRESHED_DIR = "refreshed_index"
BLOCK_ROWS = 65_536  # passages tokenized and encoded per call (bounds the host's token lists)


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


def rebuild_like(template: Index, embeddings: np.ndarray) -> Index:
  """An index of `template`'s kind and settings (ScaNN tree and search settings, or the exact
  index's layout and mesh) over `embeddings` [N, D] float32."""
  if isinstance(template, ScannIndex):
    return ScannIndex.build(embeddings, template.config, progress=False)
  if isinstance(template, ExactIndex):
    return ExactIndex.build(embeddings, template.config, mesh=template.mesh)
  raise ValueError(f"a {template.kind!r} index has no embeddings to refresh")


class HostRefresh:
  """Re-encodes and swaps the feed's index on the schedule (see the module docstring)."""

  def __init__(self, workdir: Path, feed: RetrievalFeed, ctx_model: DPREncoder,
               table: EncoderTable, schedule: tuple[tuple[int, int, int], ...], mesh: Mesh,
               batch_size: int = 128):
    self.workdir, self.feed, self.table, self.schedule = workdir, feed, table, schedule
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
    if any(start <= step < end and (step - start) % every == 0
           for start, end, every in self.schedule):
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
    logging.info("index refresh: resumed with %s", path)

  def _swap(self, path: Path) -> None:
    self.feed.swap_index(load_index(path, **self._load_kwargs()))
    self.current = path

  def _load_kwargs(self) -> dict[str, Any]:
    return {"mesh": self.template.mesh} if isinstance(self.template, ExactIndex) else {}

  def encode(self, ctx_params: Any) -> np.ndarray:
    """[N, D] float32: every passage encoded by the context encoder with `ctx_params`."""
    n = len(self.table)
    out = None
    with tqdm(total=n, desc="refresh index", unit="passage", dynamic_ncols=True,
              leave=False) as bar:
      for start in range(0, n, BLOCK_ROWS):
        rows = range(start, min(start + BLOCK_ROWS, n))
        seqs = [self.table.tokens[r, :self.table.lengths[r]].tolist() for r in rows]
        emb = self.encoder.encode(ctx_params, seqs, pad_id=self.table.pad_id,
                                  config=self.encode_config, on_batch=bar.update)
        if out is None:
          out = np.empty((n, emb.shape[1]), np.float32)
        out[rows.start:rows.stop] = emb
    return out

  def refresh(self, ctx_params: Any, step: int) -> None:
    """Re-encodes every passage, saves the new index for `step` and swaps it in."""
    index = rebuild_like(self.template, self.encode(ctx_params))
    path = step_dir(self.workdir, step)
    index.save(path)  # atomic: a temporary directory renamed into place
    self._swap(path)
    logging.info("index refresh: %d passages re-encoded before step %d into %s", index.count,
                 step, path)
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
