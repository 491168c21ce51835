"""evaluate.py's library side: a checkpoint + an index on a task's questions -> predictions.jsonl,
metrics.json and a table beside a reference number (the paper's, or train.py's report).

One :class:`EvalRun` says what to evaluate (questions, checkpoint, index, decoder settings,
metrics, the number to compare with); :func:`evaluate` runs it in one of three modes under
`<workdir>/eval/<run name>/`, each folder keyed by what decides its contents, so that the modes
live side by side in one workdir and a killed evaluation started again resumes where it stopped:

  answers         retrieval + decoding (rag_jax.answer.RagAnswerer) in fixed-shape batches:
                  predictions.jsonl, metrics.json, the table printed and in table.md, in the
                  row's folder itself (n_docs: the row's);
  retrieval_only  the question encoder alone over the index: retrieval/predictions.jsonl (each
                  question's top passages, see :func:`retrieve`), and metrics.json / table.md
                  with recall@k and precision@k at each of recall_ks;
  docs            the paper's Figure 3: the answers mode at each number of docs K, in docs_<K>/
                  (a sweep extended later reuses its finished points), and retrieval recall@K
                  from the same retrieval/ folder, written as figure3.png, figure3.md and
                  figure3.json.

Each folder records the settings that decide its contents in settings.json and refuses to resume
under others (another checkpoint, index, question count, decoding...).

Every mode runs on several processes too (rag_jax.distributed): they agree on the runs and the
mode first (questions, checkpoint, index), each loads the answerer or retriever on its own
devices (process 0 first, which builds a missing passage table), answers its share of the
batches (rag_jax.evaluation.loop), and process 0 writes every file and the log.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from tqdm import tqdm

from rag_jax import checkpoints, metrics
from rag_jax.answer import RagAnswerer, check_within_index, index_passages
from rag_jax.distributed import check_same, file_fingerprint, is_primary, on_primary, primary_first
from rag_jax.evaluation import scoring
from rag_jax.evaluation.loop import EvalExample, PredictFn, read_predictions, run_loop
from rag_jax.models.rag import RagModel, architecture_of
from rag_jax.parallel import data_mesh
from rag_jax.retrieval.retriever import Retriever
from rag_jax.utils.atomic import atomic_file
from rag_jax.utils.errors import InputError
from rag_jax.utils.logs import workdir_logging

log = logging.getLogger(__name__)
AGREE_TIMEOUT_S = 600  # processes wait this long for each other's facts and process 0's steps


@dataclasses.dataclass(frozen=True)
class EvalRun:
  """One evaluation row.

  name: its folder under <workdir>/eval/ (e.g. "nq-rag_sequence-test").
  model_type: rag_sequence | rag_token, the decoder (the checkpoint's class is overridden).
  generate: rag_jax.decoding.generate options (num_beams, max_length, decoding).
  metrics: names of rag_jax.evaluation.scoring.METRICS; the first is the headline.
  reference: {metric: fraction} printed beside this run's figures, under reference_label.
  regex_answers: the answers are regular expressions (CuratedTrec).
  question_encoder: a DPRQuestionEncoder directory for retrieval_only ("": the checkpoint's).
  retrieval: the answering path, RagAnswerer's `retrieval` ("host", "device": retrieval and
    decoding in one device program, or "auto"). Not part of settings() itself: what decides the
    predictions is the search that ran (RagAnswerer.search: "exact float32" on the host or the
    devices alike, "exact bfloat16", "scann", "bm25"), recorded in settings.json by the first
    answering call, so that a folder begun over a ScaNN index on the host is not resumed with
    exact search on the devices.
  devices: how many of this process's devices answer (0: all of them). With 1 (the world job's
    rows) the figures do not depend on how many devices the process has, bit for bit.
  """

  name: str
  examples: tuple[EvalExample, ...]
  checkpoint: str
  index_dir: str
  model_type: str
  n_docs: int
  generate: dict[str, Any]
  metrics: tuple[str, ...]
  batch_size: int
  recall_ks: tuple[int, ...] = (1, 5, 10, 20, 50, 100)
  reference: dict[str, float] = dataclasses.field(default_factory=dict)
  reference_label: str = "reference"
  regex_answers: bool = False
  max_question_length: int = 128
  dtype: str = "float32"
  question_encoder: str = ""
  retrieval: str = "host"
  devices: int = 0

  def settings(self) -> dict[str, Any]:
    """What decides the predictions (a folder holding other settings is refused)."""
    return {"checkpoint": str(self.checkpoint), "index_dir": str(self.index_dir),
            "model_type": self.model_type, "n_docs": self.n_docs, "generate": self.generate,
            "questions": len(self.examples), "max_question_length": self.max_question_length,
            "dtype": self.dtype}


def check_settings(folder: Path, settings: dict[str, Any], *, add: bool = False) -> None:
  """Records settings.json in `folder`, or refuses a folder written with other settings.

  add: `settings` are more keys of the same evaluation (the search, known once the answerer is
  loaded): the ones not yet recorded are added; a recorded one that differs is refused."""
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / "settings.json"
  current = json.loads(json.dumps(settings))
  previous = None
  if path.exists():
    try:
      previous = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise InputError(f"{path}: not a settings file ({e}); delete the folder {folder} to "
                       "evaluate again") from e
  if previous is not None:
    diff = sorted(k for k in current if k in previous and previous[k] != current[k]
                  or not add and k not in previous)
    if diff:
      detail = "; ".join(f"{k}: {previous.get(k)!r} there, {current.get(k)!r} now" for k in diff
                         if not isinstance(current.get(k), dict | list))
      raise InputError(f"{folder} holds an evaluation with other settings ({diff} differ"
                       f"{'; ' + detail if detail else ''}); use another --workdir or delete it")
    if all(k in previous for k in current):
      return
  with atomic_file(path, "w") as f:
    json.dump({**(previous or {}), **current}, f, indent=2, sort_keys=True)


# --------------------------------------------------------------------------- predictors


def answer_predictor(answerer: RagAnswerer, run: EvalRun) -> PredictFn:
  """Examples -> {prediction, score, titles, passage_ids, doc_scores, decoder} per example."""
  kwargs = dict(run.generate, architecture=architecture_of(run.model_type))
  if run.model_type != "rag_sequence":
    kwargs.pop("decoding", None)

  def predict(examples: list[EvalExample]) -> list[dict[str, Any]]:
    return [{"prediction": a.text, "score": a.score,
             "titles": [h.title for h in a.passages], "passage_ids": [h.id for h in a.passages],
             "doc_scores": [h.score for h in a.passages], "decoder": a.decoder.to_dict()}
            for a in answerer([e.question for e in examples], **kwargs)]

  return predict


def retrieval_predictor(retriever: Retriever, run: EvalRun, k: int) -> PredictFn:
  """Examples -> the top-k passages' {titles, passage_ids, doc_scores, has_answer}; has_answer
  is DPR's answer-in-passage test of each passage against that example's own answers (regex for
  CuratedTrec): a question asked twice with other answers is scored against each row's."""
  match_type = "regex" if run.regex_answers else "string"

  def predict(examples: list[EvalExample]) -> list[dict[str, Any]]:
    ids, mask = retriever.tokenize([e.question for e in examples])
    hits = retriever.hits(*retriever.search(ids, mask, k))
    return [{"titles": [h.title for h in row], "passage_ids": [h.id for h in row],
             "doc_scores": [h.score for h in row],
             "has_answer": [metrics.has_answer(e.answers, h.text, match_type) for h in row]}
            for e, row in zip(examples, hits, strict=True)]

  return predict


def with_n_docs(answerer: RagAnswerer, n_docs: int) -> RagAnswerer:
  """The same loaded answerer retrieving and marginalising over n_docs passages."""
  out = copy.copy(answerer)
  out.model = checkpoints.replace_config(answerer.model, n_docs=n_docs)
  return out


def load_answerer(run: EvalRun) -> RagAnswerer:
  """The run's answerer; on several processes each loads its own, process 0 first (it builds a
  missing passage table, which the others then read)."""
  return primary_first(f"eval/{run.name}/answerer", lambda: RagAnswerer(
      run.checkpoint, run.index_dir, n_docs=run.n_docs, dtype=jnp.dtype(run.dtype),
      max_question_length=run.max_question_length, retrieval=run.retrieval,
      mesh=data_mesh(jax.local_devices()[:run.devices]) if run.devices else None),
      AGREE_TIMEOUT_S)


def load_retriever(run: EvalRun) -> Retriever:
  """The question encoder over the index, without a generator: a DPRQuestionEncoder directory
  when given, else the RAG checkpoint's question encoder (its generator weights are read with
  the file, then dropped; nothing of it is built or compiled)."""
  if run.question_encoder:
    return Retriever.load(run.index_dir, run.question_encoder,
                          max_length=run.max_question_length)
  model, params = checkpoints.load_pretrained(run.checkpoint, dtype=jnp.dtype(run.dtype))
  if not isinstance(model, RagModel):
    raise InputError(f"{run.checkpoint}: a {type(model).__name__} checkpoint, not a RAG one")
  tokenizers = checkpoints.load_tokenizer(run.checkpoint)
  params = {"question_encoder": params["question_encoder"]}
  return Retriever.over_directory(run.index_dir, model, params, tokenizers.question_encoder,
                                  run.max_question_length)


# --------------------------------------------------------------------------- modes


def write_json(path: Path, value: Any) -> None:
  with atomic_file(path, "w") as f:
    json.dump(value, f, indent=2)
    f.write("\n")


def table(run: EvalRun, figures: dict[str, float], what: str) -> str:
  """Markdown: each figure x 100 beside the reference number for it (when there is one)."""
  lines = [f"{run.name}: {what}", "",
           f"| metric | this run | {run.reference_label} |", "|---|---|---|"]
  for name, value in figures.items():
    ref = run.reference.get(name)
    lines.append(f"| {name} | {100 * value:.2f} | {'' if ref is None else f'{100 * ref:.2f}'} |")
  return "\n".join(lines)


def answers_mode(run: EvalRun, folder: Path, answerer: RagAnswerer | None = None,
                 progress: bool = True) -> dict[str, Any]:
  """predictions.jsonl + metrics.json (+ table.md) of the run in `folder` (written by process 0
  of several)."""
  on_primary(f"eval/{run.name}/settings", lambda: check_settings(folder, run.settings()),
             AGREE_TIMEOUT_S)
  path = folder / "predictions.jsonl"
  done = len(read_predictions(path))
  if done < len(run.examples):
    answerer = load_answerer(run) if answerer is None else answerer
    on_primary(f"eval/{run.name}/search",
               lambda: check_settings(folder, {"search": answerer.search}, add=True),
               AGREE_TIMEOUT_S)
    log.info("%s: %d of %d questions already in %s", run.name, done, len(run.examples), path)
    docs = f"{run.n_docs} doc{'s' if run.n_docs != 1 else ''}"
    run_loop(run.examples, answer_predictor(answerer, run), path, run.batch_size,
             correct=scoring.correct_fn(run.metrics), desc=f"{run.name} ({docs})",
             progress=progress)
  records = read_predictions(path)
  result = {"name": run.name, "questions": len(records), "n_docs": run.n_docs,
            "decoder": sorted({r["decoder"]["name"] for r in records}),
            "metrics": scoring.answer_metrics(records, run.metrics),
            "reference": {"label": run.reference_label, **run.reference}}
  shown = {m: result["metrics"][m] for m in run.metrics}

  def write() -> None:
    write_json(folder / "metrics.json", result)
    (folder / "table.md").write_text(table(run, shown, ", ".join(result["decoder"])) + "\n")
  on_primary(f"eval/{run.name}/metrics", write, AGREE_TIMEOUT_S)
  return result


def retrieval_settings(run: EvalRun) -> dict[str, Any]:
  """What decides the passages retrieved for each question (not their number: see retrieve)."""
  return {"checkpoint": str(run.checkpoint), "question_encoder": run.question_encoder,
          "index_dir": str(run.index_dir), "questions": len(run.examples),
          "max_question_length": run.max_question_length, "dtype": run.dtype}


def retrieval_depth(records: Sequence[dict[str, Any]]) -> int:
  """Passages written per question in retrieval records (0: none written yet)."""
  return len(records[0]["passage_ids"]) if records else 0


def retrieve(run: EvalRun, folder: Path, depth: int, progress: bool = True
             ) -> list[dict[str, Any]]:
  """Every question's top passages, at least `depth` of them, in folder/predictions.jsonl.

  The folder keeps the deepest list asked of it: --retrieval_only asks for max(recall_ks), the
  docs sweep for its largest K, and a deeper list serves a shallower request, whose figures read
  the first k passages of each list (DPR's top-k accuracies come from one top-100 list the same
  way; over an exact index the first k of a top-K search are the top-k search's passages, ties
  aside). A deeper request than the folder holds retrieves every question again into
  predictions.deeper.jsonl, which replaces predictions.jsonl once complete: a kill resumes it,
  and the shallower file stays whole until then. `depth` is at most the index's size."""
  on_primary(f"eval/{run.name}/retrieval_settings",
             lambda: check_settings(folder, retrieval_settings(run)), AGREE_TIMEOUT_S)
  path, deeper = folder / "predictions.jsonl", folder / "predictions.deeper.jsonl"
  records = read_predictions(path)
  written = retrieval_depth(records)
  if written >= depth and len(records) == len(run.examples):
    return records
  target, k = path, max(written, depth)
  if records and written < depth:
    target = deeper
    begun = retrieval_depth(read_predictions(deeper))
    k = max(depth, begun)  # the same on every process, whether or not deeper is gone yet

  def drop_stale() -> None:  # process 0's
    if target == deeper and 0 < begun < depth:
      deeper.unlink()  # a shallower deepening cut by a kill: this one supersedes it
    for part in target.parent.glob(f"{target.stem}.process-*{target.suffix}"):
      if retrieval_depth(read_predictions(part)) not in (0, k):
        part.unlink()  # several processes' shares of another depth
  on_primary(f"eval/{run.name}/stale", drop_stale, AGREE_TIMEOUT_S)
  retriever = load_retriever(run)
  run_loop(run.examples, retrieval_predictor(retriever, run, k), target, run.batch_size,
           desc=f"{run.name} retrieval (top {k})", progress=progress)
  if target == deeper:
    on_primary(f"eval/{run.name}/deepened", lambda: os.replace(deeper, path), AGREE_TIMEOUT_S)
  return read_predictions(path)


def retrieval_mode(run: EvalRun, folder: Path, progress: bool = True) -> dict[str, Any]:
  """recall@k / precision@k at each of run.recall_ks (a k above the index's size left out,
  with a warning) from folder/predictions.jsonl (:func:`retrieve`), written to metrics.json and
  table.md in `folder`."""
  ks = tuple(run.recall_ks)
  depth = max(ks)
  count = index_passages(run.index_dir)
  if count is not None and depth > count:
    log.warning("the index holds %d passages: recall@k for k > %d left out", count, count)
    depth = count
  records = retrieve(run, folder, depth, progress)
  result = {"name": run.name, "questions": len(records),
            "metrics": scoring.retrieval_metrics(records, [k for k in ks if k <= depth])}

  def write() -> None:
    write_json(folder / "metrics.json", result)
    (folder / "table.md").write_text(table(run, result["metrics"], "retrieval") + "\n")
  on_primary(f"eval/{run.name}/retrieval_metrics", write, AGREE_TIMEOUT_S)
  return result


def docs_mode(run: EvalRun, folder: Path, docs: Sequence[int], progress: bool = True
              ) -> dict[str, Any]:
  """The paper's Figure 3: the headline metric and retrieval recall against K docs. Each K is
  answered in folder/docs_<K>/ (a finished one is read, not answered again); recall@K comes
  from folder/retrieval/ (:func:`retrieve`, shared with --retrieval_only)."""
  docs = sorted(set(docs))
  check_within_index("--docs", max(docs), run.index_dir)
  retrieval = scoring.retrieval_metrics(retrieve(run, folder / "retrieval", max(docs), progress),
                                        docs)
  answerer = None
  rows = []
  for k in docs:
    sub = dataclasses.replace(run, n_docs=k)
    if len(read_predictions(folder / f"docs_{k}" / "predictions.jsonl")) < len(run.examples):
      answerer = load_answerer(sub) if answerer is None else answerer
    result = answers_mode(sub, folder / f"docs_{k}",
                          None if answerer is None else with_n_docs(answerer, k), progress)
    rows.append({"docs": k, **{m: result["metrics"][m] for m in run.metrics},
                 "recall": retrieval.get(f"recall@{k}")})
  headline = run.metrics[0]
  lines = [f"| docs | {' | '.join(run.metrics)} | retrieval recall@K |",
           "|---" * (len(run.metrics) + 2) + "|"]
  for r in rows:
    recall = "" if r["recall"] is None else f"{100 * r['recall']:.2f}"
    lines.append(f"| {r['docs']} | " + " | ".join(f"{100 * r[m]:.2f}" for m in run.metrics)
                 + f" | {recall} |")

  def write() -> None:
    write_json(folder / "figure3.json", rows)
    (folder / "figure3.md").write_text("\n".join(lines) + "\n")
    plot_figure3(rows, headline, run.name, folder / "figure3.png")
  on_primary(f"eval/{run.name}/figure3", write, AGREE_TIMEOUT_S)
  return {"name": run.name, "rows": rows, "table": "\n".join(lines)}


def plot_figure3(rows: list[dict[str, Any]], metric: str, title: str, path: Path) -> None:
  """Two panels as in the paper's Figure 3: the metric and retrieval recall against K."""
  import matplotlib  # deferred: only the docs sweep draws

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # deferred with matplotlib

  ks = [r["docs"] for r in rows]
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  axes[0].plot(ks, [100 * r[metric] for r in rows], marker="o")
  axes[0].set(xlabel="K retrieved docs", ylabel=metric, title=f"{title}: {metric}")
  recall = [(r["docs"], 100 * r["recall"]) for r in rows if r["recall"] is not None]
  if recall:
    axes[1].plot(*zip(*recall, strict=True), marker="o", color="tab:green")
  axes[1].set(xlabel="K retrieved docs", ylabel="answer recall@K", title="retrieval recall")
  fig.tight_layout()
  tmp = path.with_suffix(".tmp.png")
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)


def check_modes(retrieval_only: bool, docs: Sequence[int]) -> None:
  """Refuses --docs with --retrieval_only (the sweep answers questions; retrieval_only does not)."""
  if retrieval_only and docs:
    raise InputError("--docs and --retrieval_only: give one of them (--docs answers at each "
                     "number of docs and writes retrieval recall@K too)")


def evaluate(runs: Sequence[EvalRun], workdir: str | os.PathLike, *, retrieval_only: bool = False,
             docs: Sequence[int] = (), progress: bool = True) -> list[dict[str, Any]]:
  """Runs each EvalRun in the chosen mode under <workdir>/eval/<name>/ and prints its table.
  Settings that cannot work (both modes; more docs than an index holds) are refused before any
  of them runs."""
  check_modes(retrieval_only, docs)
  for run in runs:
    if docs:
      check_within_index("--docs", max(docs), run.index_dir)
    elif not retrieval_only:
      check_within_index(f"{run.name}: n_docs", run.n_docs, run.index_dir)
  workdir = Path(workdir)
  facts = {**run_facts(runs, workdir), "mode": json.dumps([retrieval_only, list(docs)])}
  check_same("eval/facts", facts, AGREE_TIMEOUT_S,
             "every process must evaluate the same runs on the same files")
  (workdir / "eval").mkdir(parents=True, exist_ok=True)
  results = []
  with (workdir_logging(workdir / "eval", "evaluate.log") if is_primary()
        else contextlib.nullcontext(None)) as log_file:
    if log_file is not None:
      tqdm.write(f"evaluating in {workdir / 'eval'} (log: {log_file})")
    for run in runs:
      folder = workdir / "eval" / run.name
      if retrieval_only:
        result = retrieval_mode(run, folder / "retrieval", progress=progress)
        text = (folder / "retrieval" / "table.md").read_text()
      elif docs:
        result = docs_mode(run, folder, docs, progress)
        text = f"{run.name}: the paper's Figure 3 ({folder / 'figure3.png'})\n\n{result['table']}"
      else:
        result = answers_mode(run, folder, progress=progress)
        text = (folder / "table.md").read_text()
      log.info("%s: %s", run.name, result)
      print("\n" + text.rstrip() + "\n", flush=True)
      results.append(result)
  return results


def run_facts(runs: Sequence[EvalRun], workdir: Path) -> dict[str, str]:
  """What every process of one evaluation must agree on (distributed.check_same): the workdir,
  each run's settings and questions, and the files its checkpoint and index hold, as strings."""
  facts = {"workdir": str(Path(workdir).absolute())}
  for run in runs:
    examples = json.dumps([dataclasses.astuple(e) for e in run.examples])
    facts[f"{run.name} settings"] = json.dumps(
        {**run.settings(), "metrics": run.metrics, "batch_size": run.batch_size,
         "retrieval": run.retrieval, "question_encoder": run.question_encoder,
         "devices": run.devices}, sort_keys=True)
    facts[f"{run.name} questions"] = hashlib.sha256(examples.encode()).hexdigest()[:16]
    for file in (Path(run.checkpoint) / "config.json",
                 Path(run.index_dir) / "index" / "index.json",
                 Path(run.index_dir) / "passages" / "store.json"):
      facts[str(file)] = file_fingerprint(file)
  return facts


def ints(values: str | Sequence[int], what: str = "numbers") -> tuple[int, ...]:
  """"5,10,20" or a sequence -> a tuple of positive ints; `what` names the flag or config field
  in the error for anything else."""
  items = values.split(",") if isinstance(values, str) else list(values)
  try:
    out = tuple(int(v) for v in items if str(v).strip())
    if all(v > 0 for v in out):
      return out
  except (TypeError, ValueError):
    pass
  shown = values if isinstance(values, str) else ",".join(map(str, values))
  raise InputError(f"{what}={shown}: expected positive whole numbers separated by commas, "
                   "e.g. 5,10,20")


__all__ = ["EvalRun", "evaluate", "answers_mode", "retrieval_mode", "docs_mode", "retrieve",
           "check_modes", "ints"]
