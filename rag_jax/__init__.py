"""rag_jax: Retrieval-Augmented Generation (Lewis et al., NeurIPS 2020) in JAX/Flax."""

__version__ = "0.1.0"
