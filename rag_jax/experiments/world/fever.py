"""The FEVER-like column of the paper in miniature (configs/world_paper.py, `config.fever`).

Lewis et al. (2020) fine-tune RAG on FEVER's claim -> class pairs, each class mapped to one
output token, and report 3-way label accuracy for the same six retriever x model rows as NQ
(Table 6), where BM25 comes first. Here, per world of `config.fever.worlds`, after the world's
QA phases (rag_jax.experiments.world.paper), in workdir/<world>/fever/:

  fever_claims      claims about the world from its seed (rag_jax.experiments.world.claims) in
                    data/; the world tokenizer with the three label words added as one token each
                    (generator_tokenizer); rag_init: the DPR question encoder (the QA rows', with
                    the world tokenizer) and a fresh BART over that vocabulary, as one checkpoint
  fever_<row>       the six rows fine-tuned on claims -> label word with the QA rows' trainer
                    paths (rag_jax.experiments.world.rows.retriever_overrides): same steps,
                    batch and seed for all six (`config.fever.num_train_steps`)
  fever_evaluation  held-out label accuracy (greedy decoding, exact match of the label word),
                    per class, and the retrieval recall@k of the passage deciding each SUPPORTS /
                    REFUTES claim

The QA rows, their tokenizer and their checkpoints are untouched: the label words exist only in
the FEVER generator's tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from rag_jax.evaluation.loop import EvalExample
from rag_jax.experiments.world import claims as world_claims
from rag_jax.experiments.world import evaluation as world_eval
from rag_jax.experiments.world import job as world_job
from rag_jax.experiments.world.data import WorldConfig, generate_world
from rag_jax.experiments.world.phases import Phase
from rag_jax.experiments.world.rows import (
    MODELS,
    RETRIEVERS,
    ROW_NAMES,
    index_dir,
    retriever_overrides,
    row_name,
)

# The paper's FEVER-3 label accuracy (Table 6, dev). Classification makes RAG-Sequence and
# RAG-Token the same model there, so the paper gives one figure per retriever.
PAPER_TABLE6_FEVER3 = {"bm25": 75.1, "frozen": 72.9, "learned": 74.5}
RECALL_KS = (1, 5)


def fever_dir(workdir: Path) -> Path:
  return workdir / "fever"


def add_label_tokens(tokenizer: Any) -> Any:
  """`tokenizer` with each label word (claims.LABEL_WORDS) added as one token (ids appended after
  the world's, which keep theirs); raises if a label does not encode to exactly one token."""
  tokenizer.add_tokens(list(world_claims.LABEL_WORDS.values()))
  for word in world_claims.LABEL_WORDS.values():
    ids = tokenizer(word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1 or tokenizer.decode(ids).strip() != word:
      raise ValueError(f"label {word!r} encodes to {ids} with the generator tokenizer, not one "
                       "token")
  return tokenizer


def phase_claims(job: world_job.Job) -> dict[str, Any]:
  """Claims, the label tokenizer, the FEVER rows' initial checkpoint and their token lengths."""
  out = fever_dir(job.workdir)
  world = generate_world(WorldConfig(**job.config.world.to_dict()))
  train, heldout = world_claims.generate_claims(world)
  world_claims.write_claims(world, train, heldout, out / "data")
  q_tok = job.tokenizer()
  g_tok = add_label_tokens(job.tokenizer())
  g_tok.save_pretrained(str(out / "generator_tokenizer"))
  world_job.init_rag_checkpoint(job, out / "rag_init", generator_tokenizer=g_tok)
  texts = [c.claim for c in train + heldout]
  passages = [(p[1], p[2]) for p in world.passages]
  passage_part = max(len(ids) for ids in g_tok([f"{t} / {x} //" for t, x in passages],
                                               add_special_tokens=False)["input_ids"])
  claim_part = max(len(ids) for ids in g_tok(texts, add_special_tokens=False)["input_ids"])
  lengths = {"claim": max(len(ids) for ids in q_tok(texts)["input_ids"]),
             "label": max(len(g_tok(w)["input_ids"])
                          for w in world_claims.LABEL_WORDS.values()),
             "combined": passage_part + claim_part + 2}
  meta = json.loads((out / "data" / "claims.json").read_text())
  return {"train_counts": meta["train_counts"], "heldout_counts": meta["heldout_counts"],
          "label_token_ids": {w: g_tok.convert_tokens_to_ids(w)
                              for w in world_claims.LABEL_WORDS.values()},
          "vocab_size": len(g_tok), "lengths": lengths}


def row_phase(fever_cfg: Any, retriever: str, model: str) -> Callable[[world_job.Job], Any]:
  """Trains one FEVER row: claims -> label word, from fever/rag_init, with the row's retriever."""
  def run(job: world_job.Job) -> dict[str, Any]:
    lengths = job.phases.result("fever_claims")["lengths"]
    prepend = int(job.config.rag.prepend_decoder_start)
    steps = fever_cfg.num_train_steps
    return world_job.train_rag_row(
        job, model, f"fever/{row_name(retriever, model)}",
        rag_checkpoint=str(fever_dir(job.workdir) / "rag_init"),
        data_dir=str(fever_dir(job.workdir) / "data"), max_source_length=lengths["claim"],
        max_target_length=lengths["label"] + prepend, max_combined_length=lengths["combined"],
        num_train_steps=steps, warmup_steps=max(steps // 10, 1), checkpoint_every=steps,
        **retriever_overrides(job.workdir, retriever))
  return run


@dataclasses.dataclass(frozen=True)
class FeverRow:
  """One row's held-out label accuracy (overall and per class), the deciding passage's recall@k
  (the supports / refutes claims), how often each label word was predicted, and the decoder."""

  row: str
  retriever: str
  accuracy: float
  per_class: dict[str, float]
  recall: dict[str, float]
  predicted_labels: dict[str, int]
  decoder: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class FeverEvaluation:
  """The FEVER-like column of one world: the held-out claims and every row's figures."""

  heldout_claims: int
  counts: dict[str, int]
  majority_accuracy: float
  rows: dict[str, FeverRow]

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> FeverEvaluation:
    return cls(**{**d, "rows": {k: FeverRow(**v) for k, v in d["rows"].items()}})


def phase_evaluation(job: world_job.Job, fever_cfg: Any) -> dict[str, Any]:
  """Held-out label accuracy of every row, per class, and the deciding passage's recall@k: each
  row scored by the world experiments' row evaluator (rag_jax.experiments.world.evaluation),
  its answers in fever/<row>/heldout_predictions.jsonl."""
  data = fever_dir(job.workdir) / "data"
  lines = lambda name: (data / name).read_text().splitlines()  # noqa: E731
  meta = json.loads((data / "claims.json").read_text())
  examples = tuple(EvalExample(c, (label,), gold_ids=(pid,) if pid else ())
                   for c, label, pid in zip(lines("val.source"), lines("val.target"),
                                            meta["heldout_gold_passages"], strict=True))
  classes = meta["heldout_labels"]
  rows = {}
  for retriever in RETRIEVERS:
    for model in MODELS:
      name = row_name(retriever, model)
      run = dataclasses.replace(
          world_eval.heldout_run(job.workdir, f"fever/{name}", job.config.eval),
          model_type=model, index_dir=str(index_dir(job.workdir, retriever)), examples=examples,
          generate={"num_beams": 1, "max_length": fever_cfg.max_label_tokens},
          recall_ks=RECALL_KS)
      scores, records = world_eval.evaluate_row(
          run, fever_dir(job.workdir) / name / "heldout_predictions.jsonl")
      predicted = [world_eval.normalize(r["prediction"]) for r in records]
      rows[name] = FeverRow(
          row=ROW_NAMES[(retriever, model)], retriever=retriever, accuracy=scores.em,
          per_class={c: float(np.mean([r["correct"] for r, k in zip(records, classes, strict=True)
                                       if k == c])) for c in world_claims.CLASSES},
          recall=scores.recall,
          predicted_labels={w: predicted.count(w) for w in world_claims.LABEL_WORDS.values()},
          decoder=scores.decoder)
  counts = meta["heldout_counts"]
  return dataclasses.asdict(FeverEvaluation(
      heldout_claims=len(examples), counts=counts,
      majority_accuracy=max(counts.values()) / len(examples), rows=rows))


def phases(fever_cfg: Any) -> list[Phase]:
  """The FEVER-like phases of one world, in order (see the module docstring)."""
  return [Phase("fever_claims", phase_claims),
          *(Phase(f"fever_{row_name(r, m)}", row_phase(fever_cfg, r, m))
            for r in RETRIEVERS for m in MODELS),
          Phase("fever_evaluation", lambda job: phase_evaluation(job, fever_cfg))]


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def markdown(ev: FeverEvaluation, steps: int) -> list[str]:
  """The FEVER-like table of one world (report.md lines)."""
  c = ev.counts
  parts = [f"FEVER-like (held-out label accuracy, %; {ev.heldout_claims} held-out claims: "
           f"{c['SUPPORTS']} supports / {c['REFUTES']} refutes / {c['NOT ENOUGH INFO']} not "
           f"enough info, majority {_pct(ev.majority_accuracy)}; {steps} steps per row; "
           "paper: FEVER-3 dev label accuracy, one figure per retriever)", "",
           "| row | accuracy here | supports | refutes | not enough info | recall@1 | "
           "recall@5 | paper FEVER-3 |", "|---|---|---|---|---|---|---|---|"]
  for row in ev.rows.values():
    pc, rec = row.per_class, row.recall
    parts.append(f"| {row.row} | {_pct(row.accuracy)} | {_pct(pc['SUPPORTS'])} | "
                 f"{_pct(pc['REFUTES'])} | {_pct(pc['NOT ENOUGH INFO'])} | "
                 f"{_pct(rec['recall@1'])} | {_pct(rec['recall@5'])} | "
                 f"{PAPER_TABLE6_FEVER3[row.retriever]} |")
  return parts + ["", "(recall@k: the passage stating the claim's fact among the row's first k "
                  "for the held-out supports / refutes claims)", ""]
