"""Retrieval benchmark: ScaNN (our wrapper) and exact MIPS (JAX) against faiss HNSW, same run.

  python benchmarks/retrieval_bench.py --n 200000 --dim 768 --queries 1000 [--no_faiss]

Data: rag_jax.retrieval.synthetic.clustered_embeddings (the anchor benchmark's clustered vectors
with unequal norms; n=200k, dim=768, 2000 clusters reproduces it exactly). Truth: numpy exact
top-100. Each system reports build seconds, memory (RSS growth during build and bytes on disk),
queries/s (median of 3 timed passes over all queries, after a warm-up) and recall@{1,5,20,100}.
The ScaNN figures include our exact rescoring of the returned candidates (what RAG receives).
faiss is an optional peer imported here only (pip install faiss-cpu); rag_jax never needs it.
Output: one JSON line per measurement, prefixed "RESULT".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import numpy as np  # noqa: E402

from rag_jax.retrieval.synthetic import clustered_embeddings, recall_at  # noqa: E402

KS = (1, 5, 20, 100)
T0 = time.time()


def rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmRSS"):
        return int(line.split()[1]) / 1024
  return float("nan")


def dir_mb(path: str) -> float:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / 2**20


def log(**kw) -> None:
  kw["t"] = round(time.time() - T0, 1)
  print("RESULT", json.dumps(kw), flush=True)


def numpy_exact(q: np.ndarray, x: np.ndarray, k: int, bs: int = 250) -> np.ndarray:
  out = np.empty((len(q), k), np.int64)
  for s in range(0, len(q), bs):
    sc = q[s:s + bs] @ x.T  # (bs, n)
    idx = np.argpartition(-sc, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(sc, idx, 1), axis=1)
    out[s:s + bs] = np.take_along_axis(idx, order, 1)
  return out


def timed(fn, q: np.ndarray, reps: int = 3) -> tuple[float, np.ndarray]:
  fn(q[:min(len(q), 100)])  # warm-up (compilation, caches)
  times, ids = [], None
  for _ in range(reps):
    t = time.perf_counter()
    ids = fn(q)
    times.append(time.perf_counter() - t)
  return len(q) / float(np.median(times)), ids


def recalls(ids: np.ndarray, truth: np.ndarray) -> dict:
  return {f"recall@{k}": round(recall_at(ids, truth, k), 4) for k in KS}


def bench_exact(x, q, truth, args) -> None:
  from rag_jax.retrieval.exact import ExactConfig, ExactIndex
  r0, t = rss_mb(), time.perf_counter()
  index = ExactIndex.build(x, ExactConfig(chunk_size=args.exact_chunk, query_batch_size=250))
  build = time.perf_counter() - t
  qps, ids = timed(lambda qq, ix=index: ix.search(qq, 100)[1], q)
  log(system="exact_jax", n=len(x), build_s=round(build, 1), rss_MB=round(rss_mb() - r0),
      db_MB=round(x.nbytes / 2**20), qps=round(qps, 1), **recalls(ids, truth))
  del index


def bench_scann(x, q, truth, args, tmp: str) -> None:
  from rag_jax.retrieval.index import load_index
  from rag_jax.retrieval.scann_index import ScannConfig, ScannIndex
  n = len(x)
  for spec in args.scann:
    mult, fracs = spec.split(":")  # "2:0.03,0.05" = 2*sqrt(n) leaves, search 3 % and 5 %
    leaves = round(float(mult) * math.sqrt(n))
    cfg = ScannConfig(num_leaves=leaves, reorder=args.reorder,
                      training_sample_size=args.train_sample)
    r0, t = rss_mb(), time.perf_counter()
    index = ScannIndex.build(x, cfg, progress=False)
    build = time.perf_counter() - t
    rss = rss_mb() - r0
    path = os.path.join(tmp, "scann")
    index.save(path)
    disk = dir_mb(os.path.join(path, "scann"))
    index = load_index(path)  # what a user gets; embeddings memory-mapped from disk
    for frac in fracs.split(","):
      search = max(1, math.ceil(float(frac) * leaves))
      qps, ids = timed(
          lambda qq, ix=index, s=search: ix.search(qq, 100, leaves_to_search=s)[1], q)
      log(system="scann", n=n, num_leaves=leaves, leaves_to_search=search, reorder=args.reorder,
          spherical=cfg.spherical, build_s=round(build, 1), build_rss_MB=round(rss),
          scann_disk_MB=round(disk), qps=round(qps, 1), **recalls(ids, truth))
    del index
    shutil.rmtree(path)


def bench_faiss(x, q, truth, args) -> None:
  import faiss
  faiss.omp_set_num_threads(os.cpu_count())
  r0, t = rss_mb(), time.perf_counter()
  index = faiss.IndexHNSWFlat(x.shape[1], args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
  index.add(x)
  build = time.perf_counter() - t
  rss = rss_mb() - r0
  disk = faiss.serialize_index(index).nbytes / 2**20
  for ef in args.ef_search:
    index.hnsw.efSearch = ef
    qps, ids = timed(lambda qq: index.search(qq, 100)[1], q)
    log(system="faiss_hnsw", faiss=faiss.__version__, n=len(x), M=args.hnsw_m, efSearch=ef,
        efConstruction=index.hnsw.efConstruction, build_s=round(build, 1), rss_MB=round(rss),
        disk_MB=round(disk), qps=round(qps, 1), **recalls(ids, truth))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--n", type=int, default=200_000)
  p.add_argument("--dim", type=int, default=768)
  p.add_argument("--clusters", type=int, default=0, help="default n / 100")
  p.add_argument("--queries", type=int, default=1000)
  p.add_argument("--scann", nargs="*", default=["1:0.05,0.1", "2:0.03,0.05"],
                 help="leaf multiplier of sqrt(n) : fractions of leaves searched")
  p.add_argument("--reorder", type=int, default=400)
  p.add_argument("--train_sample", type=int, default=250_000)
  p.add_argument("--exact_chunk", type=int, default=16384)
  p.add_argument("--hnsw_m", type=int, default=128)
  p.add_argument("--ef_search", type=int, nargs="*", default=[128, 256])
  p.add_argument("--no_faiss", action="store_true")
  p.add_argument("--no_exact", action="store_true")
  args = p.parse_args()

  x, q = clustered_embeddings(args.n, args.dim, args.clusters or max(1, args.n // 100),
                              args.queries, seed=0)
  nrm = np.linalg.norm(x, axis=1)
  log(stage="data", n=args.n, dim=args.dim, cpus=os.cpu_count(), norm_min=float(nrm.min()),
      norm_max=float(nrm.max()))
  t = time.perf_counter()
  truth = numpy_exact(q, x, 100)
  log(system="numpy_exact", n=args.n, qps=round(args.queries / (time.perf_counter() - t), 1))
  with tempfile.TemporaryDirectory() as tmp:
    if not args.no_exact:
      bench_exact(x, q, truth, args)
    bench_scann(x, q, truth, args, tmp)
  if not args.no_faiss:
    bench_faiss(x, q, truth, args)
  log(stage="done")


if __name__ == "__main__":
  main()
