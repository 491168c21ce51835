"""Corpus file -> searchable index in one call.

  python -m rag_jax.retrieval.build_index --corpus psgs_w100.tsv --encoder dpr-ctx_encoder \
      --out wiki_index [--index scann|exact] [--batch_size 128] [--dtype float16]

Stages (each shows a progress bar, each resumable; see rag_jax.retrieval.pipeline): passage
store, passage embeddings (or DPR's published pickles with --dpr_embeddings ... --allow_pickle),
index. Search it with ``python -m rag_jax.retrieval.search --dir wiki_index ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from rag_jax.retrieval.corpus import FORMATS
from rag_jax.retrieval.encode import EncodeConfig
from rag_jax.retrieval.exact import ExactConfig
from rag_jax.retrieval.scann_index import ScannConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m rag_jax.retrieval.build_index",
                              description=__doc__.split("\n")[0])
  p.add_argument("--corpus", required=True, help="psgs_w100.tsv, title<TAB>text TSV or JSONL")
  p.add_argument("--out", required=True, help="output directory (passages, embeddings, index)")
  p.add_argument("--format", default="auto", choices=("auto",) + FORMATS)
  p.add_argument("--split_words", type=int, default=100,
                 help="words per passage for own corpora (0: no split); DPR files are never split")
  p.add_argument("--encoder", help="DPRContextEncoder directory (Hugging Face format)")
  p.add_argument("--tokenizer", help="tokenizer directory (default: --encoder)")
  p.add_argument("--dpr_embeddings", nargs="+", help="DPR wikipedia_passages_*.pkl, corpus order")
  p.add_argument("--allow_pickle", action="store_true",
                 help="allow unpickling --dpr_embeddings (runs code from the files: trusted only)")
  p.add_argument("--index", default="scann", choices=("scann", "exact"))
  p.add_argument("--batch_size", type=int, default=EncodeConfig.batch_size)
  p.add_argument("--max_length", type=int, default=EncodeConfig.max_length)
  p.add_argument("--shard_size", type=int, default=EncodeConfig.shard_size)
  p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                 help="storage dtype of the embeddings")
  p.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--num_leaves", type=int, help="ScaNN leaves (default sqrt(n))")
  p.add_argument("--leaves_fraction", type=float, default=ScannConfig.leaves_fraction)
  p.add_argument("--reorder", type=int, default=ScannConfig.reorder)
  p.add_argument("--reorder_dtype", default="float32", choices=("float32", "bfloat16", "int8"))
  p.add_argument("--exact_dtype", default="float32", choices=("float32", "bfloat16"),
                 help="device storage of an exact index")
  p.add_argument("--quiet", action="store_true", help="no progress bars")
  return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  from rag_jax.retrieval.pipeline import build_from_corpus  # after parsing: --help stays fast

  index = build_from_corpus(
      args.corpus, args.out, encoder=args.encoder, tokenizer=args.tokenizer, fmt=args.format,
      split_words=args.split_words or None, index_type=args.index,
      encode_config=EncodeConfig(batch_size=args.batch_size, max_length=args.max_length,
                                 shard_size=args.shard_size, dtype=args.dtype),
      compute_dtype=args.compute_dtype,
      scann_config=ScannConfig(num_leaves=args.num_leaves, leaves_fraction=args.leaves_fraction,
                               reorder=args.reorder, reorder_dtype=args.reorder_dtype),
      exact_config=ExactConfig(dtype=args.exact_dtype),
      dpr_embeddings=args.dpr_embeddings, allow_pickle=args.allow_pickle,
      progress=not args.quiet)
  print(f"built a {index.kind} index of {index.count} passages x {index.dim} in {args.out}/index")
  return 0


if __name__ == "__main__":
  sys.exit(main())
