"""`python train.py`'s default job (configs/default.py): a small RAG trained from nothing on a
synthetic knowledge world, measured against a closed-book BART (docs/world.md).

`train_and_evaluate(config, workdir)` runs these phases with the world experiments' phase runner
(rag_jax.experiments.world.phases), each shown with a progress bar, each recorded in
workdir/phases.json with its wall time once complete (a rerun skips finished phases; a phase
killed in the middle resumes from its own checkpoints or starts again):

  world        rag_jax.experiments.world.data: passages (DPR format), questions, held-out
               split, world 2
  tokenizer    rag_jax.experiments.world.tokenizer, trained on the world, saved in tokenizer/
  retriever    DPR dual encoder, in-batch negatives (rag_jax.training.retriever_trainer)
  index        passages encoded + ScaNN index (rag_jax.commands.build_index's pipeline), for
               world 1 (index/) and world 2 (index_swapped/, same frozen passage encoder)
  rag_sequence RAG-Sequence fine-tuning from that retriever and a fresh BART
               (rag_jax.training.rag_trainer), exported as RagSequenceForGeneration
  rag_token    the same with RAG-Token's marginalisation, exported as RagTokenForGeneration
  closed_book  the same BART size and steps on question -> answer (rag_jax.training.seq2seq)
  evaluation   held-out exact match (answers decoded with rag_jax.answer / decoding, each
               model with its own kind's decoder, recorded in the report), recall@k of the
               question encoder before and after RAG training, index hot-swap (the row
               evaluator of rag_jax.experiments.world.evaluation)

The report (report.json, report.md, printed) holds every figure. A workdir holding a finished
run is not retrained: the report is printed again. A workdir holding another config is refused,
unless only the `eval` group differs (evaluation settings, rag_jax.training.loop.EVALUATION_ONLY):
then the trained models are kept and the evaluation phase runs again with the new settings. The
config is validated before any phase, the fields bounded by the number of passages (rag.n_docs,
eval.recall_ks) against the world's, computed from the config.

On several processes (rag_jax.distributed, docs/distributed.md) the processes first agree on the
config and workdir; process 0 holds the lock and writes train.log, phases.json and the report.
world, tokenizer and evaluation run on process 0 alone (the others wait); the retriever, the
RAG models and the closed book train data parallel over every process's devices; the index
phase encodes the passages' shards by process, then process 0 builds the ScaNN index.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from transformers import AutoTokenizer

from rag_jax import checkpoints
from rag_jax.data.sampling import epoch_rows
from rag_jax.distributed import alone, check_same, is_primary, on_primary, process_count
from rag_jax.experiments.world import evaluation as world_eval
from rag_jax.experiments.world import report as world_report
from rag_jax.experiments.world.data import WorldConfig, build_world, generate_world
from rag_jax.experiments.world.phases import Phase, PhaseLog, run_phases
from rag_jax.experiments.world.tokenizer import train_tokenizer, world_texts
from rag_jax.models import presets
from rag_jax.models.bart import BartForConditionalGeneration, shift_tokens_right
from rag_jax.models.rag import RagConfig, RagModel
from rag_jax.parallel import data_mesh
from rag_jax.retrieval.backends import load_index
from rag_jax.retrieval.corpus import read_dpr_tsv
from rag_jax.retrieval.encode import EncodeConfig
from rag_jax.retrieval.pipeline import build_from_corpus, encode_corpus
from rag_jax.training import config_check, loop, rag_trainer, seq2seq
from rag_jax.training.retriever_trainer import bm25_hard_negatives, default_config, train_retriever
from rag_jax.utils.atomic import atomic_directory
from rag_jax.utils.logs import workdir_logging

log = logging.getLogger(__name__)
PHASES = ("world", "tokenizer", "retriever", "index", "rag_sequence", "rag_token", "closed_book",
          "evaluation")
PRIMARY_PHASES = ("world", "tokenizer", "evaluation")  # several processes: process 0's alone
AGREE_TIMEOUT_S = 600  # several processes: how long each waits for the others' steps


@dataclasses.dataclass
class Job:
  """Paths and lazily loaded pieces shared by the phases."""

  config: ml_collections.ConfigDict
  workdir: Path
  phases: PhaseLog

  @property
  def world_dir(self) -> Path:
    return self.workdir / "world"

  def world_meta(self) -> dict[str, Any]:
    return json.loads((self.world_dir / "world.json").read_text())

  def tokenizer(self):
    return AutoTokenizer.from_pretrained(str(self.workdir / "tokenizer"), local_files_only=True)

  def lengths(self) -> dict[str, int]:
    return self.phases.result("tokenizer")["lengths"]


# --------------------------------------------------------------------------- phases


def phase_world(job: Job) -> dict[str, Any]:
  meta = build_world(WorldConfig(**job.config.world.to_dict()), job.world_dir)
  keys = ("people", "facts", "passages", "distractor_passages", "train_questions",
          "heldout_questions", "train_facts", "heldout_majority_em")
  return {k: meta[k] for k in keys} | {"changed_heldout": len(meta["changed_heldout_rows"])}


def _passages(path: Path) -> dict[str, tuple[str, str]]:
  return {p.id: (p.title, p.text) for p in read_dpr_tsv(path)}


def phase_tokenizer(job: Job, more_worlds: tuple[Path, ...] = ()) -> dict[str, Any]:
  """Trains the tokenizer and measures the lengths every later phase pads to (the longest
  question, answer and generator input of the world, with specials). more_worlds: other world
  directories (the shifted world's) whose passages join the training texts and the lengths."""
  cfg = job.config.tokenizer
  tok = train_tokenizer([t for d in (job.world_dir, *more_worlds) for t in world_texts(d)],
                        cfg.kind, cfg.vocab_size)
  with atomic_directory(job.workdir / "tokenizer") as tmp:
    tok.save_pretrained(str(tmp))
  lines = lambda name: (job.world_dir / name).read_text().splitlines()  # noqa: E731
  questions = lines("train.source") + lines("val.source")
  answers = lines("train.target") + lines("val.target") + lines("val_swapped.target")
  longest = lambda texts: max(len(ids) for ids in tok(texts)["input_ids"])  # noqa: E731
  passages = [p for d in (job.world_dir, *more_worlds)
              for name in ("passages.tsv", "passages_swapped.tsv")
              for p in _passages(d / name).values()]
  passage_part = max(len(ids) for ids in tok([f"{t} / {x} //" for t, x in passages],
                                             add_special_tokens=False)["input_ids"])
  question_part = max(len(ids) for ids in tok(questions, add_special_tokens=False)["input_ids"])
  lengths = {"question": longest(questions), "answer": longest(answers),
             "passage": max(len(ids) for ids in tok([t for t, _ in passages],
                                                    [x for _, x in passages])["input_ids"]),
             "combined": passage_part + question_part + 2}
  return {"vocab_size": len(tok), "kind": cfg.kind, "lengths": lengths}


def _encoder_config(job: Job):
  c = job.config.retriever
  return presets.question_encoder_config(
      "tiny", vocab_size=job.phases.result("tokenizer")["vocab_size"], hidden_size=c.hidden_size,
      num_hidden_layers=c.layers, num_attention_heads=c.heads,
      intermediate_size=c.ffn_dim, hidden_dropout_prob=c.dropout,
      attention_probs_dropout_prob=c.dropout, pad_token_id=1, max_position_embeddings=64)


def phase_retriever(job: Job) -> dict[str, Any]:
  c = job.config.retriever
  passages = _passages(job.world_dir / "passages.tsv")
  questions = (job.world_dir / "train.source").read_text().splitlines()
  gold = [passages[pid] for pid in job.world_meta()["train_gold_passages"]]
  lengths = job.lengths()
  negatives = None
  if c.hard_negatives:  # DPR's recipe; the BM25 index of the paper experiment.
    negatives = _bm25_negatives(job, questions, passages)
  result = train_retriever(
      questions, [t for t, _ in gold], [x for _, x in gold], job.tokenizer(), _encoder_config(job),
      default_config(batch_size=c.batch_size, num_train_steps=c.num_train_steps,
                     learning_rate=c.learning_rate, warmup_steps=c.warmup_steps,
                     max_question_length=lengths["question"],
                     max_passage_length=lengths["passage"], seed=job.config.seed,
                     hard_negatives=negatives is not None,
                     question_eda=c.question_eda),
      out=job.workdir / "retriever", hard_negatives=negatives)
  return {"loss_first": result.losses[0][1], "loss_last": result.losses[-1][1],
          "chance_loss": float(np.log(c.batch_size)), "steps": c.num_train_steps}


def _bm25_negatives(job: Job, questions: list[str], passages: dict[str, tuple[str, str]]
                    ) -> tuple[list[str], list[str]]:
  """(titles, texts) of each training question's BM25 hard negative (workdir/index_bm25)."""
  index = load_index(job.workdir / "index_bm25" / "index")
  ids = list(passages)  # Store rows = corpus order (read_dpr_tsv).
  text = lambda r: " ".join(passages[ids[r]])  # noqa: E731
  row_of = {pid: r for r, pid in enumerate(ids)}
  gold = np.asarray([row_of[p] for p in job.world_meta()["train_gold_passages"]])
  answers = (job.world_dir / "train.target").read_text().splitlines()
  rows = bm25_hard_negatives(index, questions, answers, gold, text)
  rows = np.where(rows < 0, (gold + 1) % len(ids), rows)  # None found: a neighbouring passage.
  return [passages[ids[r]][0] for r in rows], [passages[ids[r]][1] for r in rows]


def phase_index(job: Job) -> dict[str, Any]:
  out = {}
  for corpus, name in (("passages.tsv", "index"), ("passages_swapped.tsv", "index_swapped")):
    index = _build_index(job.world_dir / corpus, job.workdir / name,
                         str(job.workdir / "retriever" / "context_encoder"),
                         EncodeConfig(batch_size=256, max_length=job.lengths()["passage"],
                                      length_bucket=8))
    if index is not None:  # several processes: process 0's result only
      out[name] = {"passages": index.count, "dim": index.dim, "kind": index.kind}
  return out


def _build_index(corpus: Path, out: Path, encoder: str, encode_config: EncodeConfig):
  """The ScaNN index of `corpus` in `out`, the passages encoded on one device per process (a
  few thousand: the embeddings then do not depend on how many devices a process has, bit for
  bit). Several processes: each encodes its shards of the passages (in place in `out`), then
  process 0 alone builds the index from them, as build_index does; None on the others."""
  mesh = data_mesh(jax.local_devices()[:1])

  def build():
    return build_from_corpus(corpus, out, encoder=encoder, split_words=None,
                             index_type="scann", encode_config=encode_config, mesh=mesh)
  if process_count() == 1:
    return build()
  encode_corpus(corpus, out, encoder=encoder, split_words=None, encode_config=encode_config,
                mesh=mesh)
  built = []

  def index_stage() -> None:
    with alone():
      built.append(build())
  on_primary(f"world/{out.name}", index_stage, AGREE_TIMEOUT_S)
  return built[0] if built else None


def _rag_config(job: Job, model_type: str) -> ml_collections.ConfigDict:
  """config.rag (a RAG trainer config, configs/rag_finetune.py's shape) with this run's
  objective, paths, seed and the lengths measured on the world."""
  cfg = ml_collections.ConfigDict(job.config.rag.to_dict())
  lengths = job.lengths()
  cfg.model_type = model_type
  cfg.rag_checkpoint = str(job.workdir / "rag_init")
  cfg.index_dir = str(job.workdir / "index")
  cfg.data_dir = str(job.world_dir)
  cfg.max_source_length = lengths["question"]
  # The answer with its specials, plus the decoder start token when it is prepended.
  cfg.max_target_length = lengths["answer"] + int(cfg.prepend_decoder_start)
  cfg.max_combined_length = lengths["combined"]
  # The context encoder that built the index (trained only with config.rag.train_context_encoder).
  cfg.context_encoder_checkpoint = str(job.workdir / "retriever" / "context_encoder")
  cfg.context_encoder_max_length = lengths["passage"]
  cfg.seed = job.config.seed
  return cfg


def _generator_config(job: Job, vocab_size: int | None = None):
  """The fresh BART (vocab_size: the world tokenizer's unless given). Its decoder starts from
  <s> (id 0) and writes `<s> answer </s>`; with config.rag.prepend_decoder_start the RAG phases
  train on `<s> <s> answer </s>`, reading the decoder as generation does (BART's usual start
  </s>, id 2, did not learn to copy; see docs/world.md)."""
  g = job.config.generator
  return presets.generator_config(
      "tiny", vocab_size=vocab_size or job.phases.result("tokenizer")["vocab_size"],
      d_model=g.d_model,
      encoder_layers=g.layers, decoder_layers=g.layers, encoder_attention_heads=g.heads,
      decoder_attention_heads=g.heads, encoder_ffn_dim=g.ffn_dim, decoder_ffn_dim=g.ffn_dim,
      dropout=g.dropout, attention_dropout=0.0, activation_dropout=0.0,
      max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
      decoder_start_token_id=0, forced_eos_token_id=2)


def init_rag_checkpoint(job: Job, path: Path | None = None, generator_tokenizer: Any = None
                        ) -> None:
  """path (default workdir/rag_init): the trained question encoder + a fresh BART, as one RAG
  checkpoint.

  Both RAG phases start from it. It is saved as transformers' RagModel (the question encoder and
  generator without a generation kind); each phase trains, exports and decodes it as its own
  objective's class (rag_jax.training.rag_trainer.load_model). generator_tokenizer: the world
  tokenizer with added tokens (the FEVER rows' label words), whose length sets BART's vocabulary;
  the question encoder keeps the world tokenizer."""
  path = path or job.workdir / "rag_init"
  if (path / "config.json").exists():
    return
  q_model, q_params = checkpoints.load_pretrained(job.workdir / "retriever" / "question_encoder")
  gen = _generator_config(job, len(generator_tokenizer) if generator_tokenizer else None)
  config = RagConfig(question_encoder=q_model.config, generator=gen, n_docs=job.config.rag.n_docs,
                     retrieval_vector_size=q_model.config.embedding_dim,
                     architecture="RagModel")
  model = RagModel(config)
  bart = BartForConditionalGeneration(gen)
  ids = jnp.ones((1, 4), jnp.int32)
  g_params = jax.jit(bart.init)(jax.random.key(job.config.seed), ids, ids, ids)["params"]
  tok = job.tokenizer()
  checkpoints.save_pretrained(model, {"question_encoder": q_params, "generator": g_params}, path,
                              tokenizer=checkpoints.RagTokenizers(tok, generator_tokenizer or tok))


def train_rag_row(job: Job, model_type: str, name: str | None = None,
                  **overrides: Any) -> dict[str, Any]:
  """Trains one RAG model of the job into workdir/<name> (default: model_type) from rag_init,
  with config.rag's fields replaced by `overrides` (e.g. retriever_kind="bm25",
  index_dir=..., frozen_groups=("question_encoder",)): the paper experiment's rows."""
  on_primary("world/rag_init", lambda: init_rag_checkpoint(job), AGREE_TIMEOUT_S)
  name = name or model_type
  config = _rag_config(job, model_type)
  config.update(overrides)
  report = rag_trainer.train_and_evaluate(config, str(job.workdir / name))
  metrics = [json.loads(x) for x in
             (job.workdir / name / "metrics.jsonl").read_text().splitlines() if x]
  return {**report, "loss_first": metrics[0]["loss"], "loss_last": metrics[-1]["loss"],
          "steps_per_s": _steps_per_s(metrics)}


def _steps_per_s(metrics: list[dict[str, Any]]) -> float:
  """Steady-state training speed: steps per second between the first and the last metric line
  of the last (re)start of the loop, so that compilation (in each start's first window) is left
  out. elapsed_s counts from the loop's (re)start and falls where a killed run resumed."""
  run = metrics[-1:]
  for line in reversed(metrics[:-1]):
    if line["elapsed_s"] >= run[0]["elapsed_s"]:
      break
    run.insert(0, line)
  first, last = run[0], run[-1]
  if len(run) < 2:
    return float(last["steps_per_s"])
  return (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"])


def phase_rag_sequence(job: Job) -> dict[str, Any]:
  return train_rag_row(job, "rag_sequence")


def phase_rag_token(job: Job) -> dict[str, Any]:
  return train_rag_row(job, "rag_token")


def _closed_book_config(job: Job) -> ml_collections.ConfigDict:
  """The generator trainer reads the optimizer and loop fields of the RAG config (the same
  names), so the closed book trains with the RAG models' batch, steps and schedule."""
  cfg = ml_collections.ConfigDict(job.config.rag.to_dict())
  cfg.group_learning_rates = ml_collections.ConfigDict()  # BART alone: no question encoder.
  cfg.seed = job.config.seed
  return cfg


def _qa_batches(tok, questions: list[str], answers: list[str], lengths: dict[str, int],
                decoder_start_token_id: int):
  """input_ids/attention_mask [N, S], decoder_input_ids/labels [N, T] for BART on QA: the
  decoder reads `start <s> answer` and predicts `<s> answer </s>` (BART's fine-tuning layout)."""
  q = tok(questions, max_length=lengths["question"], padding="max_length", truncation=True)
  a = tok(answers, max_length=lengths["answer"], padding="max_length", truncation=True)
  labels = np.asarray(a["input_ids"], np.int32)
  return {"input_ids": np.asarray(q["input_ids"], np.int32),
          "attention_mask": np.asarray(q["attention_mask"], np.int32),
          "decoder_input_ids": np.asarray(shift_tokens_right(jnp.asarray(labels), 1,
                                                        decoder_start_token_id)),
          "labels": labels}


def phase_closed_book(job: Job) -> dict[str, Any]:
  config = _closed_book_config(job)
  tok = job.tokenizer()
  lines = lambda name: (job.world_dir / name).read_text().splitlines()  # noqa: E731
  gen = _generator_config(job)
  train, val = (_qa_batches(tok, lines(f"{split}.source"), lines(f"{split}.target"),
                            job.lengths(), gen.decoder_start_token_id)
                for split in ("train", "val"))
  n_val = len(val["labels"]) // config.batch_size * config.batch_size
  task = seq2seq.Seq2SeqTask(
      BartForConditionalGeneration(gen),
      lambda step: {k: v[epoch_rows(config.seed, step, len(train["labels"]),
                                     config.batch_size)] for k, v in train.items()},
      lambda: [{k: v[i:i + config.batch_size] for k, v in val.items()}
               for i in range(0, n_val, config.batch_size)],
      "closed-book BART: question -> answer", tokenizer=tok)
  report = seq2seq.train_and_evaluate(config, str(job.workdir / "closed_book"), task=task)
  metrics = [json.loads(x) for x in
             (job.workdir / "closed_book" / "metrics.jsonl").read_text().splitlines() if x]
  return {**report, "loss_first": metrics[0]["loss"], "loss_last": metrics[-1]["loss"],
          "steps_per_s": _steps_per_s(metrics)}


def phase_evaluation(job: Job) -> dict[str, Any]:
  return world_eval.evaluate_job(job.workdir, job.world_meta(), job.config.eval,
                                 retrieval=job.config.rag.retrieval)


PHASE_FUNCTIONS: dict[str, Callable[[Job], dict[str, Any]]] = {
    "world": phase_world, "tokenizer": phase_tokenizer, "retriever": phase_retriever,
    "index": phase_index, "rag_sequence": phase_rag_sequence, "rag_token": phase_rag_token,
    "closed_book": phase_closed_book, "evaluation": phase_evaluation}


def _summary_world(r: dict[str, Any]) -> str:
  return (f"{r['people']} people, {r['passages']} passages, {r['train_questions']} training / "
          f"{r['heldout_questions']} held-out questions, {r['changed_heldout']} facts changed "
          "in world 2")


def _summary_rag(r: dict[str, Any]) -> str:
  return (f"loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}, {r['steps_per_s']:.2f} "
          "steps/s, exported")


PHASE_SUMMARIES: dict[str, Callable[[dict[str, Any]], str]] = {
    "world": _summary_world,
    "tokenizer": lambda r: f"{r['kind']}, {r['vocab_size']} tokens, lengths {r['lengths']}",
    "retriever": lambda r: (f"in-batch loss {r['loss_first']:.3f} -> {r['loss_last']:.3f} "
                            f"(chance {r['chance_loss']:.3f})"),
    "index": lambda r: ", ".join(f"{k}: {v['kind']} {v['passages']} x {v['dim']}"
                                 for k, v in r.items()),
    "rag_sequence": _summary_rag, "rag_token": _summary_rag,
    "closed_book": _summary_rag,
    "evaluation": lambda r: ", ".join(
        [f"{m} EM {r[m]['em']:.3f}" for m in ("rag_sequence", "rag_token", "closed_book")]),
}


# --------------------------------------------------------------------------- entry


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after_phase: str | None = None) -> dict[str, Any] | None:
  """Runs (or resumes) every phase in `workdir`; returns the report (see the module docstring).

  stop_after_phase: end after that phase, as a kill would (the next call resumes).
  """
  config_check.validate(config, "world")
  config_check.check_index_size(config, "world", world_passages(config.world),
                                "the world of config.world")
  workdir = Path(workdir)
  check_same("world/facts", {"config": config.to_json_best_effort(sort_keys=True),
                             "workdir": str(workdir.absolute())}, AGREE_TIMEOUT_S,
             "every process must run one config in one workdir")
  with loop.claimed_workdir(config, workdir, "world/workdir", AGREE_TIMEOUT_S, log_file=False,
                            on_evaluation_change=lambda _: forget_evaluation(workdir)):
    return _run(config, workdir, stop_after_phase)


def world_passages(world_config: ml_collections.ConfigDict) -> int:
  """The number of passages of the world (and of its index) that `world_config` describes,
  computed before any phase (a pure function of the config; hundredths of a second)."""
  return len(generate_world(WorldConfig(**world_config.to_dict()), progress=False).passages)


def forget_evaluation(workdir: Path, phases: tuple[str, ...] = ("evaluation",),
                      files: tuple[str, ...] = ("report.json", "report.md",
                                                *(f"{m}/heldout_predictions.jsonl"
                                                  for m in world_eval.RAG_MODELS))) -> None:
  """Discards what the evaluation phase made with the evaluation settings recorded in the
  workdir (their entry in phases.json, the report and the held-out predictions, which a rerun
  would otherwise resume), so that the next run evaluates the trained models with the new ones
  (rag_jax.training.loop.check_workdir calls it when only evaluation fields changed)."""
  phase_log = PhaseLog(workdir)
  if any(phase_log.done(p) for p in phases):
    phase_log.forget(phases)
  for name in files:
    (workdir / name).unlink(missing_ok=True)


def _run(config: ml_collections.ConfigDict, workdir: Path, stop_after_phase: str | None
         ) -> dict[str, Any] | None:
  """The phases, or the finished run's report, with the workdir locked and its config checked."""
  report_path = workdir / "report.json"
  if report_path.exists():
    report = json.loads(report_path.read_text())
    print(f"{workdir} holds a finished run (report.json, report.md); not retraining. Use "
          "another --workdir for a new run.\n")
    print((workdir / "report.md").read_text())
    return report
  with (workdir_logging(workdir) if is_primary() else contextlib.nullcontext()) as log_file:
    print(f"rag_jax default job in {workdir} (logs: {log_file or 'here'}, metrics: "
          "*/metrics.jsonl)", flush=True)
    phases = PhaseLog(workdir)
    job = Job(config, workdir, phases)
    if not run_phases(job, [Phase(name, PHASE_FUNCTIONS[name], PHASE_SUMMARIES[name],
                                  primary=name in PRIMARY_PHASES)
                            for name in PHASES], phases, stop_after=stop_after_phase):
      return None
    report = world_report.build_report(config, phases.phases)
    if is_primary():
      world_report.write_report(report, workdir)
  print("\n" + world_report.markdown(report), flush=True)
  return report
