"""Workloads of `benchmark.py`: rag_jax against its peers (transformers, faiss) in one process."""
