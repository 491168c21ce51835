r"""Questions -> answers with the passages they came from (RAG end to end).

    python -m rag_jax.commands.answer --checkpoint=runs/rag/export --index_dir=kb "who wrote X"
    python -m rag_jax.commands.answer --checkpoint=... --index_dir=... < questions.txt  # one a line

The checkpoint's kind decides the decoder (RagTokenForGeneration: RAG-Token;
RagSequenceForGeneration: RAG-Sequence thorough, or fast with --decoding=fast); see
rag_jax/answer.py.

On several processes, retrieval is the search command's (one block of an exact or ScaNN index
per process, each search collective, process 0 reading the questions and sending each batch to
the others), and every process then generates on the same inputs, the merged passages, while
process 0 alone prints: decoding is deterministic, so this is what one process prints over an
exact index, with no second exchange (the others would only wait for the next batch anyway).
Processes 1.. log to RAG_JAX_LOG_DIR (the launcher's --log_dir), else ./launch_logs.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence

import jax.numpy as jnp
from absl import flags

from rag_jax.answer import Answer, RagAnswerer, check_within_index, format_answer
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
from rag_jax.utils.errors import UsageError

log = logging.getLogger(__name__)

FLAGS = flags.FlagValues()
flags.DEFINE_string("checkpoint", None, "RAG checkpoint directory with its tokenizers.",
                    flag_values=FLAGS, required=True)
flags.DEFINE_string("index_dir", None, "Directory written by build_index.", flag_values=FLAGS,
                    required=True)
flags.DEFINE_integer("n_docs", None, "Passages per question (default: the checkpoint's).",
                     lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("num_beams", 4, "Beam width (1: greedy).", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("max_length", 50, "Longest answer in tokens.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("num_return_sequences", 1, "Answers per question.", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_enum("decoding", "thorough", ["thorough", "fast"],
                  "RAG-Sequence decoding (RAG-Token has one).", flag_values=FLAGS)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                  "Compute dtype (bfloat16 on accelerators).", flag_values=FLAGS)
flags.DEFINE_integer("max_chars", 300, "Truncate printed passages.", lower_bound=1,
                     flag_values=FLAGS)
define_common_flags(FLAGS)


def printable_answer(answer: Answer) -> Answer:
  """`answer` as the console shows it: its question, answers, titles and ids through
  rag_jax.commands.common.printable, its passage texts through printable_paragraph (control
  characters of the corpus or the generator escaped)."""
  return dataclasses.replace(
      answer, question=printable(answer.question), text=printable(answer.text),
      alternatives=tuple((printable(text), score) for text, score in answer.alternatives),
      passages=tuple(dataclasses.replace(hit, title=printable(hit.title), id=printable(hit.id),
                                         text=printable_paragraph(hit.text))
                     for hit in answer.passages))


def main(argv: Sequence[str] | None = None, stdin=None, stdout=None) -> int:
  """Answers the questions of `argv` (or of stdin, one a line); returns the exit code."""
  questions = parse_flags(FLAGS, "python -m rag_jax.commands.answer", __doc__, argv)
  return run_command(lambda: _answer(questions, stdin or sys.stdin, stdout or sys.stdout), FLAGS)


def check_flags() -> None:
  """The flags that cannot work together or with the index, refused before anything loads."""
  if FLAGS.num_return_sequences > FLAGS.num_beams:
    raise UsageError(f"--num_return_sequences={FLAGS.num_return_sequences} is more than "
                     f"--num_beams={FLAGS.num_beams}: beam search returns at most num_beams "
                     "answers per question")
  if FLAGS.n_docs is not None:
    check_within_index("--n_docs", FLAGS.n_docs, FLAGS.index_dir)


def _answer(questions: list[str], stdin, stdout) -> int:
  start_processes(FLAGS, "rag_jax.commands.answer", LAUNCH_LOG_DIR)
  check_flags()
  answerer = RagAnswerer(FLAGS.checkpoint, FLAGS.index_dir, n_docs=FLAGS.n_docs,
                         dtype=jnp.dtype(FLAGS.dtype), merged=True)
  options = dict(num_beams=FLAGS.num_beams, max_length=FLAGS.max_length,
                 num_return_sequences=FLAGS.num_return_sequences, decoding=FLAGS.decoding)

  def answer(batch: list[str]) -> str:
    for line in answerer.retriever.check(batch).unknown_warnings():
      log.warning("%s", line)
    return "\n".join(format_answer(printable_answer(a), FLAGS.max_chars)
                     for a in answerer(batch, **options))

  return ask(questions, answer, stdin, stdout)


def console_main() -> None:
  """The console script's entry (pyproject.toml)."""
  sys.exit(main())


if __name__ == "__main__":
  console_main()
