"""ScaNN (tree partitioning + anisotropic hashing + exact reorder) behind the :class:`Index` API.

Why the defaults are what they are (measured numbers in docs/retrieval.md):

* ``spherical=True`` partitioning. ScaNN's default ("GENERIC") k-means leaves are scored against a
  query by ``q . centroid``. When a leaf mixes several natural clusters its centroid shrinks
  towards the origin, and a query whose cluster is a minority of the leaf scores that leaf no
  higher than unrelated ones: on 200k x 768 clustered vectors with unequal norms recall@1 was only
  0.61 / 0.72 with 5 % / 20 % of leaves searched. Spherical k-means normalises the centroids, so
  leaves are ranked by direction, which is what an inner-product query needs: recall@1 1.00 and
  recall@100 0.96 at 5-10 % of sqrt(n) leaves. (SOAR spilling did not fix GENERIC leaves, 2000
  GENERIC leaves still left recall@1 at 0.95, autopilot reached 0.73; see the doc.)
* ``num_leaves = 2 sqrt(n)`` with 3 % of them searched, ``score_ah(2, 0.2)`` (4-bit codes per 2
  dims, anisotropic loss) and a float32 reorder of 400 candidates: on the 200k x 768 anchor data
  recall@100 0.967 at 3,200 q/s on 2 cores, beside faiss HNSW M=128 (0.960 at 3,800 q/s,
  0.973 at 1,500 q/s).
* The share of leaves a recall needs depends on the data (3 % gives recall@100 0.967 at 200k
  but 0.943 at 1M clustered vectors), so :meth:`ScannIndex.calibrate` measures the fastest
  ``leaves_to_search`` and ``reorder`` reaching a target recall on sample queries against brute
  force (rag_jax/retrieval/calibrate.py) and saves them with the index.
* Tiny corpora (< ``brute_force_below`` rows) use ScaNN's exact brute-force scorer: a tree is
  pointless there and k-means needs enough points per leaf.

Scores handed back are always exact inner products with the stored embeddings: with the default
float32 reorder ScaNN's own final scores are exactly that (q . x in float32); with a quantized
reorder (bfloat16/int8, to halve or quarter ScaNN's memory at 21M passages) the candidates are
rescored from the stored vectors (``exact_rescore``), so quantization only affects which
passages are found, never their scores.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from rag_jax.retrieval.calibrate import Calibration, calibrate_search
from rag_jax.retrieval.embeddings import EmbeddingStore
from rag_jax.retrieval.index import (
  Embeddings,
  Index,
  IndexFileError,
  embeddings_shape,
  exact_rescore,
  gather_rows,
  open_index_embeddings,
  read_meta,
  save_embeddings_into,
)
from rag_jax.utils.atomic import atomic_directory, atomic_file

REORDER_TYPES = ("float32", "bfloat16", "int8")
_REQUIRED_FILES = ("scann_assets.pbtxt", "scann_config.pb")


@dataclass(frozen=True)
class ScannConfig:
  """ScaNN settings; None fields are derived from the corpus size at build time.

  Attributes:
    num_leaves: tree partitions; default round(leaves_per_sqrt_n * sqrt(n)).
    leaves_per_sqrt_n: 2: twice ScaNN's sqrt(n) rule of thumb (smaller leaves, fewer points
      scanned per query at equal recall; measured in docs/retrieval.md).
    leaves_to_search: partitions scanned per query; default ceil(leaves_fraction * num_leaves).
    leaves_fraction: used when leaves_to_search is None.
    spherical: spherical k-means partitioning (see module docstring; keep True for MIPS).
    training_sample_size: points used to train the tree.
    ah_training_sample_size: points used to train the AH codebooks.
    training_iterations: k-means iterations for the tree.
    soar_lambda: SOAR spilling strength (None: off). Costs build time and memory.
    dims_per_block: AH block width (2 is ScaNN's recommendation).
    anisotropic_threshold: AH anisotropic-loss threshold (nan: plain k-means codebooks).
    hash_type: ``lut16`` (4-bit codes, SIMD lookup) or ``lut256``.
    reorder: candidates rescored with float vectors before the final top-k (>= k is enforced).
    reorder_dtype: ScaNN's in-memory copy for reordering: float32, bfloat16 (half) or int8.
    brute_force_below: corpora smaller than this use exact brute force scoring.
    num_threads: search threads (0: all cores); training_threads likewise for the build.
    batch_size: queries per thread task in search_batched_parallel.
  """

  num_leaves: int | None = None
  leaves_per_sqrt_n: float = 2.0
  leaves_to_search: int | None = None
  leaves_fraction: float = 0.03
  spherical: bool = True
  training_sample_size: int = 250_000
  ah_training_sample_size: int = 100_000
  training_iterations: int = 12
  soar_lambda: float | None = None
  dims_per_block: int = 2
  anisotropic_threshold: float = 0.2
  hash_type: str = "lut16"
  reorder: int = 400
  reorder_dtype: str = "float32"
  brute_force_below: int = 20_000
  num_threads: int = 0
  training_threads: int = 0
  batch_size: int = 256

  def resolved(self, n: int) -> ScannConfig:
    """Fills the size-dependent fields for a corpus of `n` vectors."""
    leaves = self.num_leaves or max(1, round(self.leaves_per_sqrt_n * math.sqrt(n)))
    search = self.leaves_to_search or max(1, math.ceil(self.leaves_fraction * leaves))
    return replace(self, num_leaves=leaves, leaves_to_search=min(search, leaves),
                   training_sample_size=min(self.training_sample_size, n))

  def to_json(self) -> dict:
    d = asdict(self)
    d["anisotropic_threshold"] = None if math.isnan(self.anisotropic_threshold) else \
        self.anisotropic_threshold
    return d

  @classmethod
  def from_json(cls, d: dict) -> ScannConfig:
    d = dict(d)
    if d.get("anisotropic_threshold") is None:
      d["anisotropic_threshold"] = float("nan")
    return cls(**d)


def _scann():
  import scann  # local import: loading the ScaNN extension takes a moment
  return scann


def build_searcher(data: np.ndarray, config: ScannConfig, k: int = 100):
  """Builds a ScaNN searcher over float32 `data` (n, d) with a resolved `config`."""
  scann = _scann()
  if config.reorder_dtype not in REORDER_TYPES:
    raise ValueError(f"reorder_dtype must be one of {REORDER_TYPES}")
  from scann.scann_ops.py.scann_builder import ReorderType  # deferred with scann itself
  reorder_type = getattr(ReorderType, config.reorder_dtype.upper())
  b = scann.scann_ops_pybind.builder(data, min(k, len(data)), "dot_product")
  if len(data) < config.brute_force_below:
    b = b.score_brute_force(quantize=reorder_type)
  else:
    b = b.tree(num_leaves=config.num_leaves, num_leaves_to_search=config.leaves_to_search,
               training_sample_size=config.training_sample_size,
               training_iterations=config.training_iterations, spherical=config.spherical,
               soar_lambda=config.soar_lambda)
    b = b.score_ah(config.dims_per_block,
                   anisotropic_quantization_threshold=config.anisotropic_threshold,
                   training_sample_size=min(config.ah_training_sample_size, len(data)),
                   hash_type=config.hash_type)
    b = b.reorder(config.reorder, quantize=reorder_type)
  if config.training_threads:
    b = b.set_n_training_threads(config.training_threads)
  searcher = b.build()
  if config.num_threads:
    searcher.set_num_threads(config.num_threads)
  return searcher


class ScannIndex(Index):
  """Approximate MIPS with ScaNN; returned scores are exact (see module docstring)."""

  kind = "scann"

  def __init__(self, searcher, embeddings: Embeddings, config: ScannConfig,
               calibration: Calibration | None = None):
    self.searcher = searcher
    self.source = embeddings
    self.count, self.dim = embeddings_shape(embeddings)
    self.config = config
    self.calibration = calibration  # how config.leaves_to_search was chosen, if measured

  @property
  def uses_tree(self) -> bool:
    return self.count >= self.config.brute_force_below

  @classmethod
  def build(cls, embeddings: Embeddings, config: ScannConfig | None = None,
            progress: bool = True) -> ScannIndex:
    n, _ = embeddings_shape(embeddings)
    if n == 0:
      raise ValueError("cannot index an empty set of embeddings")
    config = (config or ScannConfig()).resolved(n)
    if isinstance(embeddings, EmbeddingStore):
      data = embeddings.to_array(np.float32, progress=progress)
    else:
      data = np.ascontiguousarray(embeddings, dtype=np.float32)
    return cls(build_searcher(data, config), embeddings, config)

  def calibrate(self, queries: np.ndarray, target_recall: float = 0.95, k: int = 100,
                truth: np.ndarray | None = None, reorders: tuple[int, ...] | None = None,
                progress: bool = False) -> Calibration:
    """Sets `config.leaves_to_search` and `config.reorder` to the fastest setting reaching
    `target_recall` recall@k on `queries` (rag_jax.retrieval.calibrate; `reorders=(n,)`
    keeps the reorder at n); saved with the index."""
    self.calibration = calibrate_search(self, queries, target_recall, k, truth,
                                        reorders=reorders, progress=progress)
    self.config = replace(self.config, leaves_to_search=self.calibration.leaves_to_search,
                          reorder=self.calibration.reorder)
    return self.calibration

  def search(self, queries: np.ndarray, k: int, leaves_to_search: int | None = None,
             reorder: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by exact inner product among ScaNN's candidates.

    Args:
      queries: (Q, dim).
      k: results per query.
      leaves_to_search / reorder: per-call overrides of the config (recall/speed knob).
    """
    queries = self.check_queries(queries, k)
    kwargs = {"final_num_neighbors": k}
    if self.uses_tree:
      kwargs["leaves_to_search"] = leaves_to_search or self.config.leaves_to_search
      kwargs["pre_reorder_num_neighbors"] = max(reorder or self.config.reorder, k)
    idx, dist = self.searcher.search_batched_parallel(
        queries, batch_size=self.config.batch_size, **kwargs)
    idx = np.asarray(idx).astype(np.int64).reshape(len(queries), -1)  # (Q, <=k), uint32 -> int64
    dist = np.asarray(dist, dtype=np.float32).reshape(len(queries), -1)  # (Q, <=k)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    ids[:, :idx.shape[1]] = idx[:, :k]
    ids[(ids < 0) | (ids >= self.count)] = -1
    if self.config.reorder_dtype != "float32":
      return exact_rescore(queries, ids, self.source)
    # A float32 reorder (or float32 brute force) already returns q . x in float32 for every
    # candidate, i.e. the exact score; only normalise ties (smaller row first) and padding.
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    scores[:, :dist.shape[1]] = dist[:, :k]
    scores[ids < 0] = -np.inf
    order = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -scores), axis=-1)
    return np.take_along_axis(scores, order, -1), np.take_along_axis(ids, order, -1)

  def embeddings(self, ids: np.ndarray) -> np.ndarray:
    return gather_rows(self.source, ids)

  def save(self, path: str | os.PathLike, overwrite: bool = True) -> None:
    with atomic_directory(path, overwrite=overwrite) as tmp:
      (tmp / "scann").mkdir()
      # Paths relative to the directory, so the temp directory can be renamed into place.
      self.searcher.serialize(str(tmp / "scann"), relative_path=True)
      save_embeddings_into(self.source, tmp / "embeddings")
      (tmp / "index.json").write_text(json.dumps(self._scann_meta(), indent=2))

  def _scann_meta(self) -> dict:
    meta = self._meta(self.config.to_json())
    if self.calibration is not None:
      meta["calibration"] = self.calibration.to_json()
    return meta

  def save_settings(self, path: str | os.PathLike) -> None:
    """Rewrites only `path`/index.json (search settings and calibration) of this index's saved
    directory, atomically; the ScaNN files and vectors stay. Refuses a directory that holds
    another index (type, count or dim differ)."""
    meta = read_meta(path, self.kind)
    if (meta["count"], meta["dim"]) != (self.count, self.dim):
      raise IndexFileError(f"{Path(path) / 'index.json'}: an index of {meta['count']} x "
                           f"{meta['dim']}, not this one ({self.count} x {self.dim})")
    with atomic_file(Path(path) / "index.json", "w") as f:
      json.dump(self._scann_meta(), f, indent=2)

  @classmethod
  def load(cls, path: str | os.PathLike, **overrides) -> ScannIndex:
    """Loads a saved ScaNN index; `overrides` replace search-time config fields."""
    path = Path(path)
    meta = read_meta(path, cls.kind)
    config = replace(ScannConfig.from_json(meta["config"]), **overrides)
    sdir = path / "scann"
    for name in _REQUIRED_FILES:
      if not (sdir / name).exists():
        raise IndexFileError(f"{sdir / name} is missing: the ScaNN index at {path} is incomplete")
    if (sdir / "scann_docids.pkl").exists():
      # ScaNN would unpickle it; rag_jax never writes one, so it is foreign: refuse.
      raise IndexFileError(f"{sdir / 'scann_docids.pkl'}: unexpected pickle in a rag_jax index")
    embeddings = open_index_embeddings(path, meta)
    try:
      searcher = _scann().scann_ops_pybind.load_searcher(str(sdir), assets_backcompat_shim=False)
    except (RuntimeError, ValueError) as e:
      raise IndexFileError(f"{sdir}: ScaNN could not load the index ({e})") from None
    if config.num_threads:
      searcher.set_num_threads(config.num_threads)
    calibration = meta.get("calibration")
    return cls(searcher, embeddings, config,
               Calibration.from_json(calibration) if calibration else None)
