"""Fine-tuning RAG (question encoder + generator; passage encoder and index frozen, as in the
paper) on question-answer pairs: `train_and_evaluate(config, workdir)`.

Per step: the next global batch of the epoch's permutation (a pure function of seed and step, so
a resumed run sees the same data), retrieval with the current question encoder, one
data-parallel train step over every device (rag_jax.training.rag_step). Retrieval runs inside
the jitted step, on the devices (rag_jax.retrieval.device), wherever the index and its
passage table fit `config.device_index_memory_fraction` of the devices' memory
(`config.retrieval="auto"`), else on the host (rag_jax.training.retrieval_feed); both give the
same passages and generator inputs. Workdir: config.json, train.log, metrics.jsonl (train loss per
target token, examples/s, the prior mass of the top passage; held-out loss and answer recall of
the retrieved passages), orbax checkpoints (async, keep-N, exact resume), and at the end
export/ (a transformers RAG checkpoint with its tokenizers) and report.json.

On several processes (rag_jax.distributed) every process runs the same steps on the global mesh,
feeding its rows of each global batch; the exact index and passage table of in-step retrieval
are sharded over that mesh (each process reads its rows); a host-searched dense index is one
index per process over its block of rows (rag_jax.retrieval.merged), every process searching
the whole batch's questions and the top-k merged; a BM25 index is whole on each process (which
retrieves for its rows). The processes first compare the config, workdir and files
(`run_facts`); process 0 alone holds the workdir lock and writes the workdir's files, orbax's
saves being collective.

`config.retriever_kind` picks the prior p(z|x): "dense" (q(x) . d(z) over an exact or ScaNN
index, gradients into the question encoder unless `config.frozen_groups` holds
"question_encoder", the paper's "-Frozen" rows) or "bm25" (a BM25 index's scores as its logits,
retrieved on the host, the question encoder frozen: the paper's "-BM25" rows). Same trainer,
same step; only the batch's prior and the optimizer's frozen group differ.

`config.train_context_encoder` also trains the DPR context encoder that built the index
(`config.context_encoder_checkpoint`): the retrieved passages are re-encoded in every step from a
second table of their context-encoder ids (cached under the index's passage_tables/), the index
itself stays as built; the encoder is checkpointed with the rest and exported to
export/ctx_encoder/ (a DPRContextEncoder with its tokenizer), and with `config.export_index`
every passage re-encoded by it into export/index/ (evaluate.py searches it).
`config.index_refresh` refreshes the device index with it (rolling, scheduled or rerank:
rag_jax.training.index_refresh; the refreshed index is checkpointed with the state), or a
host-searched one on a schedule (rag_jax.training.host_refresh: saved under
WORKDIR/refreshed_index/, named in report.json);
the index on disk is never written.

`config.model_type` is the one source of truth for the model's kind: it picks the loss, and the
model that is trained, exported and decoded is RagSequenceForGeneration (rag_sequence) or
RagTokenForGeneration (rag_token) whatever the starting checkpoint's `architectures` say.
Starting from a checkpoint of the other kind (e.g. RAG-Token fine-tuning from a RAG-Sequence
checkpoint) is allowed and logged.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rag_jax import checkpoints, losses
from rag_jax.data import contexts, qa
from rag_jax.data.passage_table import load_or_build_encoder_table, question_parts
from rag_jax.data.sampling import epoch_rows
from rag_jax.distributed import (
  check_same,
  file_fingerprint,
  on_primary,
  primary_first,
  process_count,
)
from rag_jax.models.rag import CTX_ENCODER, RagConfig, RagModel, architecture_of
from rag_jax.parallel import (
  data_mesh,
  global_batch,
  host_batch,
  local_copy,
  local_data_mesh,
  local_rows,
  replicate,
)
from rag_jax.retrieval import device as device_retrieval
from rag_jax.retrieval.backends import load_index
from rag_jax.retrieval.device import DeviceRetrieval
from rag_jax.retrieval.encode import BucketedEncoder, EncodeConfig
from rag_jax.retrieval.exact import ExactIndex
from rag_jax.retrieval.index import TextIndex, read_meta
from rag_jax.retrieval.merged import MergedIndex
from rag_jax.retrieval.scann_index import ScannIndex
from rag_jax.retrieval.store import PassageStore
from rag_jax.training import config_check, index_refresh, loop, optimizer
from rag_jax.training.host_refresh import HostRefresh, encode_table, export_index
from rag_jax.training.rag_step import make_eval_step, make_train_step, without_context_encoder
from rag_jax.training.retrieval_feed import RetrievalFeed
from rag_jax.training.state import create_train_state
from rag_jax.utils.errors import InputNotFoundError

log = logging.getLogger(__name__)
AGREE_TIMEOUT_S = 600  # processes wait this long for each other's facts, workdir and export
EXPORT_TIMEOUT_S = 24 * 3600  # the others wait this long for process 0's export/index

def loss_function(config: ml_collections.ConfigDict, model: RagModel):
  """The configured marginal likelihood with the generator's special ids."""
  architecture_of(config.model_type)
  gen = model.config.generator
  kw: dict[str, Any] = dict(epsilon=config.label_smoothing, pad_token_id=gen.pad_token_id)
  if config.model_type == "rag_sequence":
    kw.update(exclude_bos_score=config.exclude_bos_score, bos_token_id=gen.bos_token_id)
  return functools.partial(losses.MODEL_TYPE_LOSSES[config.model_type], **kw)


def load_model(config: ml_collections.ConfigDict
               ) -> tuple[RagModel, Any, checkpoints.RagTokenizers]:
  """A RAG checkpoint directory, or a DPR question encoder and a BART generator joined.

  The model's architecture is `config.model_type`'s (see the module docstring): a checkpoint
  of another kind (the other objective, or a plain RagModel) is converted and the change logged.
  """
  architecture = architecture_of(config.model_type)
  dtype = jnp.dtype(config.dtype)
  if config.rag_checkpoint:
    model, params = checkpoints.load_pretrained(config.rag_checkpoint, dtype=dtype)
    if not isinstance(model, RagModel):
      raise ValueError(f"config.rag_checkpoint={config.rag_checkpoint}: a "
                       f"{type(model).__name__} checkpoint, not a RAG one (or set "
                       "question_encoder_checkpoint and generator_checkpoint instead)")
    tokenizers = checkpoints.load_tokenizer(config.rag_checkpoint)
    started = model.config.architecture
    if started != architecture:  # The other objective's kind (warned), or a plain RagModel.
      log.log(logging.INFO if started == "RagModel" else logging.WARNING,
              "config.rag_checkpoint=%s is a %s checkpoint; config.model_type=%r trains, "
              "exports and decodes it as %s", config.rag_checkpoint, started, config.model_type,
              architecture)
  else:
    q_model, q_params = checkpoints.load_pretrained(config.question_encoder_checkpoint)
    g_model, g_params = checkpoints.load_pretrained(config.generator_checkpoint)
    rag_config = RagConfig(question_encoder=q_model.config, generator=g_model.config,
                           retrieval_vector_size=q_model.config.embedding_dim)
    model = RagModel(rag_config, dtype=dtype)
    params = {"question_encoder": q_params, "generator": g_params}
    tokenizers = checkpoints.RagTokenizers(
        checkpoints.load_tokenizer(config.question_encoder_checkpoint),
        checkpoints.load_tokenizer(config.generator_checkpoint))
  model = model.clone(config=dataclasses.replace(
      model.config, architecture=architecture, n_docs=config.n_docs,
      max_combined_length=config.max_combined_length, label_smoothing=config.label_smoothing,
      exclude_bos_score=config.exclude_bos_score))
  return model, params, tokenizers


def load_context_encoder(config: ml_collections.ConfigDict, model: RagModel
                         ) -> tuple[Any, Any, Any]:
  """(DPREncoder, its params, its tokenizer) from config.context_encoder_checkpoint; its
  embeddings must have the question encoder's width (their inner product is the score)."""
  path = config.context_encoder_checkpoint
  ctx_model, ctx_params = checkpoints.load_pretrained(path, dtype=jnp.dtype(config.dtype))
  if getattr(ctx_model.config, "architecture", None) != "DPRContextEncoder":
    raise ValueError(f"config.context_encoder_checkpoint={path}: a {type(ctx_model).__name__} "
                     "checkpoint, not a DPRContextEncoder")
  q_dim = model.config.question_encoder.embedding_dim
  if ctx_model.config.embedding_dim != q_dim:
    raise ValueError(f"config.context_encoder_checkpoint={path} embeds into "
                     f"{ctx_model.config.embedding_dim} dims, the question encoder into {q_dim}")
  return ctx_model, ctx_params, checkpoints.load_tokenizer(path)


def _answer_in_passages(feed: RetrievalFeed, answers: list[str], doc_rows: np.ndarray) -> float:
  """How many questions have their answer string in one of their retrieved passages."""
  hits = 0
  for answer, rows in zip(answers, doc_rows, strict=True):
    needle = answer.strip().lower()
    hits += any(needle in (feed.store.title(int(r)) + " " + feed.store.text(int(r))).lower()
                for r in rows)
  return hits


class QuestionBatches:
  """Question-only batches of one split for in-step retrieval: its question parts (the
  generator's ids of each question, rag_jax.data.passage_table.question_parts) are computed on
  first use, once."""

  def __init__(self, feed: RetrievalFeed, data: qa.TokenizedQA):
    self.feed, self.data = feed, data
    self._parts: tuple[np.ndarray, np.ndarray] | None = None

  def batch(self, rows: np.ndarray, weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The batch of rag_step's device-retrieval step for rows `rows` of the split."""
    data = self.data
    if self._parts is None:
      questions = contexts.decode_questions(self.feed.question_tokenizer, data.input_ids)
      self._parts = question_parts(self.feed.assembler, questions)
    tokens, lengths = self._parts
    return {"input_ids": data.input_ids[rows], "attention_mask": data.attention_mask[rows],
            "question_tokens": tokens[rows], "question_lengths": lengths[rows],
            "labels": data.labels[rows],
            "weights": (np.ones(len(rows), np.float32) if weights is None
                        else np.asarray(weights, np.float32))}


def evaluate(config, params, feed: RetrievalFeed, data: qa.TokenizedQA, answers: list[str],
             eval_fn, mesh, retrieval: DeviceRetrieval | None = None) -> dict[str, float]:
  """Teacher-forced loss per question and retrieved-passage answer recall on held-out data
  (retrieval on the host, or in the step when `retrieval` is given). On several processes every
  process calls it (the step is collective) and gets the same figures."""
  n = len(data)
  sums = {"loss_sum": 0.0, "examples": 0.0, "target_tokens": 0.0, "answer_recall": 0.0}
  questions = QuestionBatches(feed, data)
  for start in range(0, n, config.batch_size):
    rows = np.arange(start, start + config.batch_size) % n  # the last batch wraps around
    weights = (np.arange(start, start + config.batch_size) < n).astype(np.float32)
    if retrieval is None:  # every process retrieves the whole batch (the recall needs it)
      batch, doc_rows = feed.batch(local_copy(params), data, rows, weights)
      metrics = jax.device_get(eval_fn(params, host_batch(batch, mesh)))
    else:
      metrics, doc_ids = jax.device_get(eval_fn(
          params, host_batch(questions.batch(rows, weights), mesh), retrieval.arrays))
      doc_rows = np.asarray(doc_ids)
    for k in ("loss_sum", "examples", "target_tokens"):
      sums[k] += float(metrics[k])
    real = weights > 0
    sums["answer_recall"] += _answer_in_passages(feed, [answers[i] for i in rows[real]],
                                                 doc_rows[real])
  return {"loss": sums["loss_sum"] / sums["examples"],
          "loss_per_token": sums["loss_sum"] / max(sums["target_tokens"], 1.0),
          f"answer_recall_at_{config.n_docs}": sums["answer_recall"] / n}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       stop_after: int | None = None) -> dict[str, Any] | None:
  """Trains or resumes RAG in `workdir` (see the module docstring). Returns the report, or
  None if `stop_after` ended the run early (as a kill would; the next call resumes)."""
  config_check.validate(config, "rag")
  architecture_of(config.model_type)
  check_config_paths(config)
  check_index_fields(config)
  check_model_lengths(config)
  workdir = Path(workdir)
  check_same("rag/facts", run_facts(config, workdir), AGREE_TIMEOUT_S,
             "every process must train one config on the same files")
  with loop.claimed_workdir(config, workdir, "rag/workdir", AGREE_TIMEOUT_S):
    return _run(config, workdir, stop_after)


def run_facts(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, str]:
  """What every process of one run must agree on (distributed.check_same): the config, the
  workdir, and the files it names (data, index, checkpoints' configs), as strings."""
  facts = {"config": json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True),
           "workdir": str(workdir.absolute())}
  files = [Path(config.data_dir) / f"{split}.{side}" for split in ("train", "val")
           for side in ("source", "target")]
  files += [Path(config.index_dir) / "index" / "index.json",
            Path(config.index_dir) / "passages" / "store.json"]
  files += [Path(config[f]) / "config.json" for f in
            ("rag_checkpoint", "question_encoder_checkpoint", "generator_checkpoint",
             "context_encoder_checkpoint") if config.get(f)]
  return {**facts, **{str(f): file_fingerprint(f) for f in files}}


def check_config_paths(config: ml_collections.ConfigDict) -> None:
  """Fails before any work (and before the workdir is touched) if a path in the config is not
  set (one ConfigError listing every field to set) or does not hold what it must (the message
  names the config field and the missing file)."""
  hints = {
      "index_dir": "a directory written by python -m rag_jax.commands.build_index",
      "rag_checkpoint": "a transformers RAG checkpoint directory with its tokenizers (or set "
                        "config.question_encoder_checkpoint and config.generator_checkpoint)",
      "question_encoder_checkpoint": "a DPRQuestionEncoder directory with its tokenizer",
      "generator_checkpoint": "a BART directory with its tokenizer",
      "data_dir": "a directory with train.source, train.target, val.source and val.target, one "
                  "question (.source) and one answer (.target) per line",
  }
  checkpoints_given = (["rag_checkpoint"] if config.rag_checkpoint
                       or not (config.question_encoder_checkpoint or config.generator_checkpoint)
                       else ["question_encoder_checkpoint", "generator_checkpoint"])
  unset = [f for f in ("index_dir", *checkpoints_given, "data_dir") if not config[f]]
  if unset:
    raise config_check.ConfigError(
        "set " + "; ".join(f"config.{f} ({hints[f]})" for f in unset)
        + f", e.g. --config.{unset[0]}=PATH on train.py's command line (nothing was run or "
        "written)")

  def need(field: str, *files: str, hint: str) -> None:
    value = config[field]
    for file in files:
      if not (Path(value) / file).is_file():
        raise InputNotFoundError(f"config.{field}={value}: {Path(value) / file} not found; {hint}")

  need("index_dir", "index/index.json", "passages/store.json",
       hint="build an index with python -m rag_jax.commands.build_index --out DIR")
  ckpt_hint = "a transformers checkpoint directory with config.json and weights"
  if config.rag_checkpoint:
    need("rag_checkpoint", "config.json", hint=ckpt_hint)
  else:
    need("question_encoder_checkpoint", "config.json",
         hint=ckpt_hint + " (or set config.rag_checkpoint)")
    need("generator_checkpoint", "config.json", hint=ckpt_hint)
  if config.train_context_encoder:
    need("context_encoder_checkpoint", "config.json", hint=ckpt_hint + " (a DPRContextEncoder)")
  for split in ("train", "val"):
    need("data_dir", f"{split}.source", f"{split}.target",
         hint="one question (.source) and one answer (.target) per line")


def check_index_fields(config: ml_collections.ConfigDict) -> None:
  """config.n_docs against the passages of config.index_dir, before training (a larger n_docs
  trained without a word, on repeated or empty rows). A paper row's eval.recall_ks may exceed
  the index: evaluate.py leaves those depths out with a warning (rag_jax/evaluation/runner.py)."""
  index = Path(config.index_dir) / "index"
  config_check.check_index_size(config, "rag", int(read_meta(index)["count"]), str(index),
                                evaluation=False)


def check_model_lengths(config: ml_collections.ConfigDict) -> None:
  """The token lengths against the checkpoints' position tables, read from their config.json
  before the workdir is touched: max_source_length against the question encoder's,
  max_combined_length and max_target_length against the generator's (a longer input has no
  position to embed), context_encoder_max_length against the context encoder's when it is
  trained. One ConfigError lists every length too long."""
  if config.rag_checkpoint:
    rag = checkpoints.read_config(config.rag_checkpoint)
    where = f"{config.rag_checkpoint}/config.json"
    question, generator = rag.get("question_encoder", {}), rag.get("generator", {})
    places = (f"{where} (question_encoder)", f"{where} (generator)")
  else:
    question = checkpoints.read_config(config.question_encoder_checkpoint)
    generator = checkpoints.read_config(config.generator_checkpoint)
    places = (f"{config.question_encoder_checkpoint}/config.json",
              f"{config.generator_checkpoint}/config.json")
  limits = [("max_source_length", question, places[0]),
            ("max_combined_length", generator, places[1]),
            ("max_target_length", generator, places[1])]
  if config.train_context_encoder:
    limits.append(("context_encoder_max_length",
                   checkpoints.read_config(config.context_encoder_checkpoint),
                   f"{config.context_encoder_checkpoint}/config.json"))
  found = [f"config.{field} = {config[field]}: must be <= max_position_embeddings "
           f"{model['max_position_embeddings']} of {place}"
           for field, model, place in limits
           if "max_position_embeddings" in model
           and config[field] > model["max_position_embeddings"]]
  if found:
    raise config_check.ConfigError("; ".join(found) + " (invalid config: nothing was run or "
                                   "written)")


def _run(config, workdir: Path, stop_after: int | None) -> dict[str, Any] | None:
  mesh = data_mesh()
  if config.batch_size % mesh.devices.size:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                     f"{mesh.devices.size} devices")
  model, params, tokenizers = load_model(config)
  several = process_count() > 1
  index_path = Path(config.index_dir) / "index"
  # Several processes: an exact index for the step is read over the global mesh, each process
  # its devices' rows; a host-searched dense one (ScaNN, or exact with config.retrieval="host")
  # is one index per process over its block of rows, searched collectively with the top-k
  # merged (rag_jax.retrieval.merged); a BM25 index is whole on every process.
  index_kind = read_meta(index_path)["type"]
  on_mesh = several and index_kind == ExactIndex.kind and config.retrieval != "host"
  if several and index_kind in (ExactIndex.kind, ScannIndex.kind) and not on_mesh:
    index = MergedIndex.load(index_path)
  else:
    index = load_index(index_path, **({"mesh": mesh} if on_mesh else {}))
  store = PassageStore(Path(config.index_dir) / "passages")
  tables_dir = Path(config.index_dir) / "passage_tables"
  ctx_model = ctx_tokenizer = encoder_table = None
  if config.train_context_encoder:
    ctx_model, params[CTX_ENCODER], ctx_tokenizer = load_context_encoder(config, model)
    encoder_table = primary_first(  # process 0 first: it builds a missing table
        "rag/encoder_table", lambda: load_or_build_encoder_table(
            tables_dir, store.titles_and_texts, index.count, ctx_tokenizer,
            config.context_encoder_max_length), AGREE_TIMEOUT_S)
  feed = RetrievalFeed(model, index, store, tokenizers.question_encoder, tokenizers.generator,
                       config.n_docs, encoder_table=encoder_table)
  kind = config.retriever_kind
  if (kind == "bm25") != isinstance(index, TextIndex):
    raise ValueError(f"config.retriever_kind={kind!r} but {config.index_dir}/index is a "
                     f"{index.kind!r} index (bm25 needs a bm25 index, dense an exact or scann one)")
  frozen_groups = tuple(config.frozen_groups)
  if feed.fixed_doc_scores and "question_encoder" not in frozen_groups:
    frozen_groups += ("question_encoder",)  # Unused by a fixed prior: no update at all.

  def tokenized(split):
    questions, answers = qa.read_source_target(config.data_dir, split)
    start = (model.config.generator.decoder_start_token_id
             if config.prepend_decoder_start else None)
    return qa.tokenize_qa(tokenizers.question_encoder, tokenizers.generator, questions, answers,
                          config.max_source_length, config.max_target_length, start), answers

  train, _ = tokenized("train")
  val, val_answers = tokenized("val")

  tx = optimizer.make_optimizer(config, params, group_learning_rates=config.group_learning_rates,
                                frozen_groups=frozen_groups)
  state = create_train_state(model.apply, params, tx,
                             jax.random.key_data(jax.random.key(config.seed)))
  state = replicate(state, mesh)
  loss_fn = loss_function(config, model)

  def set_up_retrieval() -> DeviceRetrieval | None:
    return device_retrieval.setup(
        "host" if feed.fixed_doc_scores else config.retrieval, index, store, feed.assembler,
        tables_dir, config.n_docs, mesh, dtype=config.device_index_dtype,
        memory_fraction=config.device_index_memory_fraction, encoder_table=encoder_table)

  # Several processes: process 0 first (it builds a missing passage table, the others read it).
  retrieval = primary_first("rag/retrieval", set_up_retrieval, AGREE_TIMEOUT_S)
  if retrieval is None and isinstance(index, ExactIndex) and index.mesh.devices.size != len(
      jax.local_devices()):  # too big for the devices: searched on the host, whole per process
    index.place(index.config, local_data_mesh())
  train_questions = QuestionBatches(feed, train)
  refresh = index_refresh.from_config(config)
  host_refresh = None
  if refresh is not None and retrieval is None:
    if refresh.mode != "scheduled":
      raise config_check.ConfigError(
          f"config.index_refresh = {config.index_refresh!r}: needs retrieval on the devices "
          f"(only 'scheduled' refreshes a host-searched index), but the index of "
          f"{config.index_dir} is searched on the host (config.retrieval = "
          f"{config.retrieval!r}; see the log line above)")
    if several:
      raise config_check.ConfigError(
          "config.index_refresh = 'scheduled' of a host-searched index runs on one process "
          "(retrieval on the devices refreshes on several)")
    host_refresh = HostRefresh(workdir, feed, index_path, ctx_model, encoder_table,
                               refresh.schedule, mesh)
    refresh = None  # the step itself refreshes nothing: the host swaps the index between steps
  step_fn = make_train_step(model, mesh, loss_fn, retrieval=retrieval,
                            fixed_doc_scores=feed.fixed_doc_scores, context_encoder=ctx_model,
                            refresh=refresh)
  runner = None
  if refresh is not None:
    runner = index_refresh.RefreshRunner(step_fn, retrieval, refresh, ctx_model)
    state = runner.init(state)
  eval_fn = make_eval_step(model, mesh, loss_fn, retrieval=retrieval,
                           fixed_doc_scores=feed.fixed_doc_scores, context_encoder=ctx_model,
                           refresh=refresh)
  run_eval = functools.partial(evaluate, config, feed=feed, data=val, answers=val_answers,
                               eval_fn=eval_fn, mesh=mesh, retrieval=retrieval)
  logging.info("RAG %s: %d parameters, %d devices, %d train / %d val examples, %s retriever, "
               "frozen groups %s", config.model_type, optimizer.count_params(params),
               mesh.devices.size, len(train), len(val), kind, list(frozen_groups))

  def train_step(state, step: int):
    rows = epoch_rows(config.seed, step, len(train), config.batch_size)  # the global batch
    if retrieval is None and isinstance(index, MergedIndex):  # a collective search: every
      batch, _ = feed.batch(local_copy(state.params), train, rows)  # process the whole batch
      return step_fn(state, host_batch(batch, mesh))
    if retrieval is None:  # each process retrieves its rows only
      if host_refresh is not None:
        host_refresh.before_step(state.params[CTX_ENCODER], step)
      batch, _ = feed.batch(local_copy(state.params), train, rows[local_rows(mesh, len(rows))])
      return step_fn(state, global_batch(batch, mesh))
    batch = host_batch(train_questions.batch(rows), mesh)
    if runner is not None:
      return runner(state, batch, step)
    return step_fn(state, batch, retrieval.arrays)

  def summarize(w: dict[str, float]) -> dict[str, float]:
    return {"loss": w["loss_sum"] / w["examples"],
            "loss_per_token": w["loss_sum"] / max(w["target_tokens"], 1.0),
            "top_doc_prior": w["top_doc_prior_sum"] / w["examples"],
            **index_refresh.summarize(w)}

  state, finished = loop.train_loop(
      config, workdir, state, train_step, summarize=summarize,
      evaluate=lambda params: run_eval(params=params), desc=config.model_type,
      stop_after=stop_after, eval_prefix="val_",
      postfix=lambda r: {"loss": f"{r['loss']:.3f}",
                         "q_per_s": f"{r['examples_per_s']:.1f}"})
  if not finished:
    return None

  final = run_eval(params=state.params)
  params_host = jax.device_get(state.params)
  report = {"model_type": config.model_type, "architecture": model.config.architecture,
            "retriever_kind": kind, "frozen_groups": list(frozen_groups),
            "train_context_encoder": bool(config.train_context_encoder),
            "index_refresh": config.index_refresh,
            "steps": config.num_train_steps, "retrieval": "host" if retrieval is None else "device",
            "devices": mesh.devices.size, **{f"val_{k}": v for k, v in final.items()},
            "export": str(workdir / "export")}
  if host_refresh is not None and host_refresh.current is not None:
    report["refreshed_index"] = str(host_refresh.current)

  def write() -> None:  # process 0's
    export = checkpoints.save_pretrained(model, without_context_encoder(params_host),
                                         workdir / "export", tokenizer=tokenizers)
    if ctx_model is not None:
      checkpoints.save_pretrained(ctx_model, params_host[CTX_ENCODER], export / "ctx_encoder",
                                  tokenizer=ctx_tokenizer)
      if config.export_index:  # the passages as the trained context encoder encodes them
        embeddings = encode_table(BucketedEncoder(ctx_model, local_data_mesh()), encoder_table,
                                  params_host[CTX_ENCODER],
                                  EncodeConfig(max_length=encoder_table.width), "export index")
        export_index(Path(config.index_dir), embeddings, export / "index")
        report["export_index"] = str(export / "index")
    report["export"] = str(export)
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  # Encoding the exported index can take hours at scale: the others wait that long (a dead
  # process 0 still ends them through jax's heartbeats).
  on_primary("rag/export", write, EXPORT_TIMEOUT_S if ctx_model is not None else AGREE_TIMEOUT_S)
  logging.info("final: %s", report)
  return report
