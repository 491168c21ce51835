"""One process of the two-process data-parallel test (tests/test_multiprocess.py).

Usage: python -m tests.multiprocess_worker PORT PROCESS_ID OUT.npz
Each process has 2 CPU devices; jax.distributed joins them into one 4-device mesh; each process
feeds its half of every global batch; process 0 saves the parameters after the steps.
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")


def main(port: str, process_id: str, out: str) -> None:
  import numpy as np
  from flax import traverse_util

  from rag_jax.parallel import data_mesh, global_batch, replicate
  from rag_jax.training.rag_step import make_train_step
  from tests import test_rag_train_step as t

  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=int(process_id))
  assert jax.device_count() == 4 and jax.local_device_count() == 2
  mesh = data_mesh()
  model = t._model()
  state = replicate(t._state(model), mesh)
  step = make_train_step(model, mesh, t.LOSS, deterministic=True)
  half = t.B // 2
  rows = slice(jax.process_index() * half, (jax.process_index() + 1) * half)
  for i in range(t.STEPS):
    local = {k: v[rows] for k, v in t._batch(seed=i).items()}
    state, metrics = step(state, global_batch(local, mesh))
  params = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.params)
  if jax.process_index() == 0:
    flat = traverse_util.flatten_dict(params, sep="/")
    np.savez(out, loss_sum=np.asarray(metrics["loss_sum"].addressable_data(0)), **flat)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
