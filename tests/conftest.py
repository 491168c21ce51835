"""Test-session setup: 8 fake CPU devices for data-parallel tests, fp32 matmuls, offline hub."""

import os

# Must happen before jax is imported anywhere: data-parallel code is tested on 8 CPU devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# One persistent compilation cache per test session, shared with the subprocesses the tests
# start (train.py / evaluate.py / build-index runs inherit the environment): the trainers' tests
# compile the same train and eval steps in each (killed, resumed, uninterrupted) run and process;
# XLA compiles each program once. The cache key includes XLA_FLAGS and the devices, so a
# subprocess on one CPU device never reads an 8-device program.
if os.environ.get("RAG_JAX_TEST_COMPILE_CACHE", "1") == "1":
  import tempfile

  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="rag_jax_xla_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
