"""The paper's findings in miniature on the synthetic worlds (configs/world_paper.py):

    python train.py --config=configs/world_paper.py --workdir=runs/paper

For each world of `config.worlds` (default and hard), in workdir/<world>/, the default job's phase
machinery (rag_jax.experiments.world.job: PhaseLog, resumable phases) runs

  world, tokenizer   as the default job
  bm25               BM25 indexes of world 1 and world 2 (index_bm25/, index_bm25_swapped/)
  retriever          DPR, in-batch negatives (+ one BM25 hard negative per question where
                     `retriever.hard_negatives`)
  index              the dense ScaNN indexes (index/, index_swapped/)
  <model>_<retr.>    RAG-Sequence and RAG-Token, each with the BM25 retriever (fixed BM25 scores
                     as p(z|x) logits), the frozen question encoder, and the learned one (the
                     paper's Table 6 rows); same steps, batch, seed and sizes for all six
  closed_book        BART alone (Table 1's closed-book row)
  evaluation         held-out EM and recall@k of every row; the hot-swap 2x2 of every row; the
                     docs-at-test-time sweep of the learned rows (Figure 3); RAG-Token's
                     posterior over the retrieved passages per generated token (Figure 2)
  fever_*            where `config.fever.worlds` names the world: the six rows again, fine-tuned
                     on FEVER-like claims -> label word, and their held-out label accuracy
                     (rag_jax.experiments.world.fever; the paper's FEVER column of Table 6)

then writes workdir/report.md, report.json and the PNGs (figure2_<world>.png, figure3_<world>.png).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import matplotlib
import ml_collections
import numpy as np

from rag_jax.answer import RagAnswerer
from rag_jax.experiments.world import evaluation as world_eval
from rag_jax.experiments.world import fever
from rag_jax.experiments.world import job as world_job
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
from rag_jax.retrieval.store import PassageStore, build_store_from_file
from rag_jax.training import config_check, loop
from rag_jax.utils.atomic import atomic_file
from rag_jax.utils.lock import workdir_lock
from rag_jax.utils.logs import workdir_logging

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the headless backend is chosen)

log = logging.getLogger(__name__)

# The paper's NQ dev EM of each row (Table 6) and NQ test EM (Table 1).
PAPER_TABLE6_NQ = {"RAG-Token-BM25": 29.7, "RAG-Sequence-BM25": 31.8, "RAG-Token-Frozen": 37.8,
                   "RAG-Sequence-Frozen": 41.2, "RAG-Token": 43.5, "RAG-Sequence": 44.0}
PAPER_TABLE1_NQ = {"RAG-Token": 44.1, "RAG-Sequence": 44.5}
# Paper section 4.5, hot-swapping (% of answers matching each year's leaders).
PAPER_HOT_SWAP = {"index 1": {"facts 1": 70, "facts 2": 4}, "index 2": {"facts 1": 12,
                                                                         "facts 2": 68}}


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


def _matches(predicted: list[str], gold: list[str]) -> float:
  return float(np.mean([world_eval.normalize(p) == world_eval.normalize(g)
                        for p, g in zip(predicted, gold, strict=True)]))


def figure2(workdir: Path, cfg: Any, paper_cfg: Any, out_png: Path) -> list[dict[str, Any]]:
  """RAG-Token (learned) on held-out questions with multi-token answers: p(z | x, y_<=t) per
  generated token t over its retrieved passages (prior softmax(doc scores) times the token's
  probability under each passage, normalized: the paper's Figure 2), as a heat map."""
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
    pieces = [tok.decode([t]) for t in labels[0, 1:]]
    panels.append({"question": questions[i], "gold": answers[i], "generated": generated,
                   "titles": [h.title for h in hits[0]], "tokens": pieces,
                   "posterior": post.round(4).tolist()})
  if panels:
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.2), squeeze=False)
    for ax, p in zip(axes[0], panels, strict=True):
      ax.imshow(np.asarray(p["posterior"]), cmap="Blues", vmin=0, vmax=1, aspect="auto")
      ax.set_yticks(range(len(p["titles"])), [f"{k + 1}. {t}" for k, t in enumerate(p["titles"])],
                    fontsize=7)
      ax.set_xticks(range(len(p["tokens"])), [repr(t.strip() or t)[1:-1] for t in p["tokens"]],
                    rotation=60, fontsize=7)
      ax.set_title(f"{p['question']}\n-> {p['generated']}", fontsize=8)
    fig.suptitle("RAG-Token: posterior over the retrieved passages per generated token")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
  return panels


def phase_evaluation(job: world_job.Job, paper_cfg: Any, world: str) -> dict[str, Any]:
  """Every figure of the report for one world (see the module docstring)."""
  cfg, workdir = job.config.eval, job.workdir
  meta = job.world_meta()
  lines = lambda name: (workdir / "world" / name).read_text().splitlines()  # noqa: E731
  questions, answers, swapped = lines("val.source"), lines("val.target"), lines(
      "val_swapped.target")
  changed = meta["changed_heldout_rows"]
  gold = world_eval.gold_rows(PassageStore(workdir / "index" / "passages"),
                              meta["heldout_gold_passages"])
  ks = (1, 5, 20)
  out: dict[str, Any] = {"heldout_questions": len(questions), "changed_facts": len(changed),
                         "majority_em": meta["heldout_majority_em"], "rows": {}}
  for retriever in RETRIEVERS:
    for model in MODELS:
      name = row_name(retriever, model)
      export = workdir / name / "export"
      answerer = RagAnswerer(export, index_dir(workdir, retriever),
                             max_question_length=world_eval.QUESTION_TOKENS)
      predicted = _answers(answerer, questions, cfg, f"answers ({name})")
      rows = world_eval.search_rows(answerer.retriever, questions, max(ks), cfg.batch_size,
                                    f"recall ({name})")
      changed_q = [questions[r] for r in changed]
      swap = RagAnswerer(export, index_dir(workdir, retriever, swapped=True),
                         max_question_length=world_eval.QUESTION_TOKENS)
      after = _answers(swap, changed_q, cfg, f"hot-swap ({name})")
      before = [predicted[r] for r in changed]
      facts1, facts2 = [answers[r] for r in changed], [swapped[r] for r in changed]
      out["rows"][name] = {
          "row": ROW_NAMES[(retriever, model)], "em": world_eval.exact_match(predicted, answers),
          "recall": world_eval.recall(rows, gold, ks),
          "hot_swap": {"index 1": {"facts 1": _matches(before, facts1),
                                   "facts 2": _matches(before, facts2)},
                       "index 2": {"facts 1": _matches(after, facts1),
                                   "facts 2": _matches(after, facts2)}}}
  # Figure 3: docs at test time, the learned rows, on the first sweep_questions questions.
  sweep_n = min(paper_cfg.sweep_questions, len(questions))
  sweep: dict[str, Any] = {"questions": sweep_n, "docs": list(paper_cfg.docs)}
  for model in MODELS:
    name = row_name("learned", model)
    em = []
    for k in paper_cfg.docs:
      answerer = RagAnswerer(workdir / name / "export", workdir / "index", n_docs=k,
                             max_question_length=world_eval.QUESTION_TOKENS)
      em.append(world_eval.exact_match(
          _answers(answerer, questions[:sweep_n], cfg, f"docs={k} ({name})",
                   sweep_batch_size(cfg.batch_size, k)), answers[:sweep_n]))
      if k == max(paper_cfg.docs):
        rows = world_eval.search_rows(answerer.retriever, questions[:sweep_n], k, cfg.batch_size,
                                      f"recall sweep ({name})")
        sweep[f"{model}_recall"] = [world_eval.recall(rows, gold[:sweep_n], (j,))[f"recall@{j}"]
                                    for j in paper_cfg.docs]
    sweep[f"{model}_em"] = em
  out["figure3"] = sweep
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
  for model, label in (("rag_sequence", "RAG-Sequence"), ("rag_token", "RAG-Token")):
    a1.plot(sweep["docs"], sweep[f"{model}_em"], marker="o", label=label)
    a2.plot(sweep["docs"], sweep[f"{model}_recall"], marker="o", label=label)
  for ax, title in ((a1, "held-out EM"), (a2, "retrieval recall@K")):
    ax.set_xscale("log")
    ax.set_xticks(sweep["docs"], [str(d) for d in sweep["docs"]])
    ax.set_xlabel("documents retrieved at test time (K)")
    ax.set_title(f"{title} ({world} world)")
    ax.legend()
  fig.tight_layout()
  fig.savefig(workdir.parent / f"figure3_{world}.png", dpi=110)
  plt.close(fig)
  if paper_cfg.figure2_questions and job.config.world.hard:
    out["figure2"] = figure2(workdir, cfg, paper_cfg, workdir.parent / f"figure2_{world}.png")
  return out


def phases(paper_cfg: Any, world: str, fever_cfg: Any = None) -> list[tuple[str, Any]]:
  """The world's phases in order; the FEVER-like ones last, where fever_cfg.worlds has it."""
  out = [("world", world_job.phase_world), ("tokenizer", world_job.phase_tokenizer),
         ("bm25", phase_bm25), ("retriever", world_job.phase_retriever),
         ("index", world_job.phase_index)]
  out += [(row_name(r, m), _row_phase(r, m)) for r in RETRIEVERS for m in MODELS]
  out += [("closed_book", world_job.phase_closed_book),
          ("evaluation", lambda job: phase_evaluation(job, paper_cfg, world))]
  if fever_cfg is not None and world in fever_cfg.worlds:
    out += fever.phases(fever_cfg)
  return out


# --------------------------------------------------------------------------- report


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def markdown(report: dict[str, Any]) -> str:
  """The report: every table beside the paper's numbers."""
  parts = ["# The paper in miniature (synthetic worlds)", ""]
  for world, r in report["worlds"].items():
    ev, ph = r["evaluation"], r["phases"]
    rows = ev["rows"]
    parts += [f"## {world} world ({ev['heldout_questions']} held-out questions, "
              f"{r['steps']} RAG steps per row, batch {r['batch_size']})", "",
              "Table 1 (held-out EM, %; paper: NQ test EM)", "",
              "| model | EM here | paper NQ |", "|---|---|---|",
              f"| closed-book BART | {_pct(ev['closed_book_em'])} (majority answer "
              f"{_pct(ev['majority_em'])}) | (T5-11B closed book 34.5) |",
              f"| RAG-Token | {_pct(rows['rag_token_learned']['em'])} | 44.1 |",
              f"| RAG-Sequence | {_pct(rows['rag_sequence_learned']['em'])} | 44.5 |", "",
              "Table 6 (held-out EM and recall@k, %; paper: NQ dev EM)", "",
              "| row | EM here | recall@1 | recall@5 | recall@20 | paper NQ EM |",
              "|---|---|---|---|---|---|"]
    for row in rows.values():
      rec = row["recall"]
      parts.append(f"| {row['row']} | {_pct(row['em'])} | {_pct(rec['recall@1'])} | "
                   f"{_pct(rec['recall@5'])} | {_pct(rec['recall@20'])} | "
                   f"{PAPER_TABLE6_NQ[row['row']]} |")
    parts.append("")
    if "fever" in r:
      parts += fever.markdown(r["fever"], r["fever_steps"])
    parts += [f"Hot-swap 2x2 ({ev['changed_facts']} changed held-out facts; % of answers "
              "matching each world's facts; paper: 2016/2018 world leaders)", "",
              "| row | index | world-1 facts | world-2 facts | paper (2016 / 2018 leaders) |",
              "|---|---|---|---|---|"]
    for row in rows.values():
      for idx, paper_key in (("index 1", "index 1"), ("index 2", "index 2")):
        hs, pp = row["hot_swap"][idx], PAPER_HOT_SWAP[paper_key]
        parts.append(f"| {row['row']} | world-{idx[-1]} | {_pct(hs['facts 1'])} | "
                     f"{_pct(hs['facts 2'])} | {pp['facts 1']} / {pp['facts 2']} |")
    f3 = ev["figure3"]
    parts += ["", f"Figure 3 (learned rows, first {f3['questions']} held-out questions; "
              f"figure3_{world}.png)", "",
              "| K | " + " | ".join(str(d) for d in f3["docs"]) + " |",
              "|---|" + "---|" * len(f3["docs"])]
    for model, label in (("rag_sequence", "RAG-Sequence"), ("rag_token", "RAG-Token")):
      parts.append(f"| {label} EM | " + " | ".join(_pct(x) for x in f3[f"{model}_em"]) + " |")
      parts.append(f"| {label} recall@K | " + " | ".join(_pct(x) for x in f3[f"{model}_recall"])
                   + " |")
    parts += ["", "Phase seconds: " + ", ".join(f"{k} {v['seconds']:.0f}"
                                                for k, v in ph.items()), ""]
  return "\n".join(parts) + "\n"


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
      report: dict[str, Any] = {"worlds": {}}
      for world in config.worlds:
        wcfg = config.worlds[world]
        sub = workdir / world
        sub.mkdir(parents=True, exist_ok=True)
        phase_log = world_job.PhaseLog(sub)
        job = world_job.Job(wcfg, sub, phase_log)
        for name, fn in phases(config.paper, world, config.get("fever")):
          if phase_log.done(name):
            continue
          start = time.time()
          result = fn(job)
          phase_log.finish(name, time.time() - start, result)
          world_job.console(f"[{world}] {name}: {time.time() - start:.1f} s")
        ev = phase_log.result("evaluation")
        closed = json.loads((sub / "closed_book" / "report.json").read_text())
        ev["closed_book_em"] = _closed_book_em(sub, wcfg)
        report["worlds"][world] = {"evaluation": ev, "phases": phase_log.phases,
                                   "steps": wcfg.rag.num_train_steps,
                                   "batch_size": wcfg.rag.batch_size,
                                   "closed_book_report": closed}
        if phase_log.done("fever_evaluation"):
          report["worlds"][world]["fever"] = phase_log.result("fever_evaluation")
          report["worlds"][world]["fever_steps"] = config.fever.num_train_steps
  with atomic_file(workdir / "report.json", "w") as f:
    json.dump(report, f, indent=2)
  (workdir / "report.md").write_text(markdown(report))
  print(markdown(report), flush=True)
  return report


def forget_evaluations(config: ml_collections.ConfigDict, workdir: Path) -> None:
  """Discards every world's evaluation phases, the closed book's cached EM and the report, made
  with the evaluation settings recorded in the workdir (rag_jax.training.loop.check_workdir calls
  it when only those changed): the next run evaluates the trained rows with the new ones."""
  for world in config.worlds:
    world_job.forget_evaluation(workdir / world, ("evaluation", "fever_evaluation"),
                                ("closed_book/heldout_em.json",))
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
