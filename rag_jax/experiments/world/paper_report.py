"""The paper in miniature's results, typed, and its report.md: every table beside the paper's
numbers (rag_jax.experiments.world.paper computes them).

Each world's evaluation phase records a :class:`WorldEvaluation` (as JSON, in its phases.json);
report.json holds one :class:`WorldReport` per world, and :func:`markdown` renders them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rag_jax.experiments.world.evaluation import RowScores
from rag_jax.experiments.world.fever import FeverEvaluation
from rag_jax.experiments.world.fever import markdown as fever_markdown

# The paper's NQ dev EM of each row (Table 6) and NQ test EM (Table 1).
PAPER_TABLE6_NQ = {"RAG-Token-BM25": 29.7, "RAG-Sequence-BM25": 31.8, "RAG-Token-Frozen": 37.8,
                   "RAG-Sequence-Frozen": 41.2, "RAG-Token": 43.5, "RAG-Sequence": 44.0}
PAPER_TABLE1_NQ = {"RAG-Token": 44.1, "RAG-Sequence": 44.5}
# Paper section 4.5, hot-swapping: % of answers matching the 2016 / 2018 world leaders with the
# 2016 index (world 1's here) and with the 2018 index (world 2's).
PAPER_HOT_SWAP = {"world-1": (70, 4), "world-2": (12, 68)}
RECALL_KS = (1, 5, 20)  # Table 6's recall columns.
MODEL_LABELS = {"rag_sequence": "RAG-Sequence", "rag_token": "RAG-Token"}


@dataclasses.dataclass(frozen=True)
class PaperRow:
  """One Table-6 row: the paper's name for it (e.g. RAG-Sequence-BM25) and its scores."""

  row: str
  scores: RowScores

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> PaperRow:
    return cls(d["row"], RowScores.from_dict(d["scores"]))


@dataclasses.dataclass(frozen=True)
class Figure3:
  """Docs at test time: EM and recall@K of each learned row (model -> one value per K of
  `docs`), on the first `questions` held-out questions."""

  questions: int
  docs: list[int]
  em: dict[str, list[float]]
  recall: dict[str, list[float]]


@dataclasses.dataclass(frozen=True)
class Figure2Panel:
  """RAG-Token on one held-out question: posterior [passages, generated tokens] over its
  retrieved passages (titles) per generated token."""

  question: str
  gold: str
  generated: str
  titles: list[str]
  tokens: list[str]
  posterior: list[list[float]]


@dataclasses.dataclass(frozen=True)
class WorldEvaluation:
  """Every figure of one world's evaluation phase (rows keyed by their directory name)."""

  heldout_questions: int
  changed_facts: int
  majority_em: float
  rows: dict[str, PaperRow]
  figure3: Figure3
  figure2: list[Figure2Panel] | None = None

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> WorldEvaluation:
    panels = d.get("figure2")
    return cls(**{**d, "rows": {k: PaperRow.from_dict(v) for k, v in d["rows"].items()},
                  "figure3": Figure3(**d["figure3"]),
                  "figure2": None if panels is None else [Figure2Panel(**p) for p in panels]})


@dataclasses.dataclass(frozen=True)
class WorldReport:
  """One world of report.json: its evaluation, the closed book's held-out EM, the RAG rows'
  steps and batch, the wall time of each phase, the closed book trainer's own report, and the
  FEVER-like column where the world has it."""

  evaluation: WorldEvaluation
  closed_book_em: float
  steps: int
  batch_size: int
  phase_seconds: dict[str, float]
  closed_book_report: dict[str, Any]
  fever: FeverEvaluation | None = None
  fever_steps: int | None = None

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> WorldReport:
    fever = d.get("fever")
    return cls(**{**d, "evaluation": WorldEvaluation.from_dict(d["evaluation"]),
                  "fever": None if fever is None else FeverEvaluation.from_dict(fever)})


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def markdown(worlds: dict[str, WorldReport]) -> str:
  """The report: every table beside the paper's numbers."""
  parts = ["# The paper in miniature (synthetic worlds)", ""]
  for world, r in worlds.items():
    ev = r.evaluation
    learned = {m: ev.rows[f"{m}_learned"].scores.em for m in MODEL_LABELS}
    parts += [f"## {world} world ({ev.heldout_questions} held-out questions, "
              f"{r.steps} RAG steps per row, batch {r.batch_size})", "",
              "Table 1 (held-out EM, %; paper: NQ test EM)", "",
              "| model | EM here | paper NQ |", "|---|---|---|",
              f"| closed-book BART | {_pct(r.closed_book_em)} (majority answer "
              f"{_pct(ev.majority_em)}) | (T5-11B closed book 34.5) |",
              *(f"| {label} | {_pct(learned[m])} | {PAPER_TABLE1_NQ[label]} |"
                for m, label in reversed(MODEL_LABELS.items())), "",
              "Table 6 (held-out EM and recall@k, %; paper: NQ dev EM)", "",
              "| row | EM here | " + " | ".join(f"recall@{k}" for k in RECALL_KS)
              + " | paper NQ EM |", "|---|---|" + "---|" * len(RECALL_KS) + "---|"]
    for row in ev.rows.values():
      s = row.scores
      parts.append(f"| {row.row} | {_pct(s.em)} | "
                   + " | ".join(_pct(s.recall[f"recall@{k}"]) for k in RECALL_KS)
                   + f" | {PAPER_TABLE6_NQ[row.row]} |")
    parts.append("")
    if r.fever is not None:
      parts += fever_markdown(r.fever, r.fever_steps)
    parts += [f"Hot-swap 2x2 ({ev.changed_facts} changed held-out facts; % of answers "
              "matching each world's facts; paper: 2016/2018 world leaders)", "",
              "| row | index | world-1 facts | world-2 facts | paper (2016 / 2018 leaders) |",
              "|---|---|---|---|---|"]
    for row in ev.rows.values():
      hs = row.scores.hot_swap
      for index, (old, new) in (("world-1", (hs.old_index_gave_old_answer,
                                             hs.old_index_gave_new_answer)),
                                ("world-2", (hs.keep_old_answer, hs.follow_new_index))):
        paper = PAPER_HOT_SWAP[index]
        parts.append(f"| {row.row} | {index} | {_pct(hs.share(old))} | {_pct(hs.share(new))} | "
                     f"{paper[0]} / {paper[1]} |")
    f3 = ev.figure3
    parts += ["", f"Figure 3 (learned rows, first {f3.questions} held-out questions; "
              f"figure3_{world}.png)", "",
              "| K | " + " | ".join(str(d) for d in f3.docs) + " |",
              "|---|" + "---|" * len(f3.docs)]
    for model, label in MODEL_LABELS.items():
      parts.append(f"| {label} EM | " + " | ".join(_pct(x) for x in f3.em[model]) + " |")
      parts.append(f"| {label} recall@K | " + " | ".join(_pct(x) for x in f3.recall[model])
                   + " |")
    parts += ["", "Phase seconds: " + ", ".join(f"{k} {v:.0f}"
                                                for k, v in r.phase_seconds.items()), ""]
  return "\n".join(parts) + "\n"
