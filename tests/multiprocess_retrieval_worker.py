"""One process of the in-step retrieval test (tests/test_distributed_retrieval.py), started by
rag_jax.commands.launch (2 fake CPU devices each, gloo).

Usage: python -m tests.multiprocess_retrieval_worker OUT.npz
On the global mesh of every process's devices: the index, passage table and lengths (each
process holds its rows), one retrieval of the whole question batch, then 3 RAG-Sequence train
steps with retrieval inside the step, each process feeding its half of the batch. Process 0
saves the retrieved rows and the losses.
"""

import sys

from rag_jax.distributed import initialize, is_primary

STEPS = 3


def main(out: str) -> None:
  initialize()  # from the launcher's RAG_JAX_* variables
  import jax  # after initialize: jax.distributed must start before the backend
  import numpy as np

  from rag_jax.parallel import data_mesh, global_batch, replicate
  from rag_jax.training.rag_step import make_train_step
  from tests import test_device_retrieval as t

  jax.config.update("jax_default_matmul_precision", "highest")
  world = t.make_world()
  mesh = data_mesh()
  _, _, retrieval, batch = t.setup_retrieval(world, mesh)
  complete = jax.jit(lambda p, b, a: retrieval.complete_batch(world["model"], p, b, a))
  rows = complete(world["params"], batch, retrieval.arrays)  # replicated: any device's copy
  rows = {k: np.asarray(v.addressable_data(0)) for k, v in rows.items()}

  state = replicate(t.train_state(world), mesh)
  step = make_train_step(world["model"], mesh, t.loss_fn("rag_sequence"), retrieval=retrieval)
  half = t.B // 2
  mine = slice(jax.process_index() * half, (jax.process_index() + 1) * half)
  losses = []
  for _ in range(STEPS):
    local = {k: v[mine] for k, v in batch.items()}
    state, metrics = step(state, global_batch(local, mesh), retrieval.arrays)
    losses.append(float(np.asarray(metrics["loss_sum"].addressable_data(0))))
  if is_primary():
    np.savez(out, losses=np.asarray(losses), **rows)


if __name__ == "__main__":
  main(*sys.argv[1:])
