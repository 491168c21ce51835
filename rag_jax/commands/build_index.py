r"""Corpus file -> searchable index in one call.

  python -m rag_jax.commands.build_index --corpus=psgs_w100.tsv --encoder=dpr-ctx_encoder \
      --out=wiki_index [--index=scann|exact] [--batch_size=128] [--dtype=float16] \
      [--target_recall=0.95 --calibration_queries=dev_questions.npy]

Stages (each shows a progress bar, each resumable; see rag_jax/retrieval/pipeline.py): passage
store, passage embeddings (or DPR's published pickles with --dpr_embeddings=... --allow_pickle),
index (with --target_recall, ScaNN's search width tuned against exact search on sample
queries: rag_jax/retrieval/calibrate.py). Search it with
``python -m rag_jax.commands.search --dir=wiki_index ...``. One build at a time per --out: a
second one is refused naming the first (the lock file .OUT.lock beside OUT; one left by a killed
build is taken over, rag_jax/utils/lock.py). The last line printed, --quiet or not, says where
the index went.

On several processes (rag_jax/distributed.py, docs/distributed.md) the store and the embeddings
are built as rag_jax.commands.encode_passages builds them, in place in OUT (every process its
share of the shards), then process 0 alone builds the index and prints.
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
  int_list,
  parse_flags,
  run_command,
  start_processes,
)
from rag_jax.distributed import alone, is_primary, on_primary
from rag_jax.retrieval.calibrate import CalibrationSpec, describe, load_queries
from rag_jax.retrieval.corpus import FORMATS, check_corpus
from rag_jax.retrieval.encode import SHARE_TIMEOUT_S
from rag_jax.retrieval.exact import ExactConfig
from rag_jax.retrieval.pipeline import build_from_corpus, encode_corpus
from rag_jax.retrieval.scann_index import ScannConfig
from rag_jax.utils.errors import UsageError, os_errors_under
from rag_jax.utils.lock import output_lock

FLAGS = flags.FlagValues()
_F = {"flag_values": FLAGS}
flags.DEFINE_string("corpus", None, "psgs_w100.tsv, title<TAB>text TSV or JSONL.", required=True,
                    **_F)
flags.DEFINE_string("out", None, "Output directory (passages, embeddings, index).",
                    required=True, **_F)
flags.DEFINE_enum("format", "auto", ["auto", *FORMATS], "Corpus format.", **_F)
flags.DEFINE_integer("split_words", 100, "Words per passage for own corpora (0: no split); DPR "
                     "files are never split.", lower_bound=0, **_F)
flags.DEFINE_string("encoder", None, "DPRContextEncoder directory (Hugging Face format).", **_F)
flags.DEFINE_string("tokenizer", None, "Tokenizer directory (default: --encoder).", **_F)
flags.DEFINE_list("dpr_embeddings", None, "DPR wikipedia_passages_*.pkl, in corpus order.", **_F)
flags.DEFINE_bool("allow_pickle", False, "Allow unpickling --dpr_embeddings (runs code from the "
                  "files: trusted files only).", **_F)
flags.DEFINE_enum("index", "scann", ["scann", "exact"], "Index kind.", **_F)
define_encode_flags(FLAGS)
flags.DEFINE_integer("num_leaves", None, "ScaNN leaves (default: 2 sqrt(n), see "
                     "rag_jax/retrieval/scann_index.py).", lower_bound=1, **_F)
flags.DEFINE_float("leaves_fraction", ScannConfig.leaves_fraction,
                   "ScaNN: share of leaves searched.", **_F)
flags.DEFINE_integer("reorder", ScannConfig.reorder, "ScaNN: candidates rescored exactly.", **_F)
flags.DEFINE_enum("reorder_dtype", "float32", ["float32", "bfloat16", "int8"],
                  "ScaNN: storage of the rescoring vectors.", **_F)
flags.DEFINE_float("target_recall", None, "ScaNN: tune leaves_to_search and reorder to the "
                   "fastest setting whose mean recall@--calibration_k against exact search "
                   "reaches this (default: keep --leaves_fraction and --reorder).",
                   lower_bound=0.0, upper_bound=1.0, **_F)
flags.DEFINE_string("calibration_queries", None, ".npy of (Q, dim) question embeddings to tune on "
                    "(default: --calibration_size rows of the corpus itself).", **_F)
flags.DEFINE_integer("calibration_size", CalibrationSpec.sample_size,
                     "Corpus rows drawn as stand-in queries without --calibration_queries.",
                     lower_bound=1, **_F)
flags.DEFINE_integer("calibration_k", CalibrationSpec.k, "Recall depth of --target_recall.",
                     lower_bound=1, **_F)
flags.DEFINE_list("calibration_reorders", [], "Reorder sizes --target_recall tries (default: "
                  "1.5, 2, 3 and 4 x k and --reorder; one size fixes it).", **_F)
flags.DEFINE_enum("exact_dtype", "float32", ["float32", "bfloat16"],
                  "Device storage of an exact index.", **_F)
flags.DEFINE_bool("quiet", False, "No progress bars (the last line, where the index went, is "
                  "still printed).", **_F)
define_common_flags(FLAGS)
flags.register_multi_flags_validator(
    ["encoder", "dpr_embeddings"], lambda f: bool(f["encoder"] or f["dpr_embeddings"]),
    "give --encoder (a DPRContextEncoder directory that encodes the passages) or "
    "--dpr_embeddings (DPR's wikipedia_passages_*.pkl files, with --allow_pickle)",
    flag_values=FLAGS)


def main(argv: Sequence[str] | None = None) -> int:
  """Builds the index of argv's flags; returns the exit code (see rag_jax/commands/common.py)."""
  parse_flags(FLAGS, "python -m rag_jax.commands.build_index", __doc__, argv)
  return run_command(_build, FLAGS)


def _calibration() -> CalibrationSpec | None:
  """The --target_recall request; None without it."""
  if FLAGS.target_recall is None:
    if FLAGS.calibration_queries:
      raise UsageError("--calibration_queries needs --target_recall")
    return None
  if FLAGS.index != "scann":
    raise UsageError(f"--target_recall tunes a ScaNN index's search width; --index={FLAGS.index} "
                    "searches every row")
  queries = None
  if FLAGS.calibration_queries:
    queries = load_queries(FLAGS.calibration_queries)
  return CalibrationSpec(target_recall=FLAGS.target_recall, k=FLAGS.calibration_k,
                         queries=queries, sample_size=FLAGS.calibration_size,
                         reorders=int_list(FLAGS.calibration_reorders, "--calibration_reorders"),
                         source=FLAGS.calibration_queries or "")


def _build() -> int:
  calibration = _calibration()  # a bad query file fails before any stage runs
  check_corpus(FLAGS.corpus)  # a bad corpus is refused before even the lock file is written
  out = Path(FLAGS.out)
  if start_processes(FLAGS, "rag_jax.commands.build_index", out / ".logs") > 1:
    # Several processes: the store and the embeddings split between them (in place in OUT),
    # then process 0 alone builds the index from them, as a rerun on one process would.
    if FLAGS.dpr_embeddings:
      raise UsageError("--dpr_embeddings converts files on one process; start build_index as "
                       "one process (docs/distributed.md)")
    with os_errors_under(out):
      encode_corpus(FLAGS.corpus, out, encoder=FLAGS.encoder, tokenizer=FLAGS.tokenizer,
                    fmt=FLAGS.format, split_words=FLAGS.split_words or None,
                    encode_config=encode_config(FLAGS), compute_dtype=FLAGS.compute_dtype,
                    progress=not FLAGS.quiet, lock=output_lock)
    built = []

    def index_stage() -> None:  # process 0 by itself; the others wait (jax's shutdown would
      with alone(), output_lock(out), os_errors_under(out):  # time out on a long index build)
        built.append(_build_locked(calibration))

    on_primary("build_index/index", index_stage, SHARE_TIMEOUT_S)
    if not is_primary():
      return 0
    index = built[0]
  else:
    # One build per --out (a second one is refused, naming the first); an OSError that names
    # no file (a full disk) is said to be under --out.
    with output_lock(out), os_errors_under(out):
      index = _build_locked(calibration)
  found = getattr(index, "calibration", None)
  if found is not None:
    print(describe(found))
  article = "an" if index.kind[:1] in "aeiou" else "a"
  print(f"built {article} {index.kind} index of {index.count} passages x {index.dim} in "
        f"{FLAGS.out}/index", flush=True)
  return 0


def _build_locked(calibration: CalibrationSpec | None):
  return build_from_corpus(
      FLAGS.corpus, FLAGS.out, encoder=FLAGS.encoder, tokenizer=FLAGS.tokenizer,
      fmt=FLAGS.format, split_words=FLAGS.split_words or None, index_type=FLAGS.index,
      encode_config=encode_config(FLAGS),
      compute_dtype=FLAGS.compute_dtype,
      scann_config=ScannConfig(num_leaves=FLAGS.num_leaves,
                               leaves_fraction=FLAGS.leaves_fraction, reorder=FLAGS.reorder,
                               reorder_dtype=FLAGS.reorder_dtype),
      exact_config=ExactConfig(dtype=FLAGS.exact_dtype), calibration=calibration,
      dpr_embeddings=FLAGS.dpr_embeddings, allow_pickle=FLAGS.allow_pickle,
      progress=not FLAGS.quiet)


def console_main() -> None:
  """The console script's entry (pyproject.toml)."""
  sys.exit(main())


if __name__ == "__main__":
  console_main()
