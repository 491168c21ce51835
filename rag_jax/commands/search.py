r"""Type questions, get the top passages with titles and scores.

  python -m rag_jax.commands.search --dir=wiki_index --question_encoder=dpr-question_encoder \
      [--k=5] "who wrote hamlet" "..."          # or questions on stdin, one per line

On several processes (an index too big for one host; docs/distributed.md), each process indexes
its block of an exact or ScaNN index's rows (rag_jax/retrieval/merged.py) and every search is
collective: process 0 reads the questions (argv, or its stdin) and sends each batch to the
others, every process searches its block, the top-k lists are merged, and process 0 alone
prints; over an exact index, what one process prints. Processes 1.. log to RAG_JAX_LOG_DIR (the
launcher's --log_dir), else ./launch_logs: the index directory may be read-only.
"""

from __future__ import annotations

import logging
import sys
import textwrap
from collections.abc import Sequence

from absl import flags

from rag_jax.answer import check_within_index
from rag_jax.commands.common import (
  LAUNCH_LOG_DIR,
  ask,
  define_common_flags,
  parse_flags,
  printable,
  printable_paragraph,
  run_command,
  start_processes,
)
from rag_jax.retrieval.retriever import Hit, Retriever

log = logging.getLogger(__name__)

FLAGS = flags.FlagValues()
flags.DEFINE_string("dir", None, "Directory written by build_index.", flag_values=FLAGS,
                    required=True)
flags.DEFINE_string("question_encoder", None, "DPRQuestionEncoder directory.", flag_values=FLAGS,
                    required=True)
flags.DEFINE_string("tokenizer", None, "Tokenizer directory (default: --question_encoder).",
                    flag_values=FLAGS)
flags.DEFINE_integer("k", 5, "Passages per question.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("max_chars", 300, "Truncate printed passages.", lower_bound=1,
                     flag_values=FLAGS)
define_common_flags(FLAGS)


def format_hits(question: str, hits: Sequence[Hit], max_chars: int) -> str:
  """The question and its passages as the console shows them: one line per passage (rank, doc
  score, title, id, row), then its text shortened to `max_chars` and wrapped. Control
  characters of the corpus are escaped (rag_jax.commands.common.printable)."""
  lines = [f"Q: {printable(question)}"]
  for rank, h in enumerate(hits, 1):
    text = textwrap.shorten(h.text, max_chars, placeholder=" ...") if h.text else ""
    lines.append(f"  {rank:>2}. [{h.score:9.4f}] {printable(h.title)} (id {printable(h.id)}, "
                 f"row {h.row})")
    lines.append(textwrap.indent(textwrap.fill(printable_paragraph(text), 96), "      "))
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None, stdin=None, stdout=None) -> int:
  """Searches for the questions of `argv` (or of stdin, one a line); returns the exit code."""
  questions = parse_flags(FLAGS, "python -m rag_jax.commands.search", __doc__, argv)
  return run_command(lambda: _search(questions, stdin or sys.stdin, stdout or sys.stdout), FLAGS)


def _search(questions: list[str], stdin, stdout) -> int:
  start_processes(FLAGS, "rag_jax.commands.search", LAUNCH_LOG_DIR)
  check_within_index("--k", FLAGS.k, FLAGS.dir)
  retriever = Retriever.load(FLAGS.dir, FLAGS.question_encoder, FLAGS.tokenizer, merged=True)

  def search(batch: list[str]) -> str:
    for line in retriever.check(batch).unknown_warnings():
      log.warning("%s", line)
    return "\n".join(format_hits(q, hits, FLAGS.max_chars) for q, hits in
                     zip(batch, retriever.retrieve(batch, FLAGS.k), strict=True))

  return ask(questions, search, stdin, stdout)


def console_main() -> None:
  """The console script's entry (pyproject.toml)."""
  sys.exit(main())


if __name__ == "__main__":
  console_main()
