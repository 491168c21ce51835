r"""Corpus file -> passage store and embeddings, on one process or on every process of a job.

  python -m rag_jax.commands.encode_passages --corpus=psgs_w100.tsv --encoder=dpr-ctx_encoder \
      --out=wiki_index [--batch_size=128] [--dtype=float16] [--compute_dtype=bfloat16]
  python -m rag_jax.commands.launch --num_processes=8 --gpus_per_process=1 -- \
      python -m rag_jax.commands.encode_passages ...    # srun, a TPU slice: docs/distributed.md

The first two stages of build_index (rag_jax/retrieval/pipeline.py, `encode_corpus`): process 0
builds OUT/passages while the others wait, then each process encodes its share of the shards of
OUT/embeddings over its local devices (rag_jax/retrieval/encode.py); process 0 marks them
complete once every share is done. OUT must be on a file system every process shares. A killed
job resumes each process's share; processes given a different corpus, encoder or settings are
refused before any work, naming what differs. Then `python -m rag_jax.commands.build_index` with
the same --corpus, --encoder, --out (and --max_length, --shard_size, --dtype) on one process
reuses both stages and builds the index. Only process 0 prints; the others log to
OUT/.logs/process-<i>.log.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from absl import flags

from rag_jax.commands.common import (
  define_common_flags,
  define_encode_flags,
  encode_config,
  parse_flags,
  run_command,
  start_processes,
)
from rag_jax.distributed import is_primary
from rag_jax.retrieval.corpus import FORMATS, check_corpus
from rag_jax.retrieval.pipeline import encode_corpus
from rag_jax.utils.errors import os_errors_under
from rag_jax.utils.lock import output_lock

FLAGS = flags.FlagValues()
_F = {"flag_values": FLAGS}
flags.DEFINE_string("corpus", None, "psgs_w100.tsv, title<TAB>text TSV or JSONL.", required=True,
                    **_F)
flags.DEFINE_string("out", None, "Output directory (passages/ and embeddings/), shared by every "
                    "process.", required=True, **_F)
flags.DEFINE_string("encoder", None, "DPRContextEncoder directory (Hugging Face format).",
                    required=True, **_F)
flags.DEFINE_string("tokenizer", None, "Tokenizer directory (default: --encoder).", **_F)
flags.DEFINE_enum("format", "auto", ["auto", *FORMATS], "Corpus format.", **_F)
flags.DEFINE_integer("split_words", 100, "Words per passage for own corpora (0: no split); DPR "
                     "files are never split.", lower_bound=0, **_F)
define_encode_flags(FLAGS)
flags.DEFINE_bool("quiet", False, "No progress bar.", **_F)
define_common_flags(FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
  """Encodes the corpus of argv's flags; returns the exit code (rag_jax/commands/common.py)."""
  parse_flags(FLAGS, "python -m rag_jax.commands.encode_passages", __doc__, argv)
  return run_command(_encode, FLAGS)


def _encode() -> int:
  check_corpus(FLAGS.corpus)  # a bad corpus is refused before any process is joined
  out = Path(FLAGS.out)
  processes = start_processes(FLAGS, "rag_jax.commands.encode_passages", out / ".logs")
  with os_errors_under(out):
    emb = encode_corpus(
        FLAGS.corpus, out, encoder=FLAGS.encoder, tokenizer=FLAGS.tokenizer, fmt=FLAGS.format,
        split_words=FLAGS.split_words or None,
        encode_config=encode_config(FLAGS),
        compute_dtype=FLAGS.compute_dtype, progress=not FLAGS.quiet, lock=output_lock)
  if is_primary():
    print(f"encoded {emb.count} passages x {emb.dim} on {processes} process(es) in "
          f"{out}/embeddings", flush=True)
  return 0


def console_main() -> None:
  """The console script's entry (pyproject.toml)."""
  sys.exit(main())


if __name__ == "__main__":
  console_main()
