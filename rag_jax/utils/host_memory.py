"""The host allocator setting the entry points apply for XLA's CPU backend.

XLA's CPU runtime allocates each execution's temporaries as one block and frees it when the
execution ends. glibc serves a block that large from a fresh anonymous mmap (above its mmap
threshold, or larger than a thread arena's heap), so every step page-faults and zeroes the whole
block again and unmaps it on the way out. With one arena, no mmap-served blocks and no trimming,
the freed block stays in the process's heap and the next step reuses its pages. Trimming is off,
not merely high: a block can exceed the largest threshold mallopt takes (2 GiB; BART-base's
training step needs more), and glibc would then give it back and fault it in again.

The price: memory freed by the process stays with it instead of going back to the system (its
resident size stays at its peak, as with the caching allocators of torch and of jax on
accelerators), and all threads share one malloc arena. That suits a process that runs XLA on the
host CPU; where an accelerator plugin is installed (host memory holds indexes and feeds, XLA's
temporaries live on the device) nothing is changed. It must be applied before jax starts its CPU
client: a thread keeps the arena it first allocated from.

The same call makes jax run single-device CPU programs inline (jax's
`jax_cpu_enable_async_dispatch` off). With asynchronous dispatch the runtime frees an
execution's temporaries on a worker thread after the outputs are ready, so a caller that starts
the next execution at once (a training loop) has it allocate its own block first and the heap
holds two blocks at its peak, kept since nothing is trimmed. Inline, a call returns after its
block is freed and the next call reuses it. Programs over several devices (the tests' forced
host devices) stay asynchronous: jax applies the setting to single-device programs only.
docs/benchmarks.md gives the measured effect.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# mallopt(M_TRIM_THRESHOLD, -1): never return free memory at the top of the heap to the system
# (mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely").
NO_TRIMMING = -1

_applied: bool | None = None


def _accelerator_plugin_installed() -> bool:
  """Whether jax may pick an accelerator: a jax_plugins entry point or namespace module (CUDA,
  ROCm) or libtpu, found without initialising any backend."""
  if importlib.metadata.entry_points(group="jax_plugins"):
    return True
  return any(importlib.util.find_spec(name) is not None for name in ("jax_plugins", "libtpu"))


def jax_runs_on_cpu() -> bool:
  """JAX_PLATFORMS' first entry is cpu, or (unset) no accelerator plugin is installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not _accelerator_plugin_installed()


def _glibc_function(name: str, argtypes: tuple, restype: Any) -> Callable[..., int] | None:
  """glibc's `name` with its C signature, or None off Linux or without glibc (musl has neither
  mallopt nor malloc_trim)."""
  if not sys.platform.startswith("linux"):
    return None
  try:
    function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
  except (OSError, AttributeError):
    return None
  function.argtypes, function.restype = argtypes, restype
  return function


def configure_host_allocator() -> bool:
  """On Linux with glibc, where jax will run on the CPU: one malloc arena, no mmap-served blocks
  and no trimming, and single-device programs run inline (see the module docstring). Returns
  whether it was applied; safe to call more than once (the first call decides)."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  mallopt = jax_runs_on_cpu() and _glibc_function("mallopt", (ctypes.c_int, ctypes.c_int),
                                                   ctypes.c_int)
  if not mallopt:
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, NO_TRIMMING))
  # No log record here: the entry points call this before their log file exists, and the
  # console shows no INFO lines.
  _applied = all(mallopt(param, value) == 1 for param, value in settings)
  if _applied:
    import jax  # Read when jax creates its CPU client, as the allocator must be set before.
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  return _applied


def release_free_memory() -> bool:
  """Gives the heap's free memory back to the system now (glibc's malloc_trim(0)), which the
  setting above otherwise keeps: between phases of a process whose peaks differ, e.g. before
  measuring the next phase's peak memory. Returns whether anything was released."""
  malloc_trim = _glibc_function("malloc_trim", (ctypes.c_size_t,), ctypes.c_int)
  return bool(malloc_trim and malloc_trim(0))
