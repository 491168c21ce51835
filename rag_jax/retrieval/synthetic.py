"""Synthetic embeddings that look like real passage embeddings, for ANN tests and benchmarks.

Isotropic Gaussians are the worst case for every partitioning index and unlike DPR vectors.
This generator (the same recipe as the project's anchor benchmark) draws clusters with unit-ish
centres of varying norm (0.8-1.2), per-cluster spread, Dirichlet-distributed (unequal) cluster
sizes and log-normal per-vector norms (so inner-product search is genuinely MIPS, not cosine),
and queries as noisy copies of random data points.
"""

from __future__ import annotations

import numpy as np


def clustered_embeddings(n: int, dim: int, num_clusters: int, num_queries: int,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Returns (database (n, dim) float32, queries (num_queries, dim) float32).

  With n=200_000, dim=768, num_clusters=2000, num_queries=1000, seed=0 this reproduces the
  benchmark data of docs/retrieval.md bit for bit.
  """
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((num_clusters, dim), dtype=np.float32)
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)
  centres *= rng.uniform(0.8, 1.2, (num_clusters, 1)).astype(np.float32)
  spread = rng.uniform(0.25, 0.6, num_clusters).astype(np.float32) / np.sqrt(dim)
  sizes = rng.dirichlet(np.full(num_clusters, 2.0)) * n
  assign = rng.choice(num_clusters, n, p=sizes / sizes.sum())
  x = centres[assign] + rng.standard_normal((n, dim), dtype=np.float32) * spread[assign, None]
  x *= rng.lognormal(0.0, 0.15, (n, 1)).astype(np.float32)
  x = np.ascontiguousarray(x, dtype=np.float32)
  return x, noisy_copies(x, num_queries, rng)


def noisy_copies(x: np.ndarray, num_queries: int, rng: np.random.Generator) -> np.ndarray:
  """(num_queries, dim) float32 queries: copies of distinct random rows of `x` plus Gaussian
  noise of norm ~0.5 (the queries of :func:`clustered_embeddings`; another generator gives a
  fresh sample, e.g. to tune an index on)."""
  n, dim = x.shape
  qi = rng.choice(n, num_queries, replace=False)
  q = x[qi] + rng.standard_normal((num_queries, dim), dtype=np.float32) * (0.5 / np.sqrt(dim))
  return np.ascontiguousarray(q, dtype=np.float32)
