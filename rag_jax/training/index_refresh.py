"""The refreshed device index in a training run (config.index_refresh; the device work is
rag_jax.retrieval.refresh's): the index state rides in the train state, so orbax checkpoints
it with the rest and a resumed run continues from the very embeddings and stamps it stopped at.

    runner = RefreshRunner(step_fn, retrieval, refresh, ctx_model)  # step_fn: make_train_step(
    state = runner.init(state)                                      #   ..., refresh=refresh)
    state, metrics = runner(state, batch, step)                     # one optimizer step

The index file on disk is never written: the refreshed embeddings live on the devices and in
the checkpoints only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from rag_jax.models.bert import DPREncoder
from rag_jax.models.rag import CTX_ENCODER
from rag_jax.retrieval.device import DeviceRetrieval
from rag_jax.retrieval.refresh import (
  INDEX_STATE_KEYS,
  Refresh,
  full_refresh,
  initial_state,
  parse_schedule,
  refresh_due,
)
from rag_jax.training.state import TrainState


class IndexTrainState(TrainState):
  """A TrainState carrying the refreshed index state {"embeddings" [rows, D], "encoded_at"
  [rows] int32}, sharded by rows over the index's mesh (the rest is replicated)."""

  index: Any = None


def from_config(config: ml_collections.ConfigDict) -> Refresh | None:
  """config.index_refresh and its fields -> a Refresh (None for "none")."""
  if config.index_refresh == "none":
    return None
  return Refresh(config.index_refresh, rows_per_step=config.refresh_rows_per_step,
                 schedule=(parse_schedule(config.refresh_schedule)
                           if config.index_refresh == "scheduled" else ()),
                 candidates=config.rerank_candidates)


class RefreshRunner:
  """One optimizer step with the index state: a scheduled full refresh first when due (with the
  parameters entering the step, stamped with its number), then the jitted step, which takes
  the index state beside the state and donates it. retrieval.arrays["embeddings"] is kept
  pointing at the current embeddings, so evaluation (make_eval_step) searches the refreshed
  index."""

  def __init__(self, step_fn: Callable[..., Any], retrieval: DeviceRetrieval, refresh: Refresh,
               ctx_model: DPREncoder):
    self.step_fn, self.retrieval, self.refresh = step_fn, retrieval, refresh
    self.arrays = {k: v for k, v in retrieval.arrays.items() if k not in INDEX_STATE_KEYS}
    self.full = full_refresh(retrieval, ctx_model) if refresh.mode == "scheduled" else None

  def init(self, state: TrainState) -> IndexTrainState:
    """`state` with the index as built (encoded_at 0)."""
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    return IndexTrainState(**fields, index=initial_state(self.retrieval))

  def __call__(self, state: IndexTrainState, batch: dict[str, Any], step: int
               ) -> tuple[IndexTrainState, dict[str, Any]]:
    index = state.index
    if self.full is not None and refresh_due(self.refresh.schedule, step):
      index = self.full(state.params[CTX_ENCODER], index, self.arrays, np.int32(step))
    new, index, metrics = self.step_fn(state.replace(index=None), batch, self.arrays, index)
    self.retrieval.arrays["embeddings"] = index["embeddings"]
    return new.replace(index=index), metrics


def summarize(window: dict[str, float]) -> dict[str, float]:
  """The staleness figures of a metrics window: mean and max steps since each retrieved row
  was encoded."""
  if "retrieved" not in window:
    return {}
  return {"staleness": window["staleness_sum"] / max(window["retrieved"], 1.0),
          "staleness_max": window["staleness_max"]}

