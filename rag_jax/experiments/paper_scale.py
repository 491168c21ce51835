"""The paper's recipe on one accelerator, on random weights and a random index.

`python train.py --config=configs/paper_scale.py` builds the paper's shapes (BERT-base question
encoder, BART-large generator, bf16 compute, fp32 parameters and AdamW state), a random index of
`config.index_rows` passages (21,015,300 x 768 bf16 by default: DPR's Wikipedia) with a random
passage table on the devices (rag_jax.retrieval.device.DeviceRetrieval.random), and runs
`config.num_train_steps` train steps with retrieval inside the step (rag_step.make_train_step)
and one batch of answering as one device program (rag_jax.answer.answer_program: question ids
to answer ids, the paper's test-time docs and decoder). No corpus, checkpoint or data is read.

It reports, in report.json and train.log: the memory plan (parameters, AdamW moments, gradients,
index, passage table: each in GiB, computed from the shapes; XLA's plan of the train step's
temporaries, from its compiled memory analysis), the devices' peak memory in jax's allocator,
step and answering times. On CPU scale the index down (`--config.index_rows=20000`); the same
code runs at 21M rows where an accelerator holds them (docs/training.md, "Memory plan").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rag_jax.answer import answer_program
from rag_jax.data.passage_table import TableSpec
from rag_jax.decoding import finish, plan_generation
from rag_jax.models import presets
from rag_jax.models.rag import RagModel, architecture_of
from rag_jax.parallel import data_mesh, global_batch, replicate
from rag_jax.retrieval.device import DeviceRetrieval
from rag_jax.retrieval.embeddings import DTYPES
from rag_jax.training import optimizer
from rag_jax.training.rag_step import make_train_step
from rag_jax.training.rag_trainer import loss_function
from rag_jax.training.state import create_train_state
from rag_jax.utils.logs import workdir_logging

GIB = 2**30


def model_of(config: ml_collections.ConfigDict) -> RagModel:
  """The configured RAG model (presets: "large" = BERT-base question encoder + BART-large)."""
  cfg = presets.rag_config(config.model.preset,
                           question_encoder=config.model.question_encoder.to_dict(),
                           generator=config.model.generator.to_dict(), n_docs=config.n_docs,
                           max_combined_length=config.max_combined_length,
                           architecture=architecture_of(config.model_type))
  return RagModel(cfg, dtype=jnp.dtype(config.dtype))


def table_spec(model: RagModel, length: int) -> TableSpec:
  """A BART-style row layout (<s> content </s>, pad) for random passage parts."""
  gen = model.config.generator
  return TableSpec(vocab_size=gen.vocab_size, width=length - 2, max_combined_length=length,
                   head=(gen.bos_token_id,), tail=(gen.eos_token_id,), pad_id=gen.pad_token_id,
                   title_sep=" / ", doc_sep=" // ", prefix=None, tokenizer_sha="random")


def index_dtype(config: ml_collections.ConfigDict) -> str:
  if config.device_index_dtype != "auto":
    return config.device_index_dtype
  return "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"


def memory_plan(config: ml_collections.ConfigDict, param_count: int, dim: int,
                spec: TableSpec) -> dict[str, float]:
  """GiB of each resident item, from the shapes (per device: the index and table are sharded,
  the model and optimizer replicated)."""
  rows, devices = config.index_rows, jax.device_count()
  emb = np.dtype(DTYPES[index_dtype(config)]).itemsize
  plan = {"parameters_fp32": param_count * 4 / GIB,
          "adamw_moments_fp32": 2 * param_count * 4 / GIB,
          "gradients_fp32": param_count * 4 / GIB,
          "index_embeddings": rows * dim * emb / GIB / devices,
          "passage_table": rows * (spec.width * spec.dtype.itemsize + 4) / GIB / devices}
  plan["resident_total"] = sum(plan.values())
  return plan


def question_batch(rng: np.random.Generator, config: ml_collections.ConfigDict, batch: int,
                   model: RagModel, spec: TableSpec) -> dict[str, np.ndarray]:
  """Random questions in the layout of retrieval inside the step (device.QUESTION_KEYS)."""
  q_vocab = model.config.question_encoder.vocab_size
  lq, t = config.max_source_length, config.max_target_length
  ids = rng.integers(min(1000, q_vocab // 2), q_vocab, (batch, lq)).astype(np.int32)  # [B, Lq]
  ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
  labels = rng.integers(4, spec.vocab_size, (batch, t)).astype(np.int32)  # [B, T]
  labels[:, 0], labels[:, -1] = spec.head[0], spec.tail[0]
  q_len = rng.integers(4, 24, batch).astype(np.int32)
  q_tok = rng.integers(4, spec.vocab_size, (batch, spec.width)).astype(np.int32)  # [B, W]
  q_tok[np.arange(spec.width)[None, :] >= q_len[:, None]] = 0
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "question_tokens": q_tok,
          "question_lengths": q_len, "labels": labels, "weights": np.ones(batch, np.float32)}


def peak_gib() -> float | None:
  """The largest peak_bytes_in_use over the devices (None where jax reports none: CPU)."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.devices()]
  return max(peaks) / GIB if all(p is not None for p in peaks) and peaks else None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
  """Train steps and one answering batch at the configured scale; report.json in `workdir`."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with workdir_logging(workdir, "train.log"):
    return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: Path) -> dict[str, Any]:
  mesh = data_mesh()
  model = model_of(config)
  b, n, length = config.batch_size, config.n_docs, config.max_combined_length
  spec = table_spec(model, length)
  dim = model.config.question_encoder.embedding_dim
  shapes = dict(context_input_ids=np.zeros((b * n, length), np.int32),
                context_attention_mask=np.ones((b * n, length), np.int32),
                decoder_input_ids=np.zeros((b, config.max_target_length), np.int32),
                input_ids=np.zeros((b, config.max_source_length), np.int32),
                retrieved_doc_embeds=np.zeros((b, n, dim), np.float32))
  init = jax.jit(lambda key: model.init(key, **shapes)["params"])
  abstract = jax.eval_shape(init, jax.random.key(config.seed))
  param_count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract))
  plan = memory_plan(config, param_count, dim, spec)
  logging.info("paper scale: %d parameters, index %d x %d (%s), %d devices; plan (GiB per "
               "device): %s", param_count, config.index_rows, dim, index_dtype(config),
               mesh.devices.size, {k: round(v, 2) for k, v in plan.items()})

  params = init(jax.random.key(config.seed))
  tx = optimizer.make_optimizer(config, params, group_learning_rates=config.group_learning_rates,
                                frozen_groups=config.frozen_groups)
  state = replicate(create_train_state(model.apply, params, tx,
                                       jax.random.key_data(jax.random.key(config.seed))), mesh)
  del params
  retrieval = DeviceRetrieval.random(mesh, spec, config.index_rows, dim, n,
                                     dtype=index_dtype(config), chunk_size=config.chunk_size,
                                     seed=config.seed)
  step = make_train_step(model, mesh, loss_function(config, model), retrieval=retrieval)
  rng = np.random.default_rng(config.seed)
  batch = global_batch(question_batch(rng, config, b, model, spec), mesh)
  compiled = step.lower(state, batch, retrieval.arrays).compile()
  analysis = compiled.memory_analysis()
  if analysis is not None:
    plan["step_temporaries_xla"] = analysis.temp_size_in_bytes / GIB
  times, losses = [], []
  for _ in range(config.num_train_steps):
    start = time.perf_counter()
    state, metrics = step(state, batch, retrieval.arrays)
    losses.append(float(metrics["loss_sum"]) / b)
    times.append(time.perf_counter() - start)
  train_peak = peak_gib()

  ev = config.eval
  options = dict(n_docs=ev.n_docs, num_beams=ev.num_beams, max_length=ev.max_length)
  if config.model_type == "rag_sequence":
    options.update(decoding=ev.decoding, rescore_candidates=ev.rescore_candidates or None,
                   rescore_positions=ev.rescore_positions or None)
  gen_plan = plan_generation(model, **options)
  program = answer_program(model, dataclasses.replace(retrieval, n_docs=ev.n_docs), gen_plan)
  questions = question_batch(rng, config, ev.batch_size, model, spec)
  args = (state.params, gen_plan.search_params, questions["input_ids"],
          questions["attention_mask"], questions["question_tokens"],
          questions["question_lengths"], retrieval.arrays)
  answer_times = []
  for _ in range(2):  # compile + run, then run
    start = time.perf_counter()
    inputs, raw = program(*args)
    out = finish(gen_plan, raw)
    answer_times.append(time.perf_counter() - start)
  report = {
      "parameters": param_count, "index_rows": config.index_rows, "index_dim": dim,
      "index_dtype": index_dtype(config), "compute_dtype": config.dtype,
      "devices": mesh.devices.size, "device": jax.devices()[0].device_kind,
      "batch": b, "n_docs": n, "max_combined_length": length,
      "memory_plan_gib": {k: round(v, 3) for k, v in plan.items()},
      "train_peak_gib": train_peak, "answer_peak_gib": peak_gib(),
      "train_step_s": {"first_with_compile": times[0] if times else None,
                       "median_after": float(np.median(times[1:])) if len(times) > 1 else None},
      "train_loss": losses,
      "answer": {"decoder": out.decoder.describe(), "questions": ev.batch_size,
                 "first_with_compile_s": answer_times[0], "second_s": answer_times[1],
                 "sequences_shape": list(out.sequences.shape),
                 "doc_ids_in_range": bool((np.asarray(inputs["doc_ids"]) >= 0).all() and (
                     np.asarray(inputs["doc_ids"]) < config.index_rows).all())},
  }
  (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  logging.info("paper scale: %s", report)
  return {"parameters": param_count, "index_rows": config.index_rows,
          "train_step_s": report["train_step_s"]["median_after"] or times[-1],
          "answer_s": answer_times[1], "train_peak_gib": train_peak or 0.0}
