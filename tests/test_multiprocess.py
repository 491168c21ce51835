"""Two processes joined by jax.distributed (gloo collectives on CPU, 2 devices each) train the
same steps as one process on one device: multi-host data parallelism with per-host input."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from rag_jax.parallel import data_mesh
from rag_jax.training.rag_step import make_train_step
from tests import test_rag_train_step as t

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_device(tmp_path):
  port = _free_port()
  out = tmp_path / "params.npz"
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, "-m", "tests.multiprocess_worker", str(port),
                             str(i), str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=600)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)

  model = t._model()
  step = make_train_step(model, data_mesh(jax.devices()[:1]), t.LOSS, deterministic=True)
  state = t._state(model)
  for i in range(t.STEPS):
    state, metrics = step(state, t._batch(seed=i))
  expected = traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
  got = np.load(out)
  assert set(got.files) == set(expected) | {"loss_sum"}
  for name, value in expected.items():
    np.testing.assert_allclose(got[name], value, atol=1e-5, rtol=0, err_msg=name)
  np.testing.assert_allclose(got["loss_sum"], metrics["loss_sum"], rtol=1e-5)
