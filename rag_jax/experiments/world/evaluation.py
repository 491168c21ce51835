"""The default job's evaluation: exact match, retrieval recall and index hot-swapping.

Everything is measured on the held-out questions (facts never asked in training):
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

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from rag_jax import checkpoints, metrics
from rag_jax.answer import RagAnswerer
from rag_jax.decoding.generation import generate
from rag_jax.evaluation import runner, scoring
from rag_jax.evaluation.loop import EvalExample, run_loop
from rag_jax.retrieval.retriever import Retriever
from rag_jax.retrieval.store import PassageStore
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
  """The held-out questions of the world in `workdir` answered by its `name` export, with the
  job's decoding options and answering path (`retrieval`, config.rag.retrieval's value): one
  evaluate.py row."""
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
      max_question_length=QUESTION_TOKENS, retrieval=retrieval)


def evaluation_runs(config: Any, workdir: str | Path) -> list[runner.EvalRun]:
  """evaluate.py's rows for a finished default run: RAG-Sequence and RAG-Token on the held-out
  questions, from the exports and the saved index, beside the EM in its report.json."""
  workdir = Path(workdir)
  if not (workdir / "report.json").exists():
    raise InputNotFoundError(f"{workdir}: no report.json; evaluate.py --config=configs/default.py "
                            "reads a finished `python train.py` run (give its --workdir)")
  report = json.loads((workdir / "report.json").read_text())
  return [heldout_run(workdir, name, config.eval, {"exact_match": report[name]["heldout_em"]},
                      retrieval=config.rag.get("retrieval", "host")) for name in RAG_MODELS]


def gold_rows(store: Any, ids: Sequence[str]) -> np.ndarray:
  """Passage-store rows of the DPR ids `ids`."""
  row_of = {store.doc_id(r): r for r in range(len(store))}
  return np.asarray([row_of[i] for i in ids])


def recall(rows: np.ndarray, gold: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
  """recall@k: share of questions whose gold passage is among the first k retrieved rows."""
  hit = rows == gold[:, None]  # [Q, K]
  return {f"recall@{k}": float(hit[:, :k].any(axis=1).mean()) for k in ks}


def search_rows(retriever: Retriever, questions: list[str], k: int, batch: int, desc: str
                ) -> np.ndarray:
  """Store rows [Q, k] of each question's top-k passages, in fixed-size batches."""

  def rows(chunk: list[str]) -> list[np.ndarray]:
    ids, mask = retriever.tokenize(chunk)
    return list(retriever.search(ids, mask, k)[1])

  return np.stack(chunked(rows, questions, batch, desc))


def evaluate_job(workdir: Path, world: dict[str, Any], cfg: Any, retrieval: str = "host"
                 ) -> dict[str, Any]:
  """Every figure of the report's evaluation part (see the module docstring); `retrieval`: the
  answering path of the RAG models (RagAnswerer's, config.rag.retrieval in the job)."""

  lines = lambda name: (workdir / "world" / name).read_text().splitlines()  # noqa: E731
  questions, answers = lines("val.source"), lines("val.target")
  swapped = lines("val_swapped.target")
  changed = world["changed_heldout_rows"]
  ks = tuple(cfg.recall_ks)
  store = PassageStore(workdir / "index" / "passages")
  gold = gold_rows(store, world["heldout_gold_passages"])
  gen_kwargs = dict(num_beams=cfg.num_beams, max_length=cfg.max_answer_tokens)
  out: dict[str, Any] = {"heldout_questions": len(questions), "changed_facts": len(changed),
                         "majority_em": world["heldout_majority_em"],
                         "decoding_options": gen_kwargs}

  # Recall of the retriever's question encoder (before RAG training).
  retriever = Retriever.load(workdir / "index", workdir / "retriever" / "question_encoder",
                             max_length=QUESTION_TOKENS)
  rows = search_rows(retriever, questions, max(ks), cfg.batch_size, "recall (retriever)")
  out["recall_before"] = recall(rows, gold, ks)

  for name in RAG_MODELS:
    export = workdir / name / "export"
    answerer = RagAnswerer(export, workdir / "index", max_question_length=QUESTION_TOKENS,
                           retrieval=retrieval)
    rows = search_rows(answerer.retriever, questions, max(ks), cfg.batch_size,
                       f"recall ({name})")
    run = heldout_run(workdir, name, cfg, retrieval=retrieval)
    records = run_loop(run.examples, runner.answer_predictor(answerer, run),
                       workdir / name / "heldout_predictions.jsonl", run.batch_size,
                       correct=scoring.correct_fn(run.metrics), desc=f"answers ({name})")
    predicted = [r["prediction"] for r in records]
    swapped_answerer = RagAnswerer(export, workdir / "index_swapped",
                                   max_question_length=QUESTION_TOKENS, retrieval=retrieval)
    changed_q = [questions[r] for r in changed]
    swap_answered = chunked(lambda qs, a=swapped_answerer: a(qs, **gen_kwargs), changed_q,
                            cfg.batch_size, f"hot-swap ({name})")
    after_swap = [a.text for a in swap_answered]
    new = [normalize(swapped[r]) for r in changed]
    old = [normalize(answers[r]) for r in changed]
    after_swap = [normalize(p) for p in after_swap]
    before_swap = [normalize(predicted[r]) for r in changed]
    out[name] = {
        "trained_as": json.loads((workdir / name / "report.json").read_text())["model_type"],
        "export_architecture": checkpoints.read_config(export)["architectures"][0],
        "decoder": one_decoder(r["decoder"] for r in records),
        "em": scoring.METRICS["exact_match"](records),
        "recall_after": recall(rows, gold, ks),
        "hot_swap": {
            "changed": len(changed),
            "follow_new_index": sum(p == a for p, a in zip(after_swap, new, strict=True)),
            "keep_old_answer": sum(p == a for p, a in zip(after_swap, old, strict=True)),
            "old_index_gave_old_answer": sum(p == a for p, a in zip(before_swap, old, strict=True)),
            "decoder": one_decoder(a.decoder for a in swap_answered),
        },
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
