"""Type questions, get the top passages with titles and scores.

  python -m rag_jax.retrieval.search --dir wiki_index --question_encoder dpr-question_encoder \
      [--k 5] "who wrote hamlet" "..."          # or questions on stdin, one per line
"""

from __future__ import annotations

import argparse
import sys
import textwrap


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m rag_jax.retrieval.search",
                              description=__doc__.split("\n")[0])
  p.add_argument("questions", nargs="*", help="questions (default: read lines from stdin)")
  p.add_argument("--dir", required=True, help="directory written by build_index")
  p.add_argument("--question_encoder", required=True, help="DPRQuestionEncoder directory")
  p.add_argument("--tokenizer", help="tokenizer directory (default: --question_encoder)")
  p.add_argument("--k", type=int, default=5)
  p.add_argument("--max_chars", type=int, default=300, help="truncate printed passages")
  return p.parse_args(argv)


def format_hits(question: str, hits, max_chars: int) -> str:
  lines = [f"Q: {question}"]
  for rank, h in enumerate(hits, 1):
    text = textwrap.shorten(h.text, max_chars, placeholder=" ...") if h.text else ""
    lines.append(f"  {rank:>2}. [{h.score:9.4f}] {h.title} (id {h.id}, row {h.row})")
    lines.append(textwrap.indent(textwrap.fill(text, 96), "      "))
  return "\n".join(lines)


def main(argv: list[str] | None = None, stdin=None, stdout=None) -> int:
  args = parse_args(argv)
  stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
  from rag_jax.retrieval.pipeline import Retriever
  from rag_jax.utils.cli import ask

  retriever = Retriever(args.dir, args.question_encoder, args.tokenizer)

  def search(questions: list[str]) -> str:
    return "\n".join(format_hits(q, hits, args.max_chars) for q, hits in
                     zip(questions, retriever.retrieve(questions, args.k), strict=True))

  return ask(args.questions, search, stdin, stdout)


if __name__ == "__main__":
  sys.exit(main())
