"""Retrieval on 2 processes x 2 fake CPU devices (the index also on 4 x 1; gloo) against one
process: the exact index over the global mesh (each process holds only its rows; ids and scores
equal numpy brute force, ties included), one exact or ScaNN index per process with the top-k
merged (equal where the search is exact), and retrieval inside the jitted train step (the same
rows; the losses of 3 steps with each process feeding half the batch)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from rag_jax.parallel import global_batch, replicate
from rag_jax.retrieval.exact import ExactConfig, ExactIndex
from rag_jax.retrieval.merged import MergedIndex, block_scann_config, merge_top_k, process_rows
from rag_jax.retrieval.scann_index import ScannConfig, ScannIndex
from rag_jax.training.rag_step import make_train_step
from tests import multiprocess_retrieval_worker as worker
from tests import test_device_retrieval as t

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ExactConfig(chunk_size=16, query_batch_size=4)

# Integer-valued vectors: exact float32 scores and many ties; row 150 repeats row 7 and query 1
# is row 7, so its best two scores tie.
DATA = """
import numpy as np
rng = np.random.default_rng(0)
emb = rng.integers(-3, 4, (203, 16)).astype(np.float32)
emb[150] = emb[7]
emb[102] = emb[101]  # a tie across blocks (2 processes: rows 0-101, 102-202; 4: 51-101, 102-152)
queries = rng.integers(-3, 4, (9, 16)).astype(np.float32)
queries[1] = emb[7]
queries[2] = emb[101]
"""

WORKER = DATA + """
import sys
from rag_jax.distributed import initialize, is_primary
initialize()
import jax
from rag_jax.parallel import data_mesh
from rag_jax.parallel import global_batch, replicate
from rag_jax.retrieval.exact import ExactConfig, ExactIndex
from rag_jax.retrieval.merged import MergedIndex, block_scann_config, merge_top_k, process_rows
from rag_jax.retrieval.scann_index import ScannConfig, ScannIndex
from rag_jax.training.rag_step import make_train_step
from tests import multiprocess_retrieval_worker as worker
from tests import test_device_retrieval as t
index = ExactIndex.build(emb, ExactConfig(chunk_size=16, query_batch_size=4), mesh=data_mesh())
scores, ids = index.search(queries, 10)
rows = sorted(int(r) for s in index.db.addressable_shards for r in
              np.arange(index.db.shape[0])[s.index[0]])
from rag_jax.retrieval.merged import MergedIndex
from rag_jax.retrieval.scann_index import ScannConfig
merged = {}
for name, kind, kw in (("exact", "exact", {}),
                       ("scann", "scann", {"scann_config": ScannConfig(
                           brute_force_below=10, num_leaves=4, leaves_fraction=1.0,
                           reorder=100, num_threads=1)})):
  m = MergedIndex.build(emb, kind, **kw)
  merged[name + "_scores"], merged[name + "_ids"] = m.search(queries, 10)
if is_primary():
  np.savez(sys.argv[1], scores=scores, ids=ids, **merged)
print("rows", jax.process_index(), rows[0], rows[-1], len(rows), flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("processes,devices", [(2, 2), (4, 1)])
def test_exact_index_over_several_processes_equals_one_process(tmp_path, processes, devices):
  out = tmp_path / "result.npz"
  run = subprocess.run(
      [sys.executable, "-m", "rag_jax.commands.launch", f"--num_processes={processes}",
       f"--cpu_devices={devices}", f"--log_dir={tmp_path}", "--", sys.executable, "-c", WORKER,
       str(out)],
      cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
      timeout=240)
  assert run.returncode == 0, run.stdout + run.stderr
  # 203 rows padded to 4 devices x 64: process p holds rows [p * per, (p + 1) * per) only.
  per = 256 // processes
  assert f"rows 0 0 {per - 1} {per}" in run.stdout
  for p in range(1, processes):
    assert (f"rows {p} {p * per} {(p + 1) * per - 1} {per}"
            in (tmp_path / f"process-{p}.log").read_text())
  namespace: dict = {}
  exec(DATA, namespace)  # noqa: S102 (the same inputs as the processes)
  emb, queries = namespace["emb"], namespace["queries"]
  got = np.load(out)
  scores = queries @ emb.T
  order = np.lexsort((np.broadcast_to(np.arange(len(emb)), scores.shape), -scores))[:, :10]
  np.testing.assert_array_equal(got["ids"], order)  # ties to the smaller row
  np.testing.assert_array_equal(got["scores"], np.take_along_axis(scores, order, 1))
  assert list(got["ids"][1][:2]) == [7, 150] and list(got["ids"][2][:2]) == [101, 102]
  # One index per process (exact; ScaNN searching every leaf of a 4-leaf tree), merged.
  for kind in ("exact", "scann"):
    np.testing.assert_array_equal(got[f"{kind}_ids"], order, err_msg=kind)
    np.testing.assert_array_equal(got[f"{kind}_scores"], np.take_along_axis(scores, order, 1))
  one = ExactIndex.build(emb, CONFIG, mesh=Mesh(np.array(jax.devices()[:4]), ("data",)))
  one_scores, one_ids = one.search(queries, 10)
  np.testing.assert_array_equal(got["ids"], one_ids)
  np.testing.assert_array_equal(got["scores"], one_scores)


@pytest.mark.slow
def test_in_step_retrieval_over_two_processes_equals_one_process(tmp_path):
  out = tmp_path / "result.npz"
  run = subprocess.run(
      [sys.executable, "-m", "rag_jax.commands.launch", "--num_processes=2", "--cpu_devices=2",
       f"--log_dir={tmp_path}", "--", sys.executable, "-m", "tests.multiprocess_retrieval_worker",
       str(out)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
      text=True, timeout=400)
  assert run.returncode == 0, run.stdout + run.stderr
  got = np.load(out)

  world = t.make_world()
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  _, _, retrieval, batch = t.setup_retrieval(world, mesh)
  complete = jax.jit(lambda p, b, a: retrieval.complete_batch(world["model"], p, b, a))
  rows = jax.device_get(complete(world["params"], batch, retrieval.arrays))
  for key, value in rows.items():  # ids, scores, generator rows, embeddings: bit for bit
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  state = replicate(t.train_state(world), mesh)
  step = make_train_step(world["model"], mesh, t.loss_fn("rag_sequence"), retrieval=retrieval)
  losses = []
  for _ in range(worker.STEPS):
    state, metrics = step(state, global_batch(batch, mesh), retrieval.arrays)
    losses.append(float(metrics["loss_sum"]))
  # The gradients' sum across processes (gloo) adds in another order than one process's psum:
  # the parameters, and the losses after the first update, agree to float32 rounding.
  assert got["losses"][0] == losses[0]
  np.testing.assert_allclose(got["losses"], losses, rtol=1e-6)


def test_process_rows_and_merge():
  assert [process_rows(203, p, 2) for p in range(2)] == [(0, 102), (102, 203)]
  assert [process_rows(5, p, 4) for p in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]
  # Two processes' lists (ids of process 0 below process 1's); ties go to the smaller id.
  scores = np.array([[[5.0, 3.0, 1.0]], [[5.0, 4.0, -np.inf]]], np.float32)  # [P, Q, k]
  ids = np.array([[[1, 0, 2]], [[7, 9, -1]]])
  s, i = merge_top_k(scores, ids, 4)
  assert i.tolist() == [[1, 7, 9, 0]] and s.tolist() == [[5.0, 5.0, 4.0, 3.0]]


def test_a_loaded_merged_index_scales_its_tree_and_serves_every_row(tmp_path):
  """MergedIndex.load of a saved ScaNN index (one process: the block is every row): its search
  equals a brute-force top-k, embeddings(ids) any row of the source. block_scann_config scales
  the tree to a block."""
  rng = np.random.default_rng(0)
  emb = rng.standard_normal((300, 8)).astype(np.float32)
  queries = rng.standard_normal((5, 8)).astype(np.float32)
  config = ScannConfig(brute_force_below=10, num_leaves=6, leaves_fraction=1.0, reorder=300,
                       num_threads=1)
  ScannIndex.build(emb, config, progress=False).save(tmp_path / "index")
  merged = MergedIndex.load(tmp_path / "index")
  assert merged.kind == "scann"
  scores, ids = merged.search(queries, 4)
  want = np.argsort(-(queries @ emb.T), axis=1, kind="stable")[:, :4]
  np.testing.assert_array_equal(ids, want)
  np.testing.assert_allclose(scores, np.take_along_axis(queries @ emb.T, want, 1), rtol=1e-5)
  np.testing.assert_array_equal(merged.embeddings(np.array([[7, 299]])), emb[[[7, 299]]])
  block = block_scann_config(ScannConfig(num_leaves=100, leaves_to_search=7), 1000, 250)
  assert (block.num_leaves, block.leaves_to_search) == (25, 2)
