"""The host allocator setting of the entry points (rag_jax/utils/host_memory.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

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


FAULTS = """
import resource, sys
from rag_jax.utils import host_memory
if sys.argv[1] == "1":
  assert host_memory.configure_host_allocator()
import numpy as np

def step():  # a block like XLA's per-step temporaries, written, then freed
  a = np.empty(200 * 2**20, np.uint8); a.fill(1); del a

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_large_block_is_reused_without_page_faults():
  """The mechanism itself, counted by the kernel: the second 200 MB block of a process page-
  faults afresh by default (glibc maps and unmaps it) and not at all with the setting."""
  def faults(setting: str) -> int:
    out = subprocess.run([sys.executable, "-c", FAULTS, setting], capture_output=True,
                         text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return int(out.stdout.strip())

  default, configured = faults("0"), faults("1")
  assert default > 100 and configured <= 10, (default, configured)


TRIM = """
import ctypes, sys
from rag_jax.utils import host_memory
libc = ctypes.CDLL("libc.so.6")
libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_ssize_t]
assert host_memory.configure_host_allocator()
import numpy as np

low = next(int(line.split("-")[0], 16) for line in open("/proc/self/maps")
           if line.rstrip().endswith("[heap]"))  # where the heap starts
b = np.empty(64 * 2**20, np.uint8); del b  # a free chunk at the heap's top, as earlier frees leave
a = np.empty(5 * 2**29, np.uint8)  # 2.5 GiB, never written: address space only
top = libc.sbrk(0)
inside = low <= a.ctypes.data and a.ctypes.data + a.nbytes <= top  # between heap start and break
del a
kept = libc.sbrk(0)
host_memory.release_free_memory()
print(int(inside), top - kept, kept - libc.sbrk(0))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_block_above_2_gib_stays_in_the_heap():
  """A training step's temporaries above the largest trim threshold mallopt takes (2 GiB; the
  BART-base step's are larger) are kept when freed, as the program break shows: with a 2 GiB
  threshold glibc gave such a block back and page-faulted it in again the next step. And
  `release_free_memory` gives it back on purpose. The block is found by its address between the
  heap's start and the program break, not by how far the break moved: a free chunk already at
  the top (left by earlier frees, since trimming is off) serves part of it."""
  out = subprocess.run([sys.executable, "-c", TRIM], capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  inside, shrunk, released = map(int, out.stdout.split())
  assert inside == 1  # served from the heap, not a separate mmap
  assert shrunk == 0, shrunk
  assert released >= 5 * 2**29, released  # until it is released on purpose


BACK_TO_BACK = """
import ctypes, time
from rag_jax.utils import host_memory
assert host_memory.configure_host_allocator()
import jax, jax.numpy as jnp


class MallInfo2(ctypes.Structure):  # glibc >= 2.33, malloc.h
  _fields_ = [(name, ctypes.c_size_t) for name in (
      "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
      "fordblks", "keepcost")]


libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
n = 8192
program = jax.jit(lambda v, w, u: (jnp.outer(v, w) + 1.0) @ u).lower(
    *[jax.ShapeDtypeStruct((n,), jnp.float32)] * 3).compile()  # a 256 MiB product as temporary
temporaries = program.memory_analysis().temp_size_in_bytes
args = [jnp.ones(n)] * 3
jax.block_until_ready(program(*args))
time.sleep(0.5)
settled = libc.mallinfo2().uordblks  # bytes in use, nothing running
held = 0
for _ in range(30):  # back to back, as a training loop calls its step
  out = jax.block_until_ready(program(*args))
  held += libc.mallinfo2().uordblks > settled + temporaries // 2
  del out
print(temporaries, held)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2")
def test_a_call_has_freed_its_temporaries_when_it_returns():
  """A program's temporaries are freed by the time its outputs are returned, so a call made
  right after (a training loop's next step) reuses the block. With asynchronous dispatch jax's
  CPU runtime freed the block on a worker thread after the outputs were ready: in 13-20 of
  these 30 calls the block was still held when the call returned, the next call allocated a
  second one first, and the BART-base training step's heap held two 2.6 GiB blocks."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as train.py
  out = subprocess.run([sys.executable, "-c", BACK_TO_BACK], capture_output=True, text=True,
                       check=True, env={**env, "JAX_PLATFORMS": "cpu"})
  temporaries, held = map(int, out.stdout.split())
  assert temporaries >= 2**28, temporaries
  assert held == 0, f"{held} of 30 calls returned before their temporaries were freed"
