"""Recall-targeted tuning of ScaNN's search settings, against exact search on sample queries.

ScaNN's `leaves_to_search` trades speed for recall, and the share of leaves a given recall
needs depends on the data: on the clustered 768-d benchmark vectors of docs/retrieval.md, 3 %
of 2 sqrt(n) leaves gives recall@100 0.967 at 200k rows but 0.943 at 1M, where 5 % reaches
0.952. Its `reorder` (the candidates rescored exactly) trades the same way from the other side:
fewer candidates need more leaves for the same recall but cost less each. So both are measured:
:func:`calibrate_search` computes the exact top-k of sample queries by brute force
(:func:`exact_topk`, streamed over the stored rows), finds for each of a few reorder sizes the
smallest `leaves_to_search` whose mean recall@k reaches the target (recall grows with the leaves
searched, so doubling from a start width, then bisection: about log2(num_leaves) searches of the
sample), times each such setting on the sample, and keeps the fastest. A reorder size is given
up as soon as one of its searches, still short of the target, is slower than twice the fastest
setting found so far (a wider search only gets slower).

The sample should look like the questions the index will serve: question embeddings from the
question encoder (e.g. a dev set's) are best; rows of the corpus itself are the stand-in when no
questions are at hand (`rag_jax.commands.build_index --target_recall` without
`--calibration_queries`). The choice between settings is by measured speed on this machine, so
two calibrations may pick different (equally fast) settings; every setting kept reaches the
target on the sample.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from rag_jax.metrics import id_recall_at_k
from rag_jax.retrieval.embeddings import EmbeddingStore
from rag_jax.retrieval.index import (
  Embeddings,
  IndexDimensionError,
  embeddings_shape,
  gather_rows,
)
from rag_jax.utils.errors import InputError, InputNotFoundError, NonFiniteError, UserError


class TunableIndex(Protocol):
  """What calibration needs of an index (rag_jax.retrieval.scann_index.ScannIndex, which
  imports this module, so it is named structurally here)."""

  count: int
  config: Any  # num_leaves, leaves_to_search, reorder, brute_force_below
  source: Embeddings

  @property
  def uses_tree(self) -> bool: ...

  def check_queries(self, queries: np.ndarray, k: int) -> np.ndarray: ...

  def search(self, queries: np.ndarray, k: int, leaves_to_search: int | None = None,
             reorder: int | None = None) -> tuple[np.ndarray, np.ndarray]: ...

  def calibrate(self, queries: np.ndarray, target_recall: float, k: int,
                reorders: tuple[int, ...] | None = None,
                progress: bool = False) -> Calibration: ...

log = logging.getLogger(__name__)


class CalibrationError(UserError, ValueError):
  """The target recall is out of reach at any search width of this index, or the index has no
  search width (ScaNN's brute force on a small index)."""


@dataclass(frozen=True)
class Calibration:
  """Result of :func:`calibrate_search`.

  Attributes:
    leaves_to_search, reorder: the fastest setting found that reaches `target_recall`.
    recall: mean recall@k of the sample at that setting.
    queries_per_s: the sample's search speed at that setting (median of the timed searches).
    target_recall, k: what was asked for.
    num_leaves: the index's partitions (so the width reads as a share of them).
    queries: size of the query sample.
    tried: (leaves_to_search, reorder, recall) of every search, in order.
    timed: (leaves_to_search, reorder, queries/s) of each reorder size's smallest width.
  """

  leaves_to_search: int
  reorder: int
  recall: float
  queries_per_s: float
  target_recall: float
  k: int
  num_leaves: int
  queries: int
  tried: tuple[tuple[int, int, float], ...]
  timed: tuple[tuple[int, int, float], ...]

  def to_json(self) -> dict:
    return {**asdict(self), "tried": [list(t) for t in self.tried],
            "timed": [list(t) for t in self.timed]}

  @classmethod
  def from_json(cls, d: dict) -> Calibration:
    return cls(**{**d, "tried": tuple((int(w), int(r), float(x)) for w, r, x in d["tried"]),
                  "timed": tuple((int(w), int(r), float(x)) for w, r, x in d["timed"])})


def _row_blocks(embeddings: Embeddings, rows: int) -> Iterator[tuple[int, np.ndarray]]:
  """(first row, float32 block) over the stored rows, at most `rows` at a time."""
  if isinstance(embeddings, EmbeddingStore):
    shards = embeddings.iter_shards()
  else:
    shards = iter([(0, len(embeddings), embeddings)])
  for start, stop, shard in shards:
    for s in range(0, stop - start, rows):
      yield start + s, np.asarray(shard[s:s + rows], dtype=np.float32)


def exact_topk(queries: np.ndarray, embeddings: Embeddings, k: int, rows_per_block: int = 16_384,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Brute-force maximum inner product top-k, streamed over the rows in host memory.

  Args:
    queries: (Q, d) float32.
    embeddings: (n, d) array or an EmbeddingStore (read shard by shard, never loaded whole).
    k: results per query, <= n.
    rows_per_block: rows scored per matmul; the score buffer is Q x rows_per_block float32.
  Returns:
    (scores (Q, k) float32, ids (Q, k) int64), best first; equal scores in row order.
  """
  n, _ = embeddings_shape(embeddings)
  if not 1 <= k <= n:
    raise ValueError(f"k={k} must lie in [1, {n}] (the number of stored rows)")
  queries = np.asarray(queries, dtype=np.float32)
  best_scores = np.empty((len(queries), 0), np.float32)  # (Q, <=k) running top-k
  best_ids = np.empty((len(queries), 0), np.int64)
  with tqdm(total=n, disable=not progress, unit=" rows", unit_scale=True,
            desc="exact top-k for calibration") as bar:
    for start, block in _row_blocks(embeddings, rows_per_block):
      scores = np.concatenate([best_scores, queries @ block.T], axis=1)  # (Q, <=k + b)
      ids = np.concatenate([best_ids, np.broadcast_to(
          np.arange(start, start + len(block)), (len(queries), len(block)))], axis=1)
      if scores.shape[1] > k:
        keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (Q, k), unordered
        scores, ids = np.take_along_axis(scores, keep, 1), np.take_along_axis(ids, keep, 1)
      best_scores, best_ids = scores, ids
      bar.update(len(block))
  order = np.lexsort((best_ids, -best_scores), axis=-1)  # score desc, then row asc
  return np.take_along_axis(best_scores, order, -1), np.take_along_axis(best_ids, order, -1)


def reorder_sizes(k: int, configured: int) -> tuple[int, ...]:
  """The reorder sizes tried by default: k x (1.5, 2, 3, 4) and the configured one, largest
  first. Not k itself: with no spare candidates the approximate scores alone would choose the
  top k, which rarely reaches a useful recall."""
  return tuple(sorted({math.ceil(k * f) for f in (1.5, 2, 3, 4)} | {max(configured, k)},
                      reverse=True))


def calibrate_search(index: TunableIndex, queries: np.ndarray, target_recall: float = 0.95,
                     k: int = 100, truth: np.ndarray | None = None,
                     reorders: tuple[int, ...] | None = None, repeats: int = 3,
                     progress: bool = False) -> Calibration:
  """The fastest (leaves_to_search, reorder) at which `index` reaches `target_recall` recall@k.

  Args:
    index: a tree-partitioned ScannIndex (`uses_tree`).
    queries: (Q, d) sample queries (see the module docstring for where to take them).
    target_recall: mean recall@k to reach, in (0, 1].
    k: the recall depth (and the search's k).
    truth: (Q, k) exact top-k ids, if already known; computed by :func:`exact_topk` otherwise.
    reorders: reorder sizes to try (each >= k); default :func:`reorder_sizes`. One size keeps
      the reorder fixed and only tunes the width.
    repeats: timed searches of the sample per candidate setting (their median counts).
  Raises:
    CalibrationError: even the largest reorder size with every leaf searched stays below the
      target (ScaNN's approximate scores drop true neighbours before the reorder: a larger
      reorder is needed).
  """
  if not 0.0 < target_recall <= 1.0:
    raise ValueError(f"target_recall must lie in (0, 1], got {target_recall}")
  if not index.uses_tree:
    raise CalibrationError(f"a ScaNN index of {index.count} rows scores every row exactly "
                           f"(brute force below {index.config.brute_force_below} rows): there is "
                           "no search width to tune")
  queries = index.check_queries(queries, k)
  sizes = tuple(sorted(set(reorders or reorder_sizes(k, index.config.reorder)), reverse=True))
  if sizes[-1] < k:
    raise ValueError(f"reorder sizes {sizes} must be >= k={k}")
  if truth is None:
    truth = exact_topk(queries, index.source, k, progress=progress)[1]
  elif truth.shape != (len(queries), k):
    raise ValueError(f"truth has shape {truth.shape}; expected {(len(queries), k)}")
  num_leaves = index.config.num_leaves
  tried: dict[tuple[int, int], float] = {}

  def search(width: int, reorder: int) -> tuple[float, float]:
    """(recall, seconds) of one search of the sample."""
    start = time.perf_counter()
    _, ids = index.search(queries, k, leaves_to_search=width, reorder=reorder)
    seconds = time.perf_counter() - start
    if (width, reorder) not in tried:
      tried[(width, reorder)] = id_recall_at_k(ids, truth, [k], count="shared")[k]
      log.info("leaves_to_search %d of %d, reorder %d: recall@%d %.4f (%.3f s)", width,
               num_leaves, reorder, k, tried[(width, reorder)], seconds)
    return tried[(width, reorder)], seconds

  timed: list[tuple[int, int, float]] = []
  start_width = min(index.config.leaves_to_search, num_leaves)
  for reorder in sizes:  # largest first: its width is the smallest, its search the cheapest
    fastest = min((len(queries) / qps for _, _, qps in timed), default=math.inf)
    width = _smallest_width(lambda w, r=reorder: search(w, r), start_width, num_leaves,
                            target_recall, give_up_after=2 * fastest)
    if width is None:
      if not timed:  # the largest reorder with every leaf searched: unreachable
        raise CalibrationError(
            f"recall@{k} is {tried[(num_leaves, reorder)]:.4f} with all {num_leaves} leaves "
            f"searched, below the target {target_recall}: raise the reorder (now at most "
            f"{reorder})")
      continue
    seconds = float(np.median([search(width, reorder)[1] for _ in range(repeats)]))
    timed.append((width, reorder, len(queries) / seconds))
    start_width = width  # a smaller reorder needs at least about as many leaves
  width, reorder, qps = max(timed, key=lambda t: t[2])
  return Calibration(leaves_to_search=width, reorder=reorder, recall=tried[(width, reorder)],
                     queries_per_s=qps, target_recall=target_recall, k=k,
                     num_leaves=num_leaves, queries=len(queries),
                     tried=tuple((w, r, x) for (w, r), x in tried.items()),
                     timed=tuple(timed))


def _smallest_width(search, start: int, num_leaves: int, target: float,
                    give_up_after: float) -> int | None:
  """The smallest width whose recall reaches `target` (search(width) -> (recall, seconds));
  None if every leaf falls short, or a search short of the target took over `give_up_after`
  seconds (a wider one only takes longer)."""
  below, above = 0, start  # recall(0) = 0 < target
  while True:
    recall, seconds = search(above)
    if recall >= target:
      break
    if above == num_leaves or seconds > give_up_after:
      return None
    below, above = above, min(2 * above, num_leaves)
  while above - below > 1:  # invariant: recall(below) < target <= recall(above)
    middle = (below + above) // 2
    below, above = (below, middle) if search(middle)[0] >= target else (middle, above)
  return above


@dataclass(frozen=True)
class CalibrationSpec:
  """What an index build calibrates to (rag_jax.retrieval.pipeline, build_index's flags).

  Attributes:
    target_recall: mean recall@k to reach.
    k: the recall depth.
    queries: (Q, d) sample queries; None draws `sample_size` corpus rows (:func:`sample_rows`).
    sample_size: stand-in queries drawn when `queries` is None.
    reorders: reorder sizes to try (None: :func:`reorder_sizes`).
    source: the file `queries` came from (named in errors).
  """

  target_recall: float
  k: int = 100
  queries: np.ndarray | None = None
  sample_size: int = 1000
  reorders: tuple[int, ...] | None = None
  source: str = ""


def calibrate_built_index(index: TunableIndex, spec: CalibrationSpec,
                          progress: bool = False) -> Calibration | None:
  """Calibrates a freshly built ScaNN index per `spec`; None (and a log line) for a brute-force
  one, which has no width to tune."""
  if not index.uses_tree:
    log.info("ScaNN index of %d rows scores every row: no calibration", index.count)
    return None
  if spec.queries is None:
    return index.calibrate(sample_rows(index.source, spec.sample_size), spec.target_recall,
                           spec.k, reorders=spec.reorders, progress=progress)
  try:
    return index.calibrate(spec.queries, spec.target_recall, spec.k, reorders=spec.reorders,
                           progress=progress)
  except IndexDimensionError as e:
    raise IndexDimensionError(f"{spec.source or 'calibration queries'}: {e}") from None


def load_queries(path: str) -> np.ndarray:
  """(Q, d) float32 query embeddings from a .npy file, checked (errors name the file)."""
  try:
    array = np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise InputNotFoundError(f"{path}: no such query file") from None
  except ValueError as e:  # not .npy, or an object array that would need unpickling
    raise InputError(f"{path}: not a numeric .npy array ({e})") from None
  if array.ndim != 2 or array.shape[0] == 0 or not np.issubdtype(array.dtype, np.floating):
    raise InputError(f"{path}: expected a (num_queries, dim) float array, got "
                     f"{array.dtype} {array.shape}")
  if not np.isfinite(array).all():
    row = int(np.nonzero(~np.isfinite(array).all(axis=1))[0][0])
    raise NonFiniteError(f"{path}: row {row} holds NaN or inf")
  return np.asarray(array, dtype=np.float32)


def sample_rows(embeddings: Embeddings, size: int, seed: int = 0) -> np.ndarray:
  """`size` distinct stored rows (float32), drawn uniformly: stand-in calibration queries."""
  n, _ = embeddings_shape(embeddings)
  rows = np.sort(np.random.default_rng(seed).choice(n, min(size, n), replace=False))
  return gather_rows(embeddings, rows)


def describe(calibration: Calibration, noun: str = "queries") -> str:
  """One line for the console: 'leaves_to_search: 93 of 2000 leaves (4.7 %), reorder 400 reach
  recall@100 0.9501 (target 0.95) on 1000 queries'."""
  c = calibration
  pct = 100.0 * c.leaves_to_search / max(1, c.num_leaves)
  return (f"leaves_to_search: {c.leaves_to_search} of {c.num_leaves} leaves "
          f"({pct:.{1 if pct >= 1 else 2}f} %), reorder {c.reorder} reach recall@{c.k} "
          f"{c.recall:.4f} (target {c.target_recall}) on {c.queries} {noun}")
