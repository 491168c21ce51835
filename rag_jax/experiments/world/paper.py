"""The paper's findings in miniature on the synthetic worlds (configs/world_paper.py):

    python train.py --config=configs/world_paper.py --workdir=runs/paper

For each world of `config.worlds` (default and hard), in workdir/<world>/, the world experiments'
phase runner (rag_jax.experiments.world.phases: named phases, each recorded as it ends) runs

  world, tokenizer   as the default job
  bm25               BM25 indexes of world 1 and world 2 (index_bm25/, index_bm25_swapped/)
  retriever          DPR, in-batch negatives (+ one BM25 hard negative per question where
                     `retriever.hard_negatives`)
  index              the dense ScaNN indexes (index/, index_swapped/)
  <model>_<retr.>    RAG-Sequence and RAG-Token, each with the BM25 retriever (fixed BM25 scores
                     as p(z|x) logits), the frozen question encoder, and the learned one (the
                     paper's Table 6 rows); same steps, batch, seed and sizes for all six
  closed_book        BART alone (Table 1's closed-book row)
  evaluation         held-out EM and recall@k of every row, by the row evaluator of
                     rag_jax.experiments.world.evaluation (answers in
                     <row>/heldout_predictions.jsonl); the hot-swap 2x2 of every row; the
                     docs-at-test-time sweep of the learned rows (Figure 3); RAG-Token's
                     posterior over the retrieved passages per generated token (Figure 2)
  fever_*            where `config.fever.worlds` names the world: the six rows again, fine-tuned
                     on FEVER-like claims -> label word, and their held-out label accuracy
                     (rag_jax.experiments.world.fever; the paper's FEVER column of Table 6)

then writes workdir/report.md, report.json (one rag_jax.experiments.world.paper_report.WorldReport
per world) and the PNGs (rag_jax.experiments.world.plots: figure2_<world>.png, figure3_<world>.png).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from rag_jax.answer import RagAnswerer
from rag_jax.experiments.world import evaluation as world_eval
from rag_jax.experiments.world import fever, plots
from rag_jax.experiments.world import job as world_job
from rag_jax.experiments.world.paper_report import (
  MODEL_LABELS,
  RECALL_KS,
  Figure2Panel,
  Figure3,
  PaperRow,
  WorldEvaluation,
  WorldReport,
  markdown,
)
from rag_jax.experiments.world.phases import Phase, PhaseLog, run_phases
from rag_jax.experiments.world.rows import (
  MODELS,
  RETRIEVERS,
  ROW_NAMES,
  index_dir,
  retriever_overrides,
  row_name,
)
from rag_jax.retrieval.backends import make_text_index
from rag_jax.retrieval.bm25_index import Bm25Config
from rag_jax.retrieval.store import build_store_from_file
from rag_jax.training import config_check, loop
from rag_jax.utils.atomic import atomic_file
from rag_jax.utils.lock import workdir_lock
from rag_jax.utils.logs import workdir_logging

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- phases


def phase_bm25(job: world_job.Job) -> dict[str, Any]:
  """BM25 index directories (passages/ + index/, as build_index writes) of both worlds."""
  out = {}
  for corpus, name in (("passages.tsv", "index_bm25"), ("passages_swapped.tsv",
                                                        "index_bm25_swapped")):
    store = build_store_from_file(job.world_dir / corpus, job.workdir / name / "passages",
                                  split_words=None, progress=False)
    texts = [f"{store.title(r)} {store.text(r)}" for r in range(len(store))]
    index = make_text_index(texts, "bm25", bm25_config=Bm25Config())
    index.save(job.workdir / name / "index")
    out[name] = {"passages": index.count, "kind": index.kind}
  return out


def _row_phase(retriever: str, model: str):
  def run(job: world_job.Job) -> dict[str, Any]:
    return world_job.train_rag_row(job, model, row_name(retriever, model),
                                   **retriever_overrides(job.workdir, retriever))
  return run


def _answers(answerer: RagAnswerer, questions: list[str], cfg: Any, desc: str,
             batch_size: int | None = None) -> list[str]:
  gen = dict(num_beams=cfg.num_beams, max_length=cfg.max_answer_tokens)
  return world_eval.chunked(lambda qs: [a.text for a in answerer(qs, **gen)], questions,
                            batch_size or cfg.batch_size, desc)


def sweep_batch_size(batch_size: int, n_docs: int, reference_docs: int = 5) -> int:
  """Questions per decoding batch at `n_docs` passages: RAG-Sequence thorough decoding rescores
  every candidate (up to one per passage) on every passage, n_docs^2 generator rows per
  question, so the batch shrinks with n_docs^2 to keep the rows of `reference_docs` (at 50
  passages and 100 questions in one batch the rescoring needed over 20 GB)."""
  return max(1, min(batch_size, batch_size * reference_docs ** 2 // n_docs ** 2))


def figure2_panels(workdir: Path, cfg: Any, paper_cfg: Any) -> list[Figure2Panel]:
  """RAG-Token (learned) on held-out questions with multi-token answers: p(z | x, y_<=t) per
  generated token t over its retrieved passages (prior softmax(doc scores) times the token's
  probability under each passage, normalized: the paper's Figure 2)."""
  export = workdir / row_name("learned", "rag_token") / "export"
  answerer = RagAnswerer(export, workdir / "index", max_question_length=world_eval.QUESTION_TOKENS)
  tok = answerer.tokenizers.generator
  questions = (workdir / "world" / "val.source").read_text().splitlines()
  answers = (workdir / "world" / "val.target").read_text().splitlines()
  chosen = [i for i, a in enumerate(answers)
            if len(tok(a, add_special_tokens=False)["input_ids"]) > 1][:paper_cfg.figure2_questions]
  panels = []
  for i in chosen:
    generated = answerer([questions[i]], num_beams=1, max_length=cfg.max_answer_tokens)[0].text
    hits, ctx, ctx_mask, scores = answerer.generator_inputs([questions[i]])
    ids = tok(generated)["input_ids"]  # <s> answer </s>
    labels = np.asarray([[answerer.model.config.generator.decoder_start_token_id] + ids])
    out = answerer.model.apply({"params": answerer.params}, ctx, ctx_mask, labels,
                               doc_scores=scores)
    logp = jax.nn.log_softmax(np.asarray(out.logits, np.float32), -1)  # [n, T, V]
    token_lp = np.take_along_axis(np.asarray(logp)[:, :-1], labels[0, 1:][None, :, None],
                                  -1)[..., 0]  # [n, T-1]: log p(y_t+1 | z, y_<=t)
    prior = np.asarray(jax.nn.log_softmax(scores[0]))[:, None]
    post = np.exp(prior + token_lp - np.logaddexp.reduce(prior + token_lp, axis=0))
    panels.append(Figure2Panel(
        question=questions[i], gold=answers[i], generated=generated,
        titles=[h.title for h in hits[0]], tokens=[tok.decode([t]) for t in labels[0, 1:]],
        posterior=post.round(4).tolist()))
  return panels


def evaluate_rows(job: world_job.Job) -> dict[str, PaperRow]:
  """Table 6 and the hot-swap 2x2: every row scored by the world experiments' row evaluator
  (held-out EM, recall@RECALL_KS over the row's index, hot-swap to its world-2 index), its
  answers in <row>/heldout_predictions.jsonl."""
  workdir, rows = job.workdir, {}
  for retriever in RETRIEVERS:
    for model in MODELS:
      name = row_name(retriever, model)
      run = dataclasses.replace(world_eval.heldout_run(workdir, name, job.config.eval),
                                model_type=model, index_dir=str(index_dir(workdir, retriever)),
                                recall_ks=RECALL_KS)
      scores, _ = world_eval.evaluate_row(
          run, workdir / name / "heldout_predictions.jsonl",
          world_eval.swap_questions(workdir, index_dir(workdir, retriever, swapped=True)))
      rows[name] = PaperRow(ROW_NAMES[(retriever, model)], scores)
  return rows


def figure3_sweep(job: world_job.Job, paper_cfg: Any) -> Figure3:
  """Docs at test time (Figure 3): the learned rows' EM with K = paper.docs passages and their
  recall@K, on the first paper.sweep_questions held-out questions."""
  cfg, workdir = job.config.eval, job.workdir
  lines = lambda name: (workdir / "world" / name).read_text().splitlines()  # noqa: E731
  n = min(paper_cfg.sweep_questions, len(lines("val.source")))
  questions, answers = lines("val.source")[:n], lines("val.target")[:n]
  gold = job.world_meta()["heldout_gold_passages"][:n]
  docs = list(paper_cfg.docs)
  em: dict[str, list[float]] = {}
  recall: dict[str, list[float]] = {}
  for model in MODEL_LABELS:
    name = row_name("learned", model)
    em[model] = []
    for k in docs:
      answerer = RagAnswerer(workdir / name / "export", workdir / "index", n_docs=k,
                             max_question_length=world_eval.QUESTION_TOKENS)
      em[model].append(world_eval.exact_match(
          _answers(answerer, questions, cfg, f"docs={k} ({name})",
                   sweep_batch_size(cfg.batch_size, k)), answers))
    found = world_eval.search_ids(answerer.retriever, questions, max(docs), cfg.batch_size,
                                  f"recall sweep ({name})")
    recall[model] = [world_eval.recall_at_k(found, gold, (k,))[f"recall@{k}"] for k in docs]
  return Figure3(questions=n, docs=docs, em=em, recall=recall)


def phase_evaluation(job: world_job.Job, paper_cfg: Any, world: str) -> dict[str, Any]:
  """Every figure of the report for one world (see the module docstring); the PNGs beside the
  world's folder."""
  meta = job.world_meta()
  ev = WorldEvaluation(heldout_questions=len(meta["heldout_gold_passages"]),
                       changed_facts=len(meta["changed_heldout_rows"]),
                       majority_em=meta["heldout_majority_em"], rows=evaluate_rows(job),
                       figure3=figure3_sweep(job, paper_cfg))
  plots.figure3(ev.figure3, world, job.workdir.parent / f"figure3_{world}.png")
  if paper_cfg.figure2_questions and job.config.world.hard:
    panels = figure2_panels(job.workdir, job.config.eval, paper_cfg)
    plots.figure2(panels, job.workdir.parent / f"figure2_{world}.png")
    ev = dataclasses.replace(ev, figure2=panels)
  return dataclasses.asdict(ev)


def phases(paper_cfg: Any, world: str, fever_cfg: Any) -> list[Phase]:
  """The world's phases in order; the FEVER-like ones last, where fever_cfg.worlds has it."""
  out = [Phase("world", world_job.phase_world), Phase("tokenizer", world_job.phase_tokenizer),
         Phase("bm25", phase_bm25), Phase("retriever", world_job.phase_retriever),
         Phase("index", world_job.phase_index)]
  out += [Phase(row_name(r, m), _row_phase(r, m)) for r in RETRIEVERS for m in MODELS]
  out += [Phase("closed_book", world_job.phase_closed_book),
          Phase("evaluation", lambda job: phase_evaluation(job, paper_cfg, world))]
  if world in fever_cfg.worlds:
    out += fever.phases(fever_cfg)
  return out


# --------------------------------------------------------------------------- entry


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) every world's phases in workdir/<world>, then the report."""
  config_check.validate(config)
  for world in config.worlds:  # paper.docs and each world's rag.n_docs against its passages
    needed = config_check.passages_needed(config, "world_paper")
    needed = {k: v for k, v in needed.items()
              if k == "paper.docs" or k.startswith(f"worlds.{world}.")}
    if found := config_check.index_problems(
        needed, world_job.world_passages(config.worlds[world].world),
        f"the {world} world (config.worlds.{world}.world)"):
      raise config_check.ConfigError("; ".join(found) + " (invalid config: nothing was run or "
                                     "written)")
  workdir = Path(workdir)
  with workdir_lock(workdir):
    loop.check_workdir(config, workdir,
                       on_evaluation_change=lambda _: forget_evaluations(config, workdir))
    with workdir_logging(workdir):
      worlds = {world: _run_world(config, world, workdir / world) for world in config.worlds}
  report = {"worlds": {w: dataclasses.asdict(r) for w, r in worlds.items()}}
  with atomic_file(workdir / "report.json", "w") as f:
    json.dump(report, f, indent=2)
  (workdir / "report.md").write_text(markdown(worlds))
  print(markdown(worlds), flush=True)
  return report


def _run_world(config: ml_collections.ConfigDict, world: str, workdir: Path) -> WorldReport:
  """Runs (or resumes) one world's phases in `workdir`; its part of the report."""
  wcfg = config.worlds[world]
  workdir.mkdir(parents=True, exist_ok=True)
  phase_log = PhaseLog(workdir)
  run_phases(world_job.Job(wcfg, workdir, phase_log),
             phases(config.paper, world, config.fever), phase_log, label=world)
  with_fever = phase_log.done("fever_evaluation")
  return WorldReport(
      evaluation=WorldEvaluation.from_dict(phase_log.result("evaluation")),
      closed_book_em=_closed_book_em(workdir, wcfg), steps=wcfg.rag.num_train_steps,
      batch_size=wcfg.rag.batch_size,
      phase_seconds={k: v["seconds"] for k, v in phase_log.phases.items()},
      closed_book_report=json.loads((workdir / "closed_book" / "report.json").read_text()),
      fever=(fever.FeverEvaluation.from_dict(phase_log.result("fever_evaluation"))
             if with_fever else None),
      fever_steps=config.fever.num_train_steps if with_fever else None)


def forget_evaluations(config: ml_collections.ConfigDict, workdir: Path) -> None:
  """Discards every world's evaluation phases, the closed book's cached EM and the report, made
  with the evaluation settings recorded in the workdir (rag_jax.training.loop.check_workdir calls
  it when only those changed): the next run evaluates the trained rows with the new ones."""
  rows = [row_name(r, m) for r in RETRIEVERS for m in MODELS]
  for world in config.worlds:
    world_job.forget_evaluation(
        workdir / world, ("evaluation", "fever_evaluation"),
        ("closed_book/heldout_em.json",
         *(f"{prefix}{row}/heldout_predictions.jsonl" for prefix in ("", "fever/")
           for row in rows)))
  for name in ("report.json", "report.md"):
    (workdir / name).unlink(missing_ok=True)


def _closed_book_em(workdir: Path, cfg: Any) -> float:
  """The closed book's held-out EM, decoded as the default job does."""
  cached = workdir / "closed_book" / "heldout_em.json"
  if cached.exists():
    return json.loads(cached.read_text())["em"]
  em = world_eval.closed_book_em(workdir, cfg.eval)
  cached.write_text(json.dumps({"em": em}))
  return em
