"""The ScaNN tuning study behind docs/retrieval.md and ScannConfig's defaults: which tree finds
inner-product neighbours (benchmark.py times the chosen settings against faiss).

  python -m benchmarks.scann_sweep [--configs=name,...]   # default: all; names below

Raw ScaNN (no rag_jax wrapper) on the anchor data: 200k x 768, 2000 clusters, unequal norms,
1000 queries, numpy exact top-100 as truth. One RESULT JSON line per (config, leaves, reorder).
"""

from __future__ import annotations

import json
import time

import numpy as np
import scann
from absl import app, flags

from rag_jax.metrics import id_recall_at_k
from rag_jax.retrieval.synthetic import clustered_embeddings

N, D, NQ, K = 200_000, 768, 1000, 100
B = scann.scann_ops_pybind.builder
AQ = {"anisotropic_quantization_threshold": 0.2}


def tree(leaves, **kw):
  return {"num_leaves": leaves, "num_leaves_to_search": 10, "training_sample_size": N, **kw}


# name: (distance, tree kwargs, score_ah kwargs, [leaves to search], [reorder sizes])
CONFIGS = {
    "generic447": ("dot_product", tree(447), AQ, [22, 45, 90], [200]),
    "spherical447": ("dot_product", tree(447, spherical=True), AQ, [22, 45, 67], [200, 400, 1000]),
    "mips2l2": ("squared_l2", tree(447), {}, [22, 45, 90], [200]),
    "generic447_soar": ("dot_product", tree(447, soar_lambda=1.5, overretrieve_factor=2.0), AQ,
                        [22, 45, 90], [200]),
    "generic2000": ("dot_product", tree(2000), AQ, [40, 100, 200], [200]),
    "spherical447_avq": ("dot_product", tree(447, spherical=True, avq=1.0), AQ, [22, 45],
                         [200, 400]),
    "spherical447_soar": ("dot_product", tree(447, spherical=True, soar_lambda=1.0), AQ, [22, 45],
                          [200, 400]),
    "spherical1000": ("dot_product", tree(1000, spherical=True), AQ, [30, 60, 100], [400]),
    "spherical447_noaq": ("dot_product", tree(447, spherical=True), {}, [22, 45], [200, 400]),
    "autopilot": ("dot_product", None, None, [None], [200]),
}


_CONFIGS = flags.DEFINE_list("configs", [], "Configurations to run (default: all).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; name configurations with --configs")
  names = _CONFIGS.value
  x, q = clustered_embeddings(N, D, 2000, NQ, seed=0)
  truth = np.argsort(-(q @ x.T), axis=1)[:, :K]  # (NQ, K)
  for name in names or list(CONFIGS):
    dist, tree_kw, ah_kw, leaves_list, reorders = CONFIGS[name]
    xb, qb = x, q
    if dist == "squared_l2":  # MIPS -> L2: x' = [x, sqrt(max|x|^2 - |x|^2)], q' = [q, 0]
      n2 = (x ** 2).sum(1)
      xb = np.ascontiguousarray(np.concatenate([x, np.sqrt(n2.max() - n2)[:, None]], 1))
      qb = np.ascontiguousarray(np.concatenate([q, np.zeros((NQ, 1), np.float32)], 1))
    b = B(xb, K, dist)
    b = b.autopilot() if tree_kw is None else b.tree(**tree_kw).score_ah(2, **ah_kw).reorder(
        max(reorders))
    t = time.perf_counter()
    s = b.build()
    build = time.perf_counter() - t
    for leaves in leaves_list:
      for r in reorders:
        kw = {"final_num_neighbors": K, "pre_reorder_num_neighbors": r, "leaves_to_search": leaves}
        s.search_batched_parallel(qb[:100], **kw)
        t = time.perf_counter()
        ids, _ = s.search_batched_parallel(qb, **kw)
        qps = NQ / (time.perf_counter() - t)
        ids = np.asarray(ids)
        recall = id_recall_at_k(ids, truth, (1, 10, 100), count="shared")
        print("RESULT", json.dumps({
            "name": name, "build_s": round(build, 1), "leaves": leaves, "reorder": r,
            "qps": round(qps), **{f"r{k}": round(v, 4) for k, v in recall.items()}
        }), flush=True)


if __name__ == "__main__":
  app.run(main)
