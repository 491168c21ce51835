"""Generator-only (BART) sequence-to-sequence training on a `Seq2SeqTask`: the closed-book
baseline of the world job (rag_jax/experiments/world/job.py) and the reversal task
(rag_jax/experiments/reversal.py).

Data parallel over every device: the state is replicated, the global batch is sharded on the
mesh's "data" axis, and one jitted `train_step(state, batch) -> (state, metrics)` (state donated)
runs on all devices; XLA inserts the gradient all-reduce. Dropout keys are
`fold_in(base_key, step)`, so a resumed run draws the same randomness as an uninterrupted one.
Metrics are sums with their denominators, divided on the host. On several processes
(rag_jax.distributed) every process runs the same steps on the global mesh, feeding its rows of
each global batch (parallel.host_batch); process 0 alone holds the workdir lock and writes its
files (orbax's saves are collective).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rag_jax import checkpoints
from rag_jax.distributed import on_primary
from rag_jax.models.bart import BartForConditionalGeneration
from rag_jax.parallel import data_mesh, host_batch, replicate
from rag_jax.training import config_check, loop, optimizer
from rag_jax.training.state import TrainState, create_train_state

Array = jax.Array
AGREE_TIMEOUT_S = 600  # several processes: how long each waits for process 0's workdir steps


def label_smoothed_nll(logits: Array, labels: Array, epsilon: float,
                       pad_token_id: int) -> tuple[Array, Array, Array]:
  """fairseq / transformers research example `label_smoothed_nll_loss`, summed.

  logits [B, T, V], labels [B, T]; positions whose label is pad are ignored.
  loss = (1 - eps) * sum(-log p(label)) + eps / V * sum_v(-log p(v)).
  Returns (loss_sum, nll_sum, correct_count) over non-pad positions.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  mask = (labels != pad_token_id).astype(jnp.float32)
  nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0] * mask
  smooth = -logp.sum(axis=-1) * mask
  loss = (1.0 - epsilon) * nll.sum() + epsilon / logits.shape[-1] * smooth.sum()
  correct = ((logits.argmax(-1) == labels) * mask).sum()
  return loss, nll.sum(), correct


def _metrics(loss, nll, correct, labels, pad_token_id) -> dict[str, Array]:
  """Sums and their denominator (divided on the host)."""
  tokens = (labels != pad_token_id).sum().astype(jnp.float32)
  return {"loss_sum": loss, "nll_sum": nll, "correct": correct, "tokens": tokens}


def train_step(state: TrainState, batch: dict[str, Array], *, model: BartForConditionalGeneration,
               label_smoothing: float) -> tuple[TrainState, dict[str, Array]]:
  """One AdamW step on the token-summed loss divided by the number of target tokens."""
  pad = model.config.pad_token_id
  key = jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key), state.step)

  def loss_fn(params):
    logits = model.apply({"params": params}, input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"],
                         decoder_input_ids=batch["decoder_input_ids"], deterministic=False,
                         rngs={"dropout": key}).logits
    loss, nll, correct = label_smoothed_nll(logits, batch["labels"], label_smoothing, pad)
    tokens = jnp.maximum((batch["labels"] != pad).sum(), 1)
    return loss / tokens, (loss, nll, correct)

  grads, (loss, nll, correct) = jax.grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads)
  return state, {**_metrics(loss, nll, correct, batch["labels"], pad),
                 "grad_norm": optax.global_norm(grads)}


def eval_step(params: Any, batch: dict[str, Array], *, model: BartForConditionalGeneration
              ) -> dict[str, Array]:
  """Teacher-forced metrics. A sequence whose every argmax is right is exactly what greedy
  decoding produces, so `sequences_correct` counts greedy exact matches."""
  pad = model.config.pad_token_id
  logits = model.apply({"params": params}, input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"],
                       decoder_input_ids=batch["decoder_input_ids"]).logits
  loss, nll, correct = label_smoothed_nll(logits, batch["labels"], 0.0, pad)
  mask = batch["labels"] != pad
  seq_ok = jnp.all((logits.argmax(-1) == batch["labels"]) | ~mask, axis=-1)
  out = _metrics(loss, nll, correct, batch["labels"], pad)
  out.update(sequences_correct=seq_ok.sum().astype(jnp.float32),
             sequences=jnp.asarray(seq_ok.shape[0], jnp.float32))
  return out


@dataclasses.dataclass
class Seq2SeqTask:
  """What the loop trains on: a BART model, batches by step (a pure function of the step, so a
  resumed run sees the same data) and the held-out batches. Batches: input_ids,
  attention_mask [B, S]; decoder_input_ids, labels [B, T] (int32)."""

  model: BartForConditionalGeneration
  train_batch: Callable[[int], dict[str, np.ndarray]]
  eval_batches: Callable[[], list[dict[str, np.ndarray]]]
  description: str
  tokenizer: Any = None  # Saved with the export when given.


def evaluate(params, eval_fn, batches: list[dict[str, np.ndarray]], mesh=None
             ) -> dict[str, float]:
  """Held-out figures over `batches` (global batches, each process feeding its rows of them on
  `mesh` when given)."""
  sums: dict[str, float] = {}
  for batch in batches:
    batch = batch if mesh is None else host_batch(batch, mesh)
    for k, v in jax.device_get(eval_fn(params, batch)).items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return {"loss_per_token": sums["nll_sum"] / sums["tokens"],
          "token_accuracy": sums["correct"] / sums["tokens"],
          "sequence_accuracy": sums["sequences_correct"] / sums["sequences"]}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       task: Seq2SeqTask, stop_after: int | None = None
                       ) -> dict[str, Any] | None:
  """Trains (or resumes) in `workdir`; writes train.log, metrics.jsonl, checkpoints/,
  export/ (a transformers BART directory) and report.json. Returns the report.

  stop_after: end this run after that many total steps, as a kill would (checkpoint saved, no
  report); the next call resumes. Used to test exact resumption.
  task: what to train on (model, batches by step, held-out batches).
  """
  config_check.validate(config, "seq2seq")
  workdir = Path(workdir)
  with loop.claimed_workdir(config, workdir, "seq2seq/workdir", AGREE_TIMEOUT_S):
    return _run(config, workdir, stop_after, task)


def _run(config: ml_collections.ConfigDict, workdir: Path, stop_after: int | None,
         task: Seq2SeqTask) -> dict[str, Any] | None:
  mesh = data_mesh()
  n_dev = mesh.devices.size
  if config.batch_size % n_dev:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the {n_dev} devices")
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

  model = task.model
  init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
  params = jax.jit(model.init)(init_key, **{k: v for k, v in task.train_batch(0).items()
                                            if k != "labels"})["params"]
  tx = optimizer.make_optimizer(config, params)
  state = create_train_state(model.apply, params, tx, jax.random.key_data(dropout_key))
  state = replicate(state, mesh)
  logging.info("BART: %d parameters, %d devices", optimizer.count_params(params), n_dev)

  step_fn = jax.jit(functools.partial(train_step, model=model,
                                      label_smoothing=config.label_smoothing),
                    in_shardings=(replicated, batch_sharding),
                    out_shardings=(replicated, replicated), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, model=model),
                    in_shardings=(replicated, batch_sharding), out_shardings=replicated)

  t0 = time.time()
  state, finished = loop.train_loop(
      config, workdir, state,
      lambda state, step: step_fn(state, host_batch(task.train_batch(step), mesh)),
      summarize=lambda w: {"loss": w["nll_sum"] / w["tokens"],
                           "token_accuracy": w["correct"] / w["tokens"]},
      evaluate=lambda params: evaluate(params, eval_fn, task.eval_batches(), mesh),
      stop_after=stop_after,
      postfix=lambda r: {"loss": f"{r['loss']:.3f}", "acc": f"{r['token_accuracy']:.3f}"})
  if not finished:
    return None

  final = evaluate(state.params, eval_fn, task.eval_batches(), mesh)
  params_host = jax.device_get(state.params)
  report = {"task": task.description,
            "steps": config.num_train_steps, "devices": n_dev, **final,
            "export": str(workdir / "export"), "train_seconds_this_run": time.time() - t0}

  def write() -> None:  # process 0's
    checkpoints.save_pretrained(model, params_host, workdir / "export", tokenizer=task.tokenizer)
    (workdir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
  on_primary("seq2seq/export", write, AGREE_TIMEOUT_S)
  logging.info("final: %s", report)
  return report
