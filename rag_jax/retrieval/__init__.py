"""RAG's non-parametric memory: passage store, passage encoding, exact and ScaNN MIPS indexes.

  corpus.py      streaming readers (DPR psgs_w100.tsv, own title<TAB>text TSV, JSONL), splitting
  store.py       PassageStore: memory-mapped text/title by row id
  embeddings.py  sharded embedding files + manifest; DPR pickle conversion (explicit opt-in)
  encode.py      DPR context encoder over all devices, resumable shards
  index.py       the Index interface (build / search / save / load) and load_index
  exact.py       exact MIPS: chunked matmul + top-k merge, rows sharded with shard_map
  scann_index.py ScaNN tree + AH + reorder, tuned for inner product; exact scores returned
  pipeline.py    corpus -> index in one call (build_index CLI), Retriever (search CLI)

Modules are imported lazily by their users (jax, ScaNN and transformers are heavy imports).
"""
