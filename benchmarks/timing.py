"""Timing, memory and machine-ceiling measurements shared by every workload.

Each workload times rag_jax and its peer in one process with `measure`: medians over repeats
after warm-up, the first call (compilation for rag_jax) reported apart. Ceilings are measured in
the same run: a large matmul's rate for jax and for torch in the compute dtype (the peak a
workload's FLOP rate is compared with), and a device copy's bandwidth (read + written bytes).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import resource
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rag_jax.utils import host_memory


@dataclasses.dataclass
class Timing:
  """Seconds of one workload: first call (compile + run for jax) and the timed repeats;
  `system_s`, the median kernel CPU time of the process per timed call (page faults, zeroing
  and unmapping of host memory show up there, not in the profile of the program)."""

  first_s: float
  median_s: float
  min_s: float
  max_s: float
  repeats: int
  system_s: float

  def as_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


def measure(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> Timing:
  """Times fn (which must block until its work is done): one first call, `warmup - 1` more
  untimed calls, then `repeats` timed calls."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  for _ in range(max(0, warmup - 1)):
    fn()
  times, system = [], []
  for _ in range(repeats):
    start, cpu = time.perf_counter(), os.times()
    fn()
    times.append(time.perf_counter() - start)
    system.append(os.times().system - cpu.system)
  return Timing(first, float(np.median(times)), float(np.min(times)), float(np.max(times)),
                repeats, float(np.median(system)))


def on_accelerator() -> bool:
  return jax.default_backend() in ("gpu", "tpu")


def reset_host_peak() -> None:
  """Resets the process's peak resident set (Linux clear_refs 5) so the next `host_peak_mb`
  covers only what follows; a no-op where the kernel refuses it. The heap's free memory goes
  back to the system first: the host allocator setting keeps it (rag_jax/utils/host_memory.py),
  and it would count in every later peak (and later allocations would reuse pages faulted in
  small instead of fresh, transparent-huge-page backed ones)."""
  host_memory.release_free_memory()
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def host_peak_mb() -> float:
  """Peak resident memory of this process since start or the last reset, in MiB."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def jax_device_memory() -> dict[str, float]:
  """jax's allocator statistics of this process's first device in GiB ({} on CPU, which keeps
  none)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  keys = ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
  return {k.replace("bytes", "gib"): stats[k] / 2**30 for k in keys if k in stats}


def compiled_memory_gib(compiled: Any) -> dict[str, float]:
  """XLA's memory plan of a compiled program: arguments, outputs, temporaries (GiB)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - not every backend implements it
    return {}
  if m is None:
    return {}
  out = {"argument_gib": m.argument_size_in_bytes, "output_gib": m.output_size_in_bytes,
         "temp_gib": m.temp_size_in_bytes, "alias_gib": m.alias_size_in_bytes}
  return {k: v / 2**30 for k, v in out.items()}


def compiled_flops(compiled: Any) -> float | None:
  """XLA's FLOP count of a compiled program (None where the backend gives none)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001
    return None
  cost = cost[0] if isinstance(cost, list) else cost
  flops = (cost or {}).get("flops")
  return float(flops) if flops else None


def torch_device():
  import torch
  return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def jax_matmul_peak(dtype: Any, size: int) -> float:
  """FLOP/s of a size^3 matmul under XLA in `dtype` (random data, median of repeats)."""
  keys = jax.random.split(jax.random.key(0), 2)
  a = jax.random.normal(keys[0], (size, size), dtype)
  b = jax.random.normal(keys[1], (size, size), dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(dtype))
  t = measure(lambda: f(a, b).block_until_ready(), repeats=10, warmup=3)
  return 2 * size**3 / t.median_s


def torch_matmul_peak(dtype_name: str, size: int) -> float:
  """FLOP/s of a size^3 torch matmul in `dtype_name` on torch's device."""
  import torch
  dev = torch_device()
  dtype = getattr(torch, dtype_name)
  g = torch.Generator(device=dev).manual_seed(0)
  a = torch.randn(size, size, device=dev, dtype=dtype, generator=g)
  b = torch.randn(size, size, device=dev, dtype=dtype, generator=g)
  sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

  def run():
    torch.matmul(a, b)
    sync()

  return 2 * size**3 / measure(run, repeats=10, warmup=3).median_s


def jax_copy_bandwidth(gib: float = 2.0) -> float:
  """Bytes/s of a device copy (x + 1 over a bf16 array): bytes read + bytes written."""
  n = int(gib * 2**30 / 2)
  x = jnp.ones((n,), jnp.bfloat16)
  f = jax.jit(lambda v: v + 1)
  t = measure(lambda: f(x).block_until_ready(), repeats=10, warmup=2)
  return 2 * n * 2 / t.median_s


def torch_copy_bandwidth(gib: float = 2.0) -> float | None:
  """Bytes/s of torch's device copy (`dst.copy_(src)`, bf16): bytes read + bytes written; None
  without torch."""
  try:
    import torch
  except ImportError:
    return None
  dev = torch_device()
  n = int(gib * 2**30 / 2)
  src = torch.ones(n, dtype=torch.bfloat16, device=dev)
  dst = torch.empty_like(src)
  sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

  def run():
    dst.copy_(src)
    sync()

  return 2 * n * 2 / measure(run, repeats=10, warmup=2).median_s


def copy_bandwidth(gib: float, peer: bool) -> dict[str, float]:
  """The device's copy ceiling: jax's and (with `peer`) torch's, the faster as `copy_bandwidth`
  (the fraction-of-bandwidth figures divide by it, like the matmul peak)."""
  out = {"jax_copy_bandwidth": jax_copy_bandwidth(gib)}
  if peer and (torch_rate := torch_copy_bandwidth(gib)):
    out["torch_copy_bandwidth"] = torch_rate
  out["copy_bandwidth"] = max(out.values())
  return out


REPOSITORY = Path(__file__).resolve().parent.parent


def source_commit(root: Path = REPOSITORY) -> str:
  """The short hash of the checkout's commit, with "+changes" when tracked files differ from it
  (the figures are then not that commit's); "not a git checkout" elsewhere."""
  def git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          check=False)
  head = git("rev-parse", "--short", "HEAD")
  if head.returncode:
    return "not a git checkout"
  changed = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
  return head.stdout.strip() + ("+changes" if changed else "")


def machine() -> dict[str, Any]:
  """What ran: devices, host, library versions."""
  import flax
  import transformers
  out = {"jax": jax.__version__, "flax": flax.__version__,
         "transformers": transformers.__version__, "backend": jax.default_backend(),
         "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
         "processes": jax.process_count(), "devices_per_process": jax.local_device_count(),
         "host": platform.platform(), "cpu_count": os.cpu_count(),
         "python": platform.python_version(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
         # A persistent compilation cache turns a repeated compile into a load: compile_s
         # is then not a compile time.
         "compilation_cache": jax.config.jax_compilation_cache_dir or ""}
  try:
    import torch
    out["torch"] = torch.__version__
    out["torch_threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
      out["torch_device"] = torch.cuda.get_device_name(0)
  except ImportError:
    pass
  return out
