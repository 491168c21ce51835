"""Workload (a): the whole RAG training step, rag_jax against transformers + torch AdamW.

Both sides: question encoder on B questions, doc_scores = q(x) . d(z) against the batch's frozen
passage embeddings, BART on B x n passages, the RAG-Sequence or RAG-Token marginal likelihood,
backward, global-norm clipping, AdamW, dropout on (train mode). rag_jax runs
`rag_jax.training.rag_step.make_train_step` (jit, shard_map over every device, state donated);
transformers runs RagSequenceForGeneration / RagTokenForGeneration as its RAG fine-tuning example
does, under bf16 autocast where rag_jax computes in bf16. The peer runs first and releases its
memory, so each side has the device to itself.

On several processes the step runs data parallel over the global mesh: the preset's batch is the
global batch, every process builds it whole (seeded) and feeds its rows (`host_batch`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from benchmarks import flops, models, multiprocess, profile, timing
from benchmarks.presets import Preset
from rag_jax import losses
from rag_jax.models.rag import MODEL_TYPES, architecture_of
from rag_jax.parallel import data_mesh, host_batch, replicate
from rag_jax.training import optimizer
from rag_jax.training.rag_step import make_train_step
from rag_jax.training.state import create_train_state

KINDS = tuple(MODEL_TYPES)


def optimizer_config() -> ml_collections.ConfigDict:
  """The paper's fine-tuning optimizer shape (AdamW, warm-up, clipping); values irrelevant."""
  return ml_collections.ConfigDict(dict(
      learning_rate=3e-5, warmup_steps=500, num_train_steps=10_000, lr_end=0.0, lr_power=1.0,
      weight_decay=0.001, max_grad_norm=0.1, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8))


def torch_side(torch_model, batch: dict[str, np.ndarray], dtype: str, repeats: int,
               warmup: int) -> dict[str, Any]:
  """Times transformers' step; returns timing, first-step loss and peak memory."""
  import torch
  torch_model.train()
  opt = torch.optim.AdamW(torch_model.parameters(), lr=3e-5, weight_decay=0.001)
  t = models.torch_tensors(batch)
  b, n, length = batch["context_input_ids"].shape
  losses_seen: list[float] = []

  def step():
    with models.torch_autocast(dtype):
      q = torch_model.question_encoder(t["input_ids"], attention_mask=t["attention_mask"])[0]
      doc_scores = torch.bmm(q.unsqueeze(1), t["doc_embeds"].transpose(1, 2)).squeeze(1)
      out = torch_model(context_input_ids=t["context_input_ids"].reshape(b * n, length),
                        context_attention_mask=t["context_attention_mask"].reshape(b * n, length),
                        doc_scores=doc_scores, labels=t["labels"], n_docs=n, reduce_loss=False)
      loss = out.loss.mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 0.1)
    opt.step()
    models.torch_sync()
    if not losses_seen:
      losses_seen.append(float(loss.detach()))

  if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
  timing.reset_host_peak()
  result = timing.measure(step, repeats, warmup).as_dict()
  result["loss_first_step"] = losses_seen[0]
  result["host_peak_mib"] = timing.host_peak_mb()
  if torch.cuda.is_available():
    result["device_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
  return result


def jax_side(model, params, batch: dict[str, np.ndarray], kind: str, repeats: int,
             warmup: int, profile_calls: int = 0) -> dict[str, Any]:
  """Compiles and times rag_jax's step; returns timing, compile time, XLA FLOPs and memory,
  and with `profile_calls` a per-op profile of that many more steps (benchmarks/profile.py)."""
  mesh = data_mesh()
  # Label smoothing off and BART's pad id, as the peer.
  loss_fn = functools.partial(losses.MODEL_TYPE_LOSSES[kind], epsilon=0.0, pad_token_id=1)
  timing.reset_host_peak()
  state = replicate(create_train_state(model.apply, params,
                                       optimizer.make_optimizer(optimizer_config(), params),
                                       jax.random.key_data(jax.random.key(0))), mesh)
  del params
  step = make_train_step(model, mesh, loss_fn)
  device_batch = host_batch(batch, mesh)  # each process its rows of the global batch
  start = time.perf_counter()
  compiled = step.lower(state, device_batch).compile()
  compile_s = time.perf_counter() - start
  holder = {"state": state}
  losses_seen: list[float] = []

  def run():
    holder["state"], metrics = compiled(holder["state"], device_batch)
    jax.block_until_ready(metrics)
    if not losses_seen:
      losses_seen.append(float(metrics["loss_sum"] / metrics["examples"]))

  result = timing.measure(run, repeats, warmup).as_dict()
  result.update(compile_s=compile_s, loss_first_step=losses_seen[0],
                host_peak_mib=timing.host_peak_mb(), xla_flops=timing.compiled_flops(compiled),
                memory_plan=timing.compiled_memory_gib(compiled),
                device=timing.jax_device_memory())
  if profile_calls:
    def steps():  # back to back, as a training loop runs them: no wait between steps
      for _ in range(profile_calls):
        holder["state"], metrics = compiled(holder["state"], device_batch)
      jax.block_until_ready(metrics)

    result["profile"] = profile.profile(steps, 1, compiled.as_text(), steps=profile_calls)
  return result


def run_case(preset: Preset, kind: str, n_docs: int, dtype: str, repeats: int, warmup: int,
             peer: bool, profile_calls: int = 0,
             attentions: tuple[str, ...] = ("xla",)) -> Iterator[dict[str, Any]]:
  """One (RAG kind, n_docs) case at the preset's batch: yields one row per attention
  implementation of rag_jax (`attentions`) as it is measured, each against the same peer
  measurement, FLOPs, ratio. An implementation that fails (e.g. cuDNN's on a machine without it)
  leaves an error in its row; the other rows are still measured."""
  batch = models.train_inputs(preset, preset.batch, n_docs)
  torch_model = models.torch_rag(preset, kind, n_docs)
  theirs = torch_side(torch_model, batch, dtype, repeats, warmup) if peer else None
  hand = flops.rag_train_step(preset.question_encoder, preset.generator, preset.batch, n_docs,
                              preset.question_length, preset.context_length,
                              preset.target_length)
  model, params = models.to_rag_jax(torch_model, models.jnp_dtype(dtype))
  torch_model = None  # released before rag_jax allocates
  _release_torch()
  # The step donates its state: with several implementations each starts from host weights.
  weights = jax.device_get(params) if len(attentions) > 1 else params
  del params
  for attention in attentions:
    try:
      ours = jax_side(models.with_attention(model, attention), weights, batch, kind, repeats,
                      warmup, profile_calls)
    except Exception as error:  # noqa: BLE001 - recorded in the row; the others still run
      logging.info("rag_jax's %s step with %s attention failed", kind, attention, exc_info=True)
      ours = {"error": f"{type(error).__name__}: {error}"[:2000]}
    yield {
        "workload": "train", "case": models.case_label(f"{kind} n_docs={n_docs}", attention),
        "kind": kind, "attention": attention, "n_docs": n_docs, "batch": preset.batch,
        "dtype": dtype, "unit": "questions", "items": preset.batch, "flops_hand": hand,
        **multiprocess.fields(preset.batch), "rag_jax": ours,
        "peer": theirs and {"name": f"transformers {architecture_of(kind)} + torch AdamW",
                            **theirs}}


def _release_torch() -> None:
  try:
    import torch
  except ImportError:
    return
  if torch.cuda.is_available():
    torch.cuda.empty_cache()


def _is_oom(error: BaseException) -> bool:
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def largest_jax_batch(preset: Preset, kind: str, n_docs: int, dtype: str, first: dict[str, Any],
                      repeats: int, attention: str = "xla") -> dict[str, Any]:
  """The largest batch (a multiple of the preset's) whose step compiles and runs, predicted
  from the preset-batch program's memory plan (temporaries grow linearly with the batch; the
  state does not) and confirmed by running it; 25 % smaller on each out-of-memory."""
  plan, limit = first.get("memory_plan"), (first.get("device") or {}).get("gib_limit")
  if not plan or not limit:
    return {"skipped": "no memory plan or device limit on this backend"}
  fixed = plan["argument_gib"] + plan["output_gib"] - plan["alias_gib"]
  per_question = plan["temp_gib"] / preset.batch
  unit = preset.batch
  guess = int((0.92 * limit - fixed) / per_question) // unit * unit
  tried = []
  torch_model = models.torch_rag(preset, kind, n_docs)
  model, params = models.to_rag_jax(torch_model, models.jnp_dtype(dtype), attention)
  del torch_model
  _release_torch()
  host_params = jax.device_get(params)
  del params
  while guess >= unit and len(tried) < 3:
    batch = models.train_inputs(preset, guess, n_docs)
    try:
      result = jax_side(model, host_params, batch, kind, repeats, 1)
      result.update(batch=guess, tried=tried, predicted_from_gib={
          "fixed": fixed, "temp_per_question": per_question, "limit": limit})
      return result
    except Exception as error:  # noqa: BLE001 - an OOM is the expected way to learn the limit
      if not _is_oom(error):
        raise
      tried.append(guess)
      logging.info("batch %d does not fit: %s", guess, str(error)[:200])
      guess = int(guess * 0.75) // unit * unit
  return {"skipped": f"no batch fitted (tried {tried})"}


def largest_torch_batch(preset: Preset, kind: str, n_docs: int, dtype: str,
                        repeats: int) -> dict[str, Any]:
  """Doubles the batch from the preset's until torch runs out of memory, then bisects in
  steps of the preset batch; times the largest that ran."""
  import torch
  if not torch.cuda.is_available():
    return {"skipped": "torch has no accelerator here"}
  torch_model = models.torch_rag(preset, kind, n_docs)

  def fits(b: int) -> bool:
    try:
      torch_side(torch_model, models.train_inputs(preset, b, n_docs), dtype, 1, 1)
      return True
    except torch.OutOfMemoryError:
      return False
    finally:
      torch.cuda.empty_cache()

  unit, lo, hi = preset.batch, preset.batch, None
  while hi is None and lo <= 4096:
    if fits(2 * lo):
      lo *= 2
    else:
      hi = 2 * lo
  while hi is not None and hi - lo > unit:
    mid = (lo + hi) // 2 // unit * unit
    if fits(mid):
      lo = mid
    else:
      hi = mid
  result = torch_side(torch_model, models.train_inputs(preset, lo, n_docs), dtype, repeats, 1)
  torch_model = None
  _release_torch()
  return {"batch": lo, **result}
