r"""Tune a built ScaNN index's search width to a recall, on real questions.

  python -m rag_jax.commands.tune_index --dir=wiki_index \
      --question_encoder=dpr-question_encoder --questions=nq-dev.qa.csv [--target_recall=0.95] \
      [--k=100] [--sample=1000]

Embeds a sample of the questions with the question encoder, finds their exact top-k over every
stored passage (brute force, streamed), and sets the index's `leaves_to_search` and `reorder` to
the fastest setting whose mean recall@k reaches the target (rag_jax/retrieval/calibrate.py). Only
DIR/index/index.json is rewritten (atomically); the ScaNN files stay, so a 21M-passage index is
re-tuned in minutes, never rebuilt. --questions: one question per line, or DPR's `*.qa.csv`
(question<TAB>answers; the questions are read). An index too small for ScaNN to partition
(ScannConfig.brute_force_below rows) is scored exactly, every passage for every question: it has
nothing to tune, and is refused before any question is embedded.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import flags
from tqdm import tqdm

from rag_jax.commands.common import (
  define_common_flags,
  int_list,
  parse_flags,
  run_command,
  start_processes,
)
from rag_jax.data.tasks import read_dpr_qa_csv
from rag_jax.retrieval.calibrate import CalibrationSpec, describe
from rag_jax.retrieval.retriever import Retriever
from rag_jax.retrieval.scann_index import ScannIndex
from rag_jax.utils.errors import InputError, InputNotFoundError

FLAGS = flags.FlagValues()
_F = {"flag_values": FLAGS}
flags.DEFINE_string("dir", None, "Directory written by build_index.", required=True, **_F)
flags.DEFINE_string("question_encoder", None, "DPRQuestionEncoder directory.", required=True, **_F)
flags.DEFINE_string("tokenizer", None, "Tokenizer directory (default: --question_encoder).", **_F)
flags.DEFINE_string("questions", None, "Questions: one per line, or DPR's *.qa.csv.",
                    required=True, **_F)
flags.DEFINE_float("target_recall", 0.95, "Mean recall@k to reach against exact search.",
                   lower_bound=0.0, upper_bound=1.0, **_F)
flags.DEFINE_integer("k", CalibrationSpec.k, "Recall depth.", lower_bound=1, **_F)
flags.DEFINE_integer("sample", CalibrationSpec.sample_size, "Questions drawn (uniformly, seed 0) "
                     "from --questions; all of them if fewer.", lower_bound=1, **_F)
flags.DEFINE_list("reorders", [], "Reorder sizes tried (default: 1.5, 2, 3 and 4 x k and the "
                  "index's own; one size fixes it).", **_F)
flags.DEFINE_integer("batch_size", 256, "Questions per encoder call.", lower_bound=1, **_F)
flags.DEFINE_bool("quiet", False, "No progress bars.", **_F)
define_common_flags(FLAGS)


def read_questions(path: str) -> list[str]:
  """The questions of DPR's `*.csv` question files (rag_jax.data.tasks.read_dpr_qa_csv: csv
  quoting, a malformed row named by file and line) or of a text file, one a line (blank lines
  skipped)."""
  if not Path(path).is_file():
    raise InputNotFoundError(f"{path}: no such questions file")
  if path.endswith(".csv"):
    return [example.source for example in read_dpr_qa_csv(path)]
  try:
    text = Path(path).read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise InputError(f"{path}: not UTF-8 text ({e})") from None
  questions = [line.strip() for line in text.splitlines() if line.strip()]
  if not questions:
    raise InputError(f"{path}: no questions in the file")
  return questions


def embed_questions(retriever: Retriever, questions: list[str], batch_size: int,
                    progress: bool) -> np.ndarray:
  """q(x) [Q, D] float32 of `questions`, in batches of `batch_size`."""
  out = []
  with tqdm(total=len(questions), disable=not progress, unit=" questions",
            desc="embedding questions") as bar:
    for s in range(0, len(questions), batch_size):
      batch = questions[s:s + batch_size]
      out.append(retriever.embed(*retriever.tokenize(batch)))
      bar.update(len(batch))
  return np.concatenate(out)


def main(argv: Sequence[str] | None = None) -> int:
  """Tunes the index of argv's flags; returns the exit code (see rag_jax/commands/common.py)."""
  parse_flags(FLAGS, "python -m rag_jax.commands.tune_index", __doc__, argv)
  return run_command(_tune, FLAGS)


def _tune() -> int:
  start_processes(FLAGS, "rag_jax.commands.tune_index", why_one=(
      "tuning measures one index on one machine; a process's block index takes the tuned "
      "settings, its tree scaled to the block"))
  reorders = int_list(FLAGS.reorders, "--reorders")  # a typo refused before any slow work
  questions = read_questions(FLAGS.questions)
  retriever = Retriever.load(FLAGS.dir, FLAGS.question_encoder, FLAGS.tokenizer)
  index = retriever.index
  where = Path(FLAGS.dir) / "index"
  if not isinstance(index, ScannIndex):
    article = "an" if index.kind[:1] in "aeiou" else "a"
    raise InputError(f"{where} is {article} {index.kind} index; only a ScaNN index has a search "
                     "width to tune")
  if not index.uses_tree:  # ScaNN scores every row of a small index: recall 1 at any setting
    raise InputError(
        f"{where} holds {index.count} passages, under the {index.config.brute_force_below} from "
        "which ScaNN partitions an index: it scores every passage exactly (recall 1.0 against "
        "exact search), so it has no search width to tune; nothing was changed")
  if FLAGS.k > index.count:
    raise InputError(f"--k={FLAGS.k}: more than the {index.count} passages of {where}")
  if len(questions) > FLAGS.sample:
    rows = np.sort(np.random.default_rng(0).choice(len(questions), FLAGS.sample, replace=False))
    questions = [questions[i] for i in rows]
  queries = embed_questions(retriever, questions, FLAGS.batch_size, not FLAGS.quiet)
  before = f"{index.config.leaves_to_search} leaves, reorder {index.config.reorder}"
  found = index.calibrate(queries, FLAGS.target_recall, FLAGS.k, reorders=reorders,
                          progress=not FLAGS.quiet)
  index.save_settings(Path(FLAGS.dir) / "index")
  print(f"{describe(found, 'questions')}; was {before}")
  recalls = {(w, r): x for w, r, x in found.tried}
  for width, reorder, qps in found.timed:
    print(f"  {width:>6} leaves, reorder {reorder:>5}: recall@{found.k} "
          f"{recalls[(width, reorder)]:.4f}, {qps:,.0f} questions/s")
  return 0


def console_main() -> None:
  """The console script's entry (pyproject.toml)."""
  sys.exit(main())


if __name__ == "__main__":
  console_main()
