"""The shifted world (configs/world_shift.py): does training the context encoder, and refreshing
the index it encodes, pay when the retriever was trained on another world?

    python train.py --config=configs/world_shift.py --workdir=runs/shift

The world experiments' phase runner (rag_jax.experiments.world.phases) runs, in the workdir:

  world        world A (world/, the default job's) and world B (world_b/: the same facts, ids,
               questions and answers, each passage naming its subject beside other people,
               rag_jax.experiments.world.shift_data)
  tokenizer    one word tokenizer on both worlds' texts (every world-B word has a token)
  retriever    DPR, in-batch negatives, on world A only
  index        both worlds' passages encoded by that context encoder (index_a/, index_b/, exact
               indexes); the retriever's held-out recall@k on each
  rag_world_a  RAG-Sequence on world A over index_a/ (shift.world_a_steps; 0: skipped): the
               generator learns to read passages, as the paper's rows start from a pretrained
               BART
  row_<row>    RAG-Sequence fine-tuned on world B over index_b/ (device retrieval), one row per
               config.shift.rows entry, all with the same steps, batch, seed and start (the
               world-A model, else the fresh one; rag_jax.experiments.world.job.train_rag_row):
               frozen (context encoder and index
               fixed), every_step (context encoder trained, the whole index re-encoded in each
               step: a rolling refresh of every row), rolling, scheduled, rerank, stale (trained,
               never refreshed)
  eval_<row>   held-out EM and recall@k by the world experiments' row evaluator
               (rag_jax.experiments.world.evaluation), answers in <row>/heldout_predictions
               .jsonl. A row that trained its context encoder is evaluated over index_<row>/:
               world B re-encoded by its exported encoder (<row>/export/ctx_encoder), the index
               its final parameters define; the frozen row over index_b/. Every row's question
               encoder is also scored over index_b/ (recall only).

then writes report.json and report.md: per row EM, recall@k on its evaluation index and on
index_b/, steady-state steps/s and its step time over the frozen row's, the mean and largest
staleness (steps since a retrieved row was encoded) of the refreshed rows' training.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from rag_jax.evaluation import runner
from rag_jax.experiments.world import evaluation as world_eval
from rag_jax.experiments.world import job as world_job
from rag_jax.experiments.world.data import WorldConfig, generate_world, swap_facts, write_world
from rag_jax.experiments.world.phases import Phase, PhaseLog, run_phases
from rag_jax.experiments.world.report import machine
from rag_jax.experiments.world.shift_data import shift_world
from rag_jax.retrieval.encode import EncodeConfig
from rag_jax.retrieval.pipeline import build_from_corpus
from rag_jax.retrieval.retriever import Retriever
from rag_jax.training import config_check, loop
from rag_jax.utils.atomic import atomic_file
from rag_jax.utils.lock import workdir_lock
from rag_jax.utils.logs import workdir_logging

log = logging.getLogger(__name__)
TRAINED_ROWS = ("every_step", "rolling", "scheduled", "rerank", "stale")
WORLD_A_ROW = "rag_world_a"  # The RAG model trained on world A that the rows start from.


# --------------------------------------------------------------------------- phases


def world_b_dir(workdir: Path) -> Path:
  return workdir / "world_b"


def row_index_dir(workdir: Path, row: str) -> Path:
  """The index a row is evaluated over (see the module docstring)."""
  return workdir / ("index_b" if row not in TRAINED_ROWS else f"index_{row}")


def phase_world(job: world_job.Job) -> dict[str, Any]:
  """World A as the default job writes it, then world B (and its hot-swap twin) beside it."""
  result = world_job.phase_world(job)
  world = generate_world(WorldConfig(**job.config.world.to_dict()), progress=False)
  swapped, changed = swap_facts(world)
  k = job.config.shift.co_mentions
  world_b = shift_world(world, k)
  write_world(world_b, shift_world(swapped, k), changed, world_b_dir(job.workdir))
  example = next(p for p in world_b.passages if p[3] >= 0)
  return {**result, "co_mentions": k, "example_a": world.passages[int(example[0]) - 1][1:3],
          "example_b": example[1:3]}


def phase_tokenizer(job: world_job.Job) -> dict[str, Any]:
  return world_job.phase_tokenizer(job, (world_b_dir(job.workdir),))


def build_index(job: world_job.Job, corpus: Path, out: Path, encoder: Path) -> int:
  """An exact index of `corpus` encoded by the DPRContextEncoder `encoder` in `out` (the
  pipeline of build_index); returns its passages."""
  index = build_from_corpus(
      corpus, out, encoder=str(encoder), split_words=None, index_type="exact",
      encode_config=EncodeConfig(batch_size=256, max_length=job.lengths()["passage"],
                                 length_bucket=8), progress=False)
  return index.count


def heldout_recall(job: world_job.Job, index: Path) -> dict[str, float]:
  """recall@eval.recall_ks of the retriever's question encoder over `index` (held-out)."""
  cfg = job.config.eval
  questions = (job.world_dir / "val.source").read_text().splitlines()
  retriever = Retriever.load(index, job.workdir / "retriever" / "question_encoder",
                             max_length=world_eval.QUESTION_TOKENS)
  found = world_eval.search_ids(retriever, questions, max(cfg.recall_ks), cfg.batch_size,
                                f"recall ({index.name})")
  return world_eval.recall_at_k(found, job.world_meta()["heldout_gold_passages"], cfg.recall_ks)


def phase_index(job: world_job.Job) -> dict[str, Any]:
  encoder = job.workdir / "retriever" / "context_encoder"
  out = {}
  for world, name in (("world", "index_a"), ("world_b", "index_b")):
    passages = build_index(job, job.workdir / world / "passages.tsv", job.workdir / name, encoder)
    out[name] = {"passages": passages, "recall": heldout_recall(job, job.workdir / name)}
  return out


def phase_rag_world_a(job: world_job.Job) -> dict[str, Any]:
  """RAG-Sequence on world A over index_a/ (the context encoder frozen) for
  shift.world_a_steps: the generator that learned to read world A's passages, from which every
  row starts (as the paper's rows start from a pretrained BART)."""
  workdir = job.workdir
  return world_job.train_rag_row(
      job, "rag_sequence", WORLD_A_ROW, index_dir=str(workdir / "index_a"),
      data_dir=str(job.world_dir), num_train_steps=job.config.shift.world_a_steps)


def row_overrides(job: world_job.Job, row: str) -> dict[str, Any]:
  """config.rag fields of a row (see the module docstring): world B's data and index, the start
  (the world-A RAG model where shift.world_a_steps, else the fresh one), and for a trained
  context encoder its learning rate and refresh."""
  shift, workdir = job.config.shift, job.workdir
  base = {"index_dir": str(workdir / "index_b"), "data_dir": str(world_b_dir(workdir))}
  if shift.world_a_steps:
    base["rag_checkpoint"] = str(workdir / WORLD_A_ROW / "export")
  if row == "frozen":
    return base
  rates = ml_collections.ConfigDict({**job.config.rag.group_learning_rates.to_dict(),
                                     "ctx_encoder": shift.ctx_learning_rate})
  refresh = {
      # rows_per_step = every row of the index: the whole shard re-encoded in each step, with
      # the step's parameters, before its search.
      "every_step": {"index_refresh": "rolling",
                     "refresh_rows_per_step": job.phases.result("index")["index_b"]["passages"]},
      "rolling": {"index_refresh": "rolling",
                  "refresh_rows_per_step": shift.rolling_rows_per_step},
      "scheduled": {"index_refresh": "scheduled", "refresh_schedule": shift.refresh_schedule},
      "rerank": {"index_refresh": "rerank", "rerank_candidates": shift.rerank_candidates},
      "stale": {"index_refresh": "none"},
  }[row]
  # export_index off: the evaluation re-encodes world B itself (evaluate_shift_row).
  return {**base, "train_context_encoder": True, "export_index": False,
          "group_learning_rates": rates, **refresh}


def _row_phase(row: str):
  def run(job: world_job.Job) -> dict[str, Any]:
    return world_job.train_rag_row(job, "rag_sequence", row, **row_overrides(job, row))
  return run


def staleness(metrics_file: Path) -> dict[str, float] | None:
  """Mean (over the metric windows) and largest staleness of a refreshed row's training; None
  where its metrics have none (no refresh)."""
  lines = [json.loads(x) for x in metrics_file.read_text().splitlines() if x]
  found = [x for x in lines if "staleness" in x]
  if not found:
    return None
  return {"mean": float(np.mean([x["staleness"] for x in found])),
          "max": float(max(x["staleness_max"] for x in found))}


def evaluate_shift_row(job: world_job.Job, row: str) -> dict[str, Any]:
  """One row's held-out EM and recall over its evaluation index (row_index_dir, built here for
  a trained context encoder), and its question encoder's recall over index_b/."""
  workdir, cfg = job.workdir, job.config.eval
  index = row_index_dir(workdir, row)
  if row in TRAINED_ROWS:
    build_index(job, world_b_dir(workdir) / "passages.tsv", index,
                workdir / row / "export" / "ctx_encoder")
  run = dataclasses.replace(
      world_eval.heldout_run(workdir, row, cfg, retrieval=job.config.rag.retrieval),
      model_type="rag_sequence", index_dir=str(index))
  scores, _ = world_eval.evaluate_row(run, workdir / row / "heldout_predictions.jsonl")
  stale = runner.load_retriever(dataclasses.replace(run, index_dir=str(workdir / "index_b")))
  gold = [e for e in run.examples if e.gold_ids]
  found = world_eval.search_ids(stale, [e.question for e in gold], max(run.recall_ks),
                                run.batch_size, f"recall over index_b ({row})")
  return {"index": index.name, "em": scores.em, "recall": scores.recall,
          "recall_index_b": world_eval.recall_at_k(found, [e.gold_ids[0] for e in gold],
                                                   run.recall_ks),
          "decoder": scores.decoder}


def _eval_phase(row: str):
  return lambda job: evaluate_shift_row(job, row)


def _train_summary(r: dict[str, Any]) -> str:
  return f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}, {r['steps_per_s']:.2f} steps/s"


def phases(config: ml_collections.ConfigDict) -> list[Phase]:
  out = [Phase("world", phase_world), Phase("tokenizer", phase_tokenizer),
         Phase("retriever", world_job.phase_retriever),
         Phase("index", phase_index,
               lambda r: ", ".join(f"{k}: recall {v['recall']}" for k, v in r.items()))]
  if config.shift.world_a_steps:
    out.append(Phase(WORLD_A_ROW, phase_rag_world_a, _train_summary))
  out += [Phase(f"row_{row}", _row_phase(row), _train_summary) for row in config.shift.rows]
  out += [Phase(f"eval_{row}", _eval_phase(row),
                lambda r: f"EM {r['em']:.3f}, {r['recall']}") for row in config.shift.rows]
  return out


# --------------------------------------------------------------------------- report


def row_label(row: str, shift: Any, passages: int) -> str:
  """What a row trains and refreshes, in words."""
  if row == "rolling":
    oldest = -(-passages // min(shift.rolling_rows_per_step, passages)) - 1
    return (f"rolling refresh, {shift.rolling_rows_per_step} rows/step (rows <= {oldest} steps "
            "old)")
  return {"frozen": "frozen context encoder, index as built",
          "every_step": f"whole index re-encoded every step ({passages} rows)",
          "scheduled": f"full refresh, schedule {shift.refresh_schedule!r}",
          "rerank": f"rerank {shift.rerank_candidates} candidates of the stale index",
          "stale": "trained, index never refreshed"}[row]


def build_report(config: ml_collections.ConfigDict, workdir: Path, phase_log: PhaseLog
                 ) -> dict[str, Any]:
  """The phases' figures in one report (see the module docstring); no recomputation."""
  index = phase_log.result("index")
  passages = index["index_b"]["passages"]
  frozen_speed = phase_log.result("row_frozen")["steps_per_s"]
  rows = {}
  for row in config.shift.rows:
    train, ev = phase_log.result(f"row_{row}"), phase_log.result(f"eval_{row}")
    rows[row] = {
        "label": row_label(row, config.shift, passages),
        "context_encoder": "trained" if row in TRAINED_ROWS else "frozen",
        "heldout_em": ev["em"], "recall": ev["recall"], "evaluated_index": ev["index"],
        "recall_index_b": ev["recall_index_b"], "decoder": ev["decoder"],
        "steps_per_s": train["steps_per_s"],
        "step_time_ratio": frozen_speed / train["steps_per_s"],
        "staleness": staleness(workdir / row / "metrics.jsonl"),
        "train_loss_first": train["loss_first"], "train_loss_last": train["loss_last"]}
  seconds = {k: v["seconds"] for k, v in phase_log.phases.items()}
  return {"world": phase_log.result("world"), "passages": passages,
          "retriever": {**phase_log.result("retriever"),
                        "recall_world_a": index["index_a"]["recall"],
                        "recall_world_b": index["index_b"]["recall"]},
          "steps": config.rag.num_train_steps, "batch_size": config.rag.batch_size,
          "n_docs": config.rag.n_docs, "ctx_learning_rate": config.shift.ctx_learning_rate,
          "world_a_steps": config.shift.world_a_steps,
          "rag_world_a": (phase_log.result(WORLD_A_ROW) if config.shift.world_a_steps
                          else None),
          "rows": rows, "phase_seconds": seconds,
          "total_seconds": round(sum(seconds.values()), 1), "machine": machine()}


def markdown(r: dict[str, Any]) -> str:
  """report.md: the world, the retriever's recall on both worlds, the rows table."""
  ks = list(r["retriever"]["recall_world_a"])
  k5 = "recall@5" if "recall@5" in ks else ks[-1]
  w = r["world"]
  start = (f"the RAG model of {r['world_a_steps']} steps on world A" if r["world_a_steps"]
           else "a fresh BART")
  lines = [f"# The shifted world: {r['passages']} world-B passages, {w['heldout_questions']} "
           f"held-out questions, {r['steps']} steps x {r['batch_size']} questions x "
           f"{r['n_docs']} passages per row (RAG-Sequence, from {start})", "",
           f"World A passage: {' / '.join(w['example_a'])}", "",
           f"World B passage: {' / '.join(w['example_b'])}", "",
           "| retriever (world-A DPR) | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks),
           "| on world A | " + " | ".join(f"{r['retriever']['recall_world_a'][k]:.3f}"
                                          for k in ks) + " |",
           "| on world B | " + " | ".join(f"{r['retriever']['recall_world_b'][k]:.3f}"
                                          for k in ks) + " |", "",
           *rows_table(r, k5), "",
           f"Total {r['total_seconds']:.0f} s of phases on {r['machine']['cpu_cores']} CPU "
           f"cores ({', '.join(r['machine']['devices'])})."]
  return "\n".join(lines) + "\n"


def rows_table(r: dict[str, Any], k: str = "recall@5") -> list[str]:
  """The rows: EM, recall@k over the evaluation index and over world B as built (index_b),
  speed, staleness."""
  lines = [f"| row | held-out EM | {k}, own index | {k}, world B as built | steps/s | "
           "step time / frozen | staleness mean / max |", "|---|---|---|---|---|---|---|"]
  for row in r["rows"].values():
    s = row["staleness"]
    lines.append(f"| {row['label']} | **{row['heldout_em']:.3f}** | {row['recall'][k]:.3f} | "
                 f"{row['recall_index_b'][k]:.3f} | {row['steps_per_s']:.2f} | "
                 f"{row['step_time_ratio']:.2f}x | "
                 + (f"{s['mean']:.1f} / {s['max']:.0f} |" if s else "|"))
  return lines


# --------------------------------------------------------------------------- entry


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) every phase in `workdir`; returns the report (see the module
  docstring). A workdir holding a finished run prints its report again."""
  config_check.validate(config, "world_shift")
  config_check.check_index_size(config, "world_shift",
                                world_job.world_passages(config.world),
                                "the world of config.world")
  workdir = Path(workdir)
  with workdir_lock(workdir):
    loop.check_workdir(config, workdir)
    if (workdir / "report.json").exists():
      print((workdir / "report.md").read_text(), flush=True)
      return json.loads((workdir / "report.json").read_text())
    with workdir_logging(workdir) as log_file:
      print(f"rag_jax shifted world in {workdir} (logs: {log_file})", flush=True)
      phase_log = PhaseLog(workdir)
      run_phases(world_job.Job(config, workdir, phase_log), phases(config), phase_log)
      report = build_report(config, workdir, phase_log)
      with atomic_file(workdir / "report.json", "w") as f:
        json.dump(report, f, indent=2)
      (workdir / "report.md").write_text(markdown(report))
  print("\n" + markdown(report), flush=True)
  return report
