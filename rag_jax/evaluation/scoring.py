"""Scores from written predictions: the paper's metrics by name and the retrieval figures.

Everything here reads records as rag_jax.evaluation.loop writes them to predictions.jsonl
(`prediction`, `answers`, `titles`, `passage_ids`, `doc_scores`, ...), so a metric can always be
recomputed from the file alone. The functions are rag_jax.metrics'; this module only picks them
per task and per record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from rag_jax import metrics
from rag_jax.evaluation.loop import CorrectFn
from rag_jax.utils.errors import InputError

Records = Sequence[dict[str, Any]]


def _answers(records: Records) -> list[list[str]]:
  """Every record's `answers` list (a str would be read letter by letter: refused)."""
  for i, r in enumerate(records):
    if isinstance(r["answers"], str):
      raise InputError(f"prediction record {i}: answers is a str ({r['answers'][:40]!r}), not a "
                       "list of references")
  return [list(r["answers"]) for r in records]


def _predictions(records: Records) -> list[str]:
  return [r["prediction"] for r in records]


# Metric name -> (records -> value in [0, 1]). `answers` holds every reference of a question.
METRICS: dict[str, Callable[[Records], float]] = {
    "exact_match": lambda rs: metrics.exact_match(_predictions(rs), _answers(rs)),
    "token_f1": lambda rs: metrics.token_f1(_predictions(rs), _answers(rs)),
    # CuratedTrec: a prediction is right when a gold regex matches it from its start, after NFD
    # (DrQA's scripts/pipeline/eval.py --regex; the paper does not name its rule).
    "regex_match": lambda rs: metrics.regex_exact_match(_predictions(rs), _answers(rs),
                                                        anchored=True),
    # MS-MARCO: as ms_marco_eval.py (lower-cased tokens, punctuation kept; ROUGE-L beta 1.2).
    "bleu1": lambda rs: metrics.bleu1(_predictions(rs), _answers(rs)),
    "rouge_l": lambda rs: metrics.rouge_l(_predictions(rs), _answers(rs)),
    # Jeopardy: as the Q-BLEU script, against one reference question (the first).
    "qbleu1": lambda rs: metrics.qbleu1(_predictions(rs), [a[0] for a in _answers(rs)]),
    "qgen_bleu1": lambda rs: metrics.qgen_bleu1(_predictions(rs), [a[0] for a in _answers(rs)]),
    "label_accuracy": lambda rs: metrics.label_accuracy(_predictions(rs),
                                                        [_first(a) for a in _answers(rs)]),
    "distinct_trigrams": lambda rs: metrics.distinct_trigram_ratio(_predictions(rs)),
}

# Metric name -> the per-question verdict written as `correct` in predictions.jsonl.
CORRECT: dict[str, CorrectFn] = {
    "exact_match": lambda p, e: metrics.exact_match([p], [e.answers]) == 1,
    "regex_match": lambda p, e: metrics.regex_exact_match([p], [e.answers], anchored=True) == 1,
    "label_accuracy": lambda p, e: metrics.label_accuracy([p], [_first(e.answers)]) == 1,
}


def _first(answers: Sequence[str]) -> str:
  """The first reference (a str would give its first letter: refused)."""
  if isinstance(answers, str):
    raise InputError(f"answers is a str ({answers[:40]!r}), not a list of references")
  return answers[0]


def correct_fn(metric_names: Iterable[str]) -> CorrectFn | None:
  """The verdict of the first metric that has one (None for generation tasks)."""
  for name in metric_names:
    if name in CORRECT:
      return CORRECT[name]
  return None


def check_metric_names(names: Iterable[str]) -> None:
  unknown = sorted(set(names) - set(METRICS))
  if unknown:
    raise InputError(f"unknown metrics {unknown}; expected some of {sorted(METRICS)}")


def answer_metrics(records: Records, names: Sequence[str]) -> dict[str, float]:
  """The named metrics of the predictions, plus the document-prior diagnostics."""
  check_metric_names(names)
  out = {name: METRICS[name](records) for name in names}
  out.update(metrics.doc_score_diagnostics(np.asarray([r["doc_scores"] for r in records])))
  return out


def retrieval_metrics(records: Records, ks: Sequence[int]) -> dict[str, float]:
  """Retrieval figures of the written passages at every k in ks (k beyond the passages written
  per question is left out):

  recall@k: share of questions with a gold passage id among the top k when the records carry
    gold ids (the synthetic world), else DPR's top-k accuracy from the per-passage `has_answer`
    flags written with the passages (an answer string, or a CuratedTrec regex, in the text);
  precision@k: transformers' eval_rag.py precision over titles, when the records have gold titles.
  """
  written = min(len(r["passage_ids"]) for r in records)
  ks = [k for k in ks if k <= written]
  out: dict[str, float] = {}
  if all(r.get("gold_ids") for r in records):
    recall = metrics.id_recall_at_k([r["passage_ids"] for r in records],
                                    [r["gold_ids"] for r in records], ks)
  else:
    recall = metrics.recall_from_hits([r["has_answer"] for r in records], ks)
  out.update({f"recall@{k}": v for k, v in recall.items()})
  if all(r.get("gold_titles") for r in records):
    titles = [[metrics.strip_title(t) for t in r["titles"]] for r in records]
    gold = [r["gold_titles"] for r in records]
    out.update({f"precision@{k}": metrics.precision_at_k(titles, gold, k) for k in ks})
  return out
