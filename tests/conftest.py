"""Test-session setup: 8 fake CPU devices for data-parallel tests, fp32 matmuls, offline hub."""

import os

# Must happen before jax is imported anywhere: data-parallel code is tested on 8 CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# One persistent compilation cache per test session: the trainers' tests compile the same train
# and eval steps in each (killed, resumed, uninterrupted) run; XLA compiles each program once.
if os.environ.get("RAG_JAX_TEST_COMPILE_CACHE", "1") == "1":
  import tempfile

  jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="rag_jax_xla_cache_"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
