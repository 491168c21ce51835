"""Workload (c): maximum inner product search.

Host data (CPU, and any index held in host memory): clustered vectors with unequal norms
(rag_jax.retrieval.synthetic), exact top-100 truth from numpy; rag_jax's exact search (JAX) and
ScaNN index against faiss HNSW (the retriever of transformers' RAG), queries/s and recall@k.

Device data (an accelerator, the preset's full index): random bf16 vectors generated on the
device (21M x 768 = 32 GB at the paper preset), rag_jax's exact search (the pure sharded
function the training step can call) swept over chunk sizes and matmul modes, against torch's
chunked matmul + top-k on the same device, as a fraction of the measured copy bandwidth (one
pass reads every vector once).

On several processes: the exact search alone (no ScaNN, no peers), its index sharded over every
device of every process (`ExactIndex.build(..., mesh=data_mesh())`, each process holding its
devices' rows), every process searching the same queries; recall against numpy's truth; the
host-data rows (`--index_rows` to change).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from benchmarks import flops, multiprocess, profile, timing
from benchmarks.cli import FAISS_EF, SCANN_SPECS
from benchmarks.presets import Preset
from rag_jax.metrics import id_recall_at_k
from rag_jax.parallel import data_mesh
from rag_jax.retrieval.exact import ExactConfig, ExactIndex, make_search_fn
from rag_jax.retrieval.synthetic import clustered_embeddings, noisy_copies

KS = (1, 20, 100)


def numpy_exact(queries: np.ndarray, db: np.ndarray, k: int, block: int = 256) -> np.ndarray:
  """Brute-force truth: ids of the top-k inner products, best first."""
  out = np.empty((len(queries), k), np.int64)
  for s in range(0, len(queries), block):
    scores = queries[s:s + block] @ db.T  # (block, n)
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, idx, 1), axis=1, kind="stable")
    out[s:s + block] = np.take_along_axis(idx, order, 1)
  return out


def _qps(search, queries: np.ndarray, repeats: int) -> tuple[dict[str, Any], np.ndarray]:
  holder = {}

  def run():
    holder["ids"] = search(queries)

  t = timing.measure(run, repeats, 1).as_dict()
  t["queries_per_s"] = len(queries) / t["median_s"]
  return t, holder["ids"]


def _recalls(ids: np.ndarray, truth: np.ndarray) -> dict[str, float]:
  ks = [k for k in KS if k <= truth.shape[1]]
  return {f"recall@{k}": r for k, r in id_recall_at_k(ids, truth, ks, count="shared").items()}


def host_data(preset: Preset, repeats: int, peer: bool, rows: int | None = None,
              scann_specs: tuple[str, ...] = SCANN_SPECS, faiss_ef: tuple[int, ...] = FAISS_EF,
              hnsw_m: int = 128, mesh: Mesh | None = None) -> list[dict[str, Any]]:
  """Exact (JAX) and ScaNN against faiss HNSW on clustered vectors in host memory.

  scann_specs: "leaves_per_sqrt_n:width[,width...]", e.g. "2:0.03,0.05" = 2 sqrt(n) leaves,
  searching 3 % then 5 % of them (rag_jax.retrieval.scann_index.ScannConfig; "2:0.03" is its
  default); a width "recall=0.95" is the fastest width and reorder that reach recall@100 0.95
  on a second, held-out sample of queries (`ScannIndex.calibrate`; the timed queries never take
  part).
  faiss_ef: HNSW efSearch values timed on one graph of `hnsw_m` links per node.
  mesh: where the exact index lives (default: this process's devices).
  """
  from rag_jax.retrieval.scann_index import ScannConfig, ScannIndex
  n = rows or preset.retrieval_rows(timing.on_accelerator())
  dim, k = preset.index_dim, min(100, n)
  x, q = clustered_embeddings(n, dim, max(1, n // 100), preset.index_queries, seed=0)
  start = time.perf_counter()
  truth = numpy_exact(q, x, k)
  numpy_qps = len(q) / (time.perf_counter() - start)
  shape = {"rows": n, "dim": dim, "queries": len(q), "k": k}
  results = []

  index = ExactIndex.build(x, ExactConfig(query_batch_size=min(256, len(q))), mesh)
  t, ids = _qps(lambda qq: index.search(qq, k)[1], q, repeats)
  results.append({"workload": "retrieval", "case": "exact (jax) vs numpy", **shape,
                  **multiprocess.fields(),
                  "unit": "queries", "items": len(q), "flops_hand": flops.retrieval(len(q), n, dim),
                  "bytes_per_pass": x.nbytes,
                  "rag_jax": {**t, **_recalls(ids, truth)},
                  "peer": {"name": "numpy brute force (float32 BLAS)",
                           "median_s": len(q) / numpy_qps, "queries_per_s": numpy_qps}})
  index = None  # released before ScaNN builds

  faiss_rows = _faiss_hnsw(x, q, truth, k, repeats, faiss_ef, hnsw_m) if peer else []
  best_faiss = max(faiss_rows, key=lambda r: r.get("queries_per_s", 0), default=None)
  sample: dict[str, np.ndarray] = {}  # held-out calibration queries, drawn once
  for spec in scann_specs:
    multiplier, fractions = spec.split(":")
    base = ScannConfig(leaves_per_sqrt_n=float(multiplier))
    start = time.perf_counter()
    scann = ScannIndex.build(x, base, progress=False)
    build_s = time.perf_counter() - start
    leaves = base.resolved(n).num_leaves
    for width in fractions.split(","):
      tuned = _tune(scann, x, len(q), k, width, sample) if width.startswith("recall=") else {}
      search = tuned.get("leaves_to_search") or max(1, math.ceil(float(width) * leaves))
      reorder = tuned.get("reorder", base.reorder)
      t, ids = _qps(lambda qq, ix=scann, s=search, r=reorder:
                    ix.search(qq, k, leaves_to_search=s, reorder=r)[1], q, repeats)
      label = (f", reorder {reorder} (tuned to R@{k} {tuned['target_recall']})" if tuned
               else "")
      results.append({
          "workload": "retrieval", "case": f"ScaNN {leaves} leaves, {search} searched{label}",
          **shape, "unit": "queries", "items": len(q),
          "rag_jax": {**t, "build_s": build_s, **_recalls(ids, truth), "num_leaves": leaves,
                      "leaves_to_search": search, "reorder": reorder, **tuned},
          "peer": faiss_at_recall(faiss_rows, _recalls(ids, truth).get("recall@100"))
          or best_faiss})
  return results


def _tune(index, x: np.ndarray, queries: int, k: int, width: str,
          sample: dict[str, np.ndarray]) -> dict[str, Any]:
  """Calibrates `index` to the recall of `width` ("recall=0.95") on fresh noisy copies of the
  rows (another generator than the timed queries'; drawn, with their exact top-k, once into
  `sample`); returns the row's calibration fields (calibration_s excludes the truth)."""
  target = float(width.removeprefix("recall="))
  if not sample:
    sample["queries"] = noisy_copies(x, queries, np.random.default_rng(1))
    sample["truth"] = numpy_exact(sample["queries"], x, k)
  start = time.perf_counter()
  found = index.calibrate(sample["queries"], target, k, truth=sample["truth"])
  recalls = {(w, r): rec for w, r, rec in found.tried}
  return {"target_recall": target, "leaves_to_search": found.leaves_to_search,
          "reorder": found.reorder, "calibration_recall": found.recall,
          "calibration_s": time.perf_counter() - start,
          # [leaves, reorder, recall on the sample, queries/s on the sample] per reorder size
          "calibration_settings": [[w, r, recalls[(w, r)], qps] for w, r, qps in found.timed]}


def faiss_at_recall(rows: list[dict[str, Any]], recall: float | None) -> dict[str, Any] | None:
  """The equal-recall peer: the fastest faiss setting whose recall@100 is at least `recall`;
  when none reaches it, the most accurate one (every faster setting has less recall still, so
  the ratio to it understates rag_jax's lead at equal recall)."""
  measured = [r for r in rows if "recall@100" in r]
  if recall is None or not measured:
    return None
  ok = [r for r in measured if r["recall@100"] >= recall]
  if ok:
    return max(ok, key=lambda r: r["queries_per_s"])
  return max(measured, key=lambda r: r["recall@100"])


def _faiss_hnsw(x: np.ndarray, q: np.ndarray, truth: np.ndarray, k: int, repeats: int,
                ef_values: tuple[int, ...], m: int) -> list[dict[str, Any]]:
  """faiss IndexHNSWFlat (inner product) at each efSearch; [] without faiss-cpu."""
  try:
    import faiss
  except ImportError:
    return [{"name": "faiss HNSW", "skipped": "faiss-cpu not installed (pip install faiss-cpu)"}]
  faiss.omp_set_num_threads(os.cpu_count() or 1)
  start = time.perf_counter()
  index = faiss.IndexHNSWFlat(x.shape[1], m, faiss.METRIC_INNER_PRODUCT)
  index.add(x)
  build_s = time.perf_counter() - start
  rows = []
  for ef in ef_values:
    index.hnsw.efSearch = ef
    t, ids = _qps(lambda qq: index.search(qq, k)[1], q, repeats)
    rows.append({"name": f"faiss {faiss.__version__} IndexHNSWFlat M={m} efSearch={ef}", **t,
                 "build_s": build_s, **_recalls(ids, truth)})
  return rows


def _device_db(rows_padded: int, dim: int, block: int) -> jax.Array:
  """(rows_padded, dim) bf16 N(0, 1) vectors made on the device block by block (no float32
  copy of the whole table ever exists)."""
  keys = jax.random.split(jax.random.key(0), rows_padded // block)
  make = jax.jit(lambda ks: jax.lax.map(
      lambda kk: jax.random.normal(kk, (block, dim), jnp.float32).astype(jnp.bfloat16), ks))
  return make(keys).reshape(rows_padded, dim)  # [blocks, block, d] -> [rows, d]


def device_data(preset: Preset, repeats: int, peer: bool, profile_calls: int = 0,
                chunks: tuple[int, ...] = (16_384, 131_072, 524_288)) -> list[dict[str, Any]]:
  """Exact search over a device-resident bf16 table against torch on the same device; with
  `profile_calls`, a per-op profile of the last variant (bf16 matmul, largest chunk)."""
  n, dim = preset.retrieval_rows(True), preset.index_dim
  block = max(chunks)
  rows = math.ceil(n / block) * block
  mesh = data_mesh(jax.devices()[:1])
  bandwidth = timing.copy_bandwidth(2.0, peer)["copy_bandwidth"]
  db_bytes = n * dim * 2
  batches = ((preset.batch, preset.n_docs[0]), (preset.index_queries, 100))
  rng = np.random.default_rng(0)
  queries = {b: rng.standard_normal((b, dim)).astype(np.float32) for b, _ in batches}
  results = []
  torch_rows = _torch_exact(n, dim, queries, batches, repeats, block) if peer else {}
  db = _device_db(rows, dim, block)
  variants = [("float32", min(chunks)), ("float32", max(chunks))]
  variants += [("storage", c) for c in chunks]
  for b, k in batches:
    q = jnp.asarray(queries[b])
    # Larger chunks were faster at every size measured: where the (B, rows) float32 scores fit
    # in 2 GiB (the training step's 8 queries), also the whole table as one chunk (no scan).
    whole = [("storage", rows)] if b * rows * 4 <= 2**31 and rows > block else []
    for matmul, chunk in variants + whole:
      start = time.perf_counter()
      search = jax.jit(make_search_fn(mesh, k, num_valid=n, rows_per_shard=rows,
                                      chunk_size=chunk, matmul=matmul)).lower(q, db).compile()
      compile_s = time.perf_counter() - start
      t = timing.measure(lambda search=search, q=q: jax.block_until_ready(search(q, db)),
                         repeats, 2).as_dict()
      t.update(compile_s=compile_s, queries_per_s=b / t["median_s"],
               bandwidth_fraction=db_bytes / t["median_s"] / bandwidth)
      case = f"exact on device, {b} queries, top-{k}, matmul={matmul}, chunk={chunk}"
      row = {"workload": "retrieval", "case": case, "rows": n, "dim": dim, "queries": b,
             "k": k, "matmul": matmul, "chunk": chunk, "unit": "queries", "items": b,
             "flops_hand": flops.retrieval(b, n, dim), "bytes_per_pass": db_bytes,
             "copy_bandwidth": bandwidth, "rag_jax": t,
             "peer": torch_rows.get(b)}
      if profile_calls and (matmul, chunk) == (variants + whole)[-1]:
        t["profile"] = profile.profile(
            lambda search=search, q=q: jax.block_until_ready(search(q, db)), profile_calls,
            search.as_text())  # the program that ran: compiled once, above
      results.append(row)
  return results


def _torch_exact(n: int, dim: int, queries: dict[int, np.ndarray], batches, repeats: int,
                 block: int) -> dict[int, dict[str, Any]]:
  """torch peer: an N(0, 1) bf16 table of the same shape built by torch (other values, the same
  work), chunked bf16 matmul + top-k with a running merge, as a user would write it."""
  import torch
  dev = timing.torch_device()
  gen = torch.Generator(device=dev).manual_seed(0)
  db = torch.empty((n, dim), dtype=torch.bfloat16, device=dev)
  for s in range(0, n, block):
    db[s:s + block] = torch.randn((min(block, n - s), dim), generator=gen, device=dev)
  out = {}
  for b, k in batches:
    q = torch.from_numpy(queries[b]).to(dev).to(torch.bfloat16)

    def run(q=q, k=k):
      best_s = best_i = None
      for s in range(0, n, block):
        scores = (q @ db[s:s + block].T).float()
        cs, ci = torch.topk(scores, k, dim=1)
        ci = ci + s
        if best_s is not None:
          cs, sel = torch.topk(torch.cat([best_s, cs], 1), k, dim=1)
          ci = torch.gather(torch.cat([best_i, ci], 1), 1, sel)
        best_s, best_i = cs, ci
      if dev.type == "cuda":
        torch.cuda.synchronize()
      return best_i

    t = timing.measure(run, repeats, 2).as_dict()
    t.update(name="torch chunked bf16 matmul + topk", queries_per_s=b / t["median_s"])
    out[b] = t
  db = None  # released before jax allocates its table
  if dev.type == "cuda":
    torch.cuda.empty_cache()
  return out


def run(preset: Preset, repeats: int, peer: bool, profile_calls: int = 0,
        **host_options: Any) -> list[dict[str, Any]]:
  """Device data for an accelerator's full-size index, else host data; on several processes
  the exact search over the global mesh alone (see the docstring)."""
  if multiprocess.fields():
    # The host-data size (numpy's truth is computed on every process), not the device one.
    return host_data(preset, repeats, False,
                     host_options.get("rows") or preset.retrieval_rows(False), scann_specs=(),
                     faiss_ef=(), mesh=data_mesh())
  if timing.on_accelerator() and preset.retrieval_rows(True) > 1_000_000:
    return device_data(preset, repeats, peer, profile_calls)
  return host_data(preset, repeats, peer, **host_options)
