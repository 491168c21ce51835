"""rag_jax: Retrieval-Augmented Generation (Lewis et al., NeurIPS 2020) in JAX/Flax."""

import os

# rag_jax uses transformers for tokenizers and configs only and never needs PyTorch, so its
# import-time advice "PyTorch was not found" is noise here. Only that advisory class of messages
# is silenced; a user's own setting of the variable wins.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
