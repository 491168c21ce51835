"""The world experiments' evaluation: exact match, retrieval recall and index hot-swapping.

:func:`evaluate_row` scores one RAG row (a trained export over its index) on held-out questions;
the default job (:func:`evaluate_job`), the paper in miniature and its FEVER-like rows
(rag_jax.experiments.world.paper, .fever) all score their rows with it. In the default job,
everything is measured on the held-out questions (facts never asked in training):
- exact match of RAG-Sequence, RAG-Token (rag_jax.answer.RagAnswerer with the fine-tuned
  question encoder: where config.rag.retrieval resolves to the devices, as in training, exact
  retrieval over the index's embeddings and decoding in one device program; else the ScaNN
  index searched from the host, then decoding) and the closed-book BART;
- recall@k of the question encoder before RAG training (the retriever's) and after it (each RAG
  export's), over the same ScaNN index: the paper's frozen-vs-fine-tuned comparison (Table 6);
- hot-swap (paper section 4.5): each trained RAG model answers with world 2's index (same frozen
  passage encoder, a share of the held-out facts changed), no retraining; of the changed facts,
  how many answers give the new value and how many still give the old one.

Each row records the decoder that produced its answers as returned by the decoding call
(rag_jax.decoding.DecoderInfo: RAG-Token / RAG-Sequence thorough or fast / BART, beams, passages),
next to the objective the model was trained with and its export's architecture.

The RAG models' held-out answers go through evaluate.py's loop and metric
(rag_jax.evaluation: fixed-shape batches, <model>/heldout_predictions.jsonl, SQuAD exact match;
the world's answers are lower-cased words without articles or punctuation, on which SQuAD's
normalization equals lower-casing). `python evaluate.py --workdir=<a finished run>` re-answers
the same questions from the exports and the saved index (:func:`evaluation_runs`) and prints its
EM beside the report's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from rag_jax import checkpoints, metrics
from rag_jax.decoding.generation import generate
from rag_jax.evaluation import runner, scoring
from rag_jax.evaluation.loop import EvalExample, run_loop
from rag_jax.retrieval.retriever import Retriever
from rag_jax.utils.errors import InputNotFoundError

RAG_MODELS = ("rag_sequence", "rag_token")
QUESTION_TOKENS = 64  # The world's encoders have 64 positions (rag_jax/experiments/world/job.py).


def normalize(text: str) -> str:
  """SQuAD's answer normalization (rag_jax.metrics), as evaluate.py scores answers."""
  return metrics.normalize_answer(text)


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
  """SQuAD exact match against one answer per question."""
  return metrics.exact_match(predictions, [[a] for a in answers])


def chunked(fn: Callable[[list[str]], list[Any]], items: list[str], size: int, desc: str
            ) -> list[Any]:
  """fn over fixed-size chunks (the last padded by repetition, so jitted code compiles once)."""
  out: list[Any] = []
  for start in tqdm(range(0, len(items), size), desc=desc, unit="batch", dynamic_ncols=True):
    chunk = items[start:start + size]
    out.extend(fn(chunk + [chunk[-1]] * (size - len(chunk)))[:len(chunk)])
  return out


def one_decoder(decoders: Iterable[Any]) -> dict[str, Any]:
  """The decoder (a DecoderInfo or its dict) shared by every output of one evaluation row."""
  found = {json.dumps(d if isinstance(d, dict) else d.to_dict(), sort_keys=True)
           for d in decoders}
  if len(found) != 1:
    raise RuntimeError(f"expected one decoder per evaluation row, got {sorted(found)}")
  return json.loads(found.pop())


def heldout_run(workdir: Path, name: str, cfg: Any, reference: dict[str, float] | None = None,
                retrieval: str = "host") -> runner.EvalRun:
  """The held-out questions of the world in `workdir` answered by its workdir/`name`/export, with
  the job's decoding options, recall_ks and answering path (`retrieval`, config.rag.retrieval's
  value): one evaluate.py row (the paper's rows replace its model_type, index, examples...),
  answered on one device (its figures then do not depend on the device count, bit for bit)."""
  world = json.loads((workdir / "world" / "world.json").read_text())
  lines = lambda f: (workdir / "world" / f).read_text().splitlines()  # noqa: E731
  examples = tuple(EvalExample(q, (a,), gold_ids=(g,)) for q, a, g in zip(
      lines("val.source"), lines("val.target"), world["heldout_gold_passages"], strict=True))
  export = workdir / name / "export"
  return runner.EvalRun(
      name=name, examples=examples, checkpoint=str(export), index_dir=str(workdir / "index"),
      model_type=name, n_docs=checkpoints.read_config(export)["n_docs"],
      generate={"num_beams": cfg.num_beams, "max_length": cfg.max_answer_tokens},
      metrics=("exact_match",), batch_size=cfg.batch_size, recall_ks=tuple(cfg.recall_ks),
      reference=reference or {}, reference_label="train.py's report",
      max_question_length=QUESTION_TOKENS, retrieval=retrieval, devices=1)


def evaluation_runs(config: Any, workdir: str | Path) -> list[runner.EvalRun]:
  """evaluate.py's rows for a finished default run: RAG-Sequence and RAG-Token on the held-out
  questions, from the exports and the saved index, beside the EM in its report.json."""
  workdir = Path(workdir)
  if not (workdir / "report.json").exists():
    raise InputNotFoundError(f"{workdir}: no report.json; evaluate.py --config=configs/default.py "
                            "reads a finished `python train.py` run (give its --workdir)")
  report = json.loads((workdir / "report.json").read_text())
  return [heldout_run(workdir, name, config.eval, {"exact_match": report[name]["heldout_em"]},
                      retrieval=config.rag.retrieval) for name in RAG_MODELS]


def search_ids(retriever: Retriever, questions: list[str], k: int, batch: int, desc: str
               ) -> list[list[str]]:
  """DPR ids of each question's top-k passages, best first, in fixed-size batches."""

  def ids(chunk: list[str]) -> list[list[str]]:
    rows = retriever.search(*retriever.tokenize(chunk), k)[1]  # [B, k] store rows
    return [[retriever.store.doc_id(int(r)) for r in row] for row in rows]

  return chunked(ids, questions, batch, desc)


def recall_at_k(retrieved_ids: Sequence[Sequence[str]], gold_ids: Sequence[str],
                ks: Sequence[int]) -> dict[str, float]:
  """{"recall@k": share of questions whose one gold passage id is among their first k}
  (rag_jax.metrics.id_recall_at_k, keyed as the reports print it)."""
  found = metrics.id_recall_at_k(retrieved_ids, [[g] for g in gold_ids], ks)
  return {f"recall@{k}": v for k, v in found.items()}


@dataclasses.dataclass(frozen=True)
class SwapQuestions:
  """The held-out questions whose fact world 2 changed, to be answered over world 2's index
  (paper section 4.5): their rows among the held-out questions and both worlds' answers."""

  index_dir: Path
  rows: list[int]
  old: list[str]  # world 1's answers
  new: list[str]  # world 2's answers


@dataclasses.dataclass(frozen=True)
class HotSwap:
  """Counts over the `changed` facts: answers over world 2's index that give world 2's value
  (follow_new_index) or still world 1's (keep_old_answer); answers over world 1's index that
  give world 1's value (old_index_gave_old_answer) or world 2's (old_index_gave_new_answer)."""

  changed: int
  follow_new_index: int
  keep_old_answer: int
  old_index_gave_old_answer: int
  old_index_gave_new_answer: int
  decoder: dict[str, Any]

  def share(self, count: int) -> float:
    return count / max(self.changed, 1)


@dataclasses.dataclass(frozen=True)
class RowScores:
  """One RAG row on held-out questions: SQuAD exact match of its answers (the predictions file
  of `run`), recall@k of its question encoder over its index (the questions with a gold
  passage), the decoder that ran, and the hot-swap counts where measured."""

  em: float
  recall: dict[str, float]
  decoder: dict[str, Any]
  hot_swap: HotSwap | None = None

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> RowScores:
    swap = d.get("hot_swap")
    return cls(**{**d, "hot_swap": HotSwap(**swap) if swap else None})


def evaluate_row(run: runner.EvalRun, predictions: Path, swap: SwapQuestions | None = None
                 ) -> tuple[RowScores, list[dict[str, Any]]]:
  """(scores, records) of one RAG row (see :class:`RowScores`): `run`'s examples answered with
  evaluate.py's loop into `predictions` (resumed where it holds some; a record per example, with
  its `prediction` and `correct`), recall at run.recall_ks of run.checkpoint's question encoder
  over run.index_dir, and with `swap` the hot-swap counts."""
  answerer = runner.load_answerer(run)
  records = run_loop(run.examples, runner.answer_predictor(answerer, run), predictions,
                     run.batch_size, correct=scoring.correct_fn(run.metrics),
                     desc=f"answers ({run.name})")
  predicted = [r["prediction"] for r in records]
  gold = [e for e in run.examples if e.gold_ids]
  found = search_ids(answerer.retriever, [e.question for e in gold], max(run.recall_ks),
                     run.batch_size, f"recall ({run.name})")
  scores = RowScores(em=scoring.METRICS["exact_match"](records),
                     recall=recall_at_k(found, [e.gold_ids[0] for e in gold], run.recall_ks),
                     decoder=one_decoder(r["decoder"] for r in records))
  if swap is None:
    return scores, records
  swapped = runner.load_answerer(dataclasses.replace(run, index_dir=str(swap.index_dir)))
  answered = chunked(lambda qs: swapped(qs, **run.generate),
                     [run.examples[r].question for r in swap.rows], run.batch_size,
                     f"hot-swap ({run.name})")
  before = [normalize(predicted[r]) for r in swap.rows]
  after = [normalize(a.text) for a in answered]
  old, new = [normalize(a) for a in swap.old], [normalize(a) for a in swap.new]
  agree = lambda xs, ys: sum(x == y for x, y in zip(xs, ys, strict=True))  # noqa: E731
  hot_swap = HotSwap(changed=len(swap.rows), follow_new_index=agree(after, new),
                     keep_old_answer=agree(after, old),
                     old_index_gave_old_answer=agree(before, old),
                     old_index_gave_new_answer=agree(before, new),
                     decoder=one_decoder(a.decoder for a in answered))
  return dataclasses.replace(scores, hot_swap=hot_swap), records


def swap_questions(workdir: Path, index_dir: Path) -> SwapQuestions:
  """The changed held-out facts of the world in `workdir` (world/), over `index_dir`."""
  world = json.loads((workdir / "world" / "world.json").read_text())
  lines = lambda f: (workdir / "world" / f).read_text().splitlines()  # noqa: E731
  rows = world["changed_heldout_rows"]
  old, new = lines("val.target"), lines("val_swapped.target")
  return SwapQuestions(index_dir, rows, [old[r] for r in rows], [new[r] for r in rows])


def evaluate_job(workdir: Path, world: dict[str, Any], cfg: Any, retrieval: str = "host"
                 ) -> dict[str, Any]:
  """Every figure of the report's evaluation part (see the module docstring); `retrieval`: the
  answering path of the RAG models (RagAnswerer's, config.rag.retrieval in the job)."""
  questions = (workdir / "world" / "val.source").read_text().splitlines()
  answers = (workdir / "world" / "val.target").read_text().splitlines()
  ks = tuple(cfg.recall_ks)
  gen_kwargs = dict(num_beams=cfg.num_beams, max_length=cfg.max_answer_tokens)
  out: dict[str, Any] = {"heldout_questions": len(questions),
                         "changed_facts": len(world["changed_heldout_rows"]),
                         "majority_em": world["heldout_majority_em"],
                         "decoding_options": gen_kwargs}

  # Recall of the retriever's question encoder (before RAG training).
  retriever = Retriever.load(workdir / "index", workdir / "retriever" / "question_encoder",
                             max_length=QUESTION_TOKENS)
  found = search_ids(retriever, questions, max(ks), cfg.batch_size, "recall (retriever)")
  out["recall_before"] = recall_at_k(found, world["heldout_gold_passages"], ks)

  for name in RAG_MODELS:
    export = workdir / name / "export"
    scores, records = evaluate_row(heldout_run(workdir, name, cfg, retrieval=retrieval),
                                   workdir / name / "heldout_predictions.jsonl",
                                   swap_questions(workdir, workdir / "index_swapped"))
    predicted = [r["prediction"] for r in records]
    out[name] = {
        "trained_as": json.loads((workdir / name / "report.json").read_text())["model_type"],
        "export_architecture": checkpoints.read_config(export)["architectures"][0],
        **dataclasses.asdict(scores),
        "examples": [{"question": q, "answer": a, "predicted": p}
                     for q, a, p in list(zip(questions, answers, predicted, strict=True))[:5]],
    }

  # Closed book: the same BART size and steps, question -> answer, no retrieval.
  em, decoder = closed_book_answers(workdir, cfg)
  out["closed_book"] = {"decoder": decoder, "em": em,
                        "train_examples_em_note": "see closed_book/report.json"}
  return out


def closed_book_answers(workdir: Path, cfg: Any) -> tuple[float, dict[str, Any]]:
  """(held-out EM, decoder) of workdir/closed_book's export: question -> answer, no retrieval."""
  lines = lambda name: (workdir / "world" / name).read_text().splitlines()  # noqa: E731
  questions, answers = lines("val.source"), lines("val.target")
  gen_kwargs = dict(num_beams=cfg.num_beams, max_length=cfg.max_answer_tokens)
  model, params = checkpoints.load_pretrained(workdir / "closed_book" / "export")
  tok = checkpoints.load_tokenizer(workdir / "closed_book" / "export")

  decoders: list[Any] = []

  def closed_book(chunk: list[str]) -> list[str]:
    enc = tok(chunk, padding="max_length", max_length=QUESTION_TOKENS, truncation=True)
    result = generate(model, params, np.asarray(enc["input_ids"]),
                      np.asarray(enc["attention_mask"]), **gen_kwargs)
    decoders.append(result.decoder)
    return tok.batch_decode(result.sequences, skip_special_tokens=True)

  predicted = chunked(closed_book, questions, cfg.batch_size, "answers (closed book)")
  return exact_match(predicted, answers), one_decoder(decoders)


def closed_book_em(workdir: Path, cfg: Any) -> float:
  """The closed book's held-out EM (see :func:`closed_book_answers`)."""
  return closed_book_answers(workdir, cfg)[0]
