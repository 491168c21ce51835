"""Timing shared by the benchmark scripts."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def median_seconds(fn: Callable[[], object], iters: int, warmup: int) -> float:
  """Median wall time of `iters` calls of fn after `warmup` untimed calls (fn must block until
  its work is done, e.g. jax.block_until_ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))
