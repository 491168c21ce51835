"""Retrieval inside the jitted train step: moved to rag_jax.retrieval.device, which answering and
evaluation use too; this name stays for the trainer's imports."""

from rag_jax.retrieval.device import (
    QUESTION_KEYS,
    RETRIEVAL_MODES,
    DeviceRetrieval,
    device_budget_bytes,
    fits_on_devices,
    index_bytes,
    setup,
)

__all__ = ["QUESTION_KEYS", "RETRIEVAL_MODES", "DeviceRetrieval", "device_budget_bytes",
           "fits_on_devices", "index_bytes", "setup"]
