"""The host allocator setting of the entry points (rag_jax/utils/host_memory.py)."""

from __future__ import annotations

import subprocess
import sys

from rag_jax.utils import host_memory


def test_only_where_jax_runs_on_the_cpu(monkeypatch):
  monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
  assert not host_memory.jax_runs_on_cpu()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert host_memory.jax_runs_on_cpu()


def test_applied_once_in_a_fresh_process_and_jax_still_computes():
  code = ("import os; os.environ['JAX_PLATFORMS'] = 'cpu'\n"
          "from rag_jax.utils.host_memory import configure_host_allocator as c\n"
          "first = c(); assert c() == first\n"
          "import jax.numpy as jnp\n"
          "x = jnp.ones((4096, 4096)); assert float((x @ x)[0, 0]) == 4096.0\n"
          "print(first)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  expected = "True" if sys.platform.startswith("linux") else "False"
  assert out.stdout.strip() == expected
