"""Workload (d): passage encoding, rag_jax's DPR context encoder against transformers'
DPRContextEncoder, same weights and token ids.

Two cases:
  * fixed: one b x length batch of full-length random ids (both sides do the same work; the
    per-token speed of the two encoders);
  * mixed: a corpus of passages with a realistic length spread, each side encoding it whole the
    way it is used. DPR's 100-word passages tokenize to about 120-200 tokens; lengths are drawn
    (seed 3) from round(Normal(mean, mean / 8)) clipped to [8, max_position_embeddings], with
    the preset's `encode_mean_length` (160 at base and paper: 95 % within 120-200). transformers
    as its RAG example `use_own_knowledge_dataset.py` embeds a knowledge base: batches of 16
    passages in corpus order, padded to the longest of each batch, `ctx_encoder(input_ids)`
    (the mask derived from the pad id), here under `torch.no_grad()` (the script keeps autograd
    on, which is slower). rag_jax through `BucketedEncoder.encode`, the function
    `encode_passages` runs on every shard (length-sorted buckets, compiled programs reused, rows
    back in corpus order), with `EncodeConfig`'s defaults but for tokens_per_batch: 16 passages
    of the mean length, the tokens of transformers' step. Tokenization is left out of both (the
    same Rust tokenizer on both sides; rag_jax runs it on a background thread). Repeats alternate
    between the two sides, so that load from other processes falls on both alike; the ratio is
    of the medians. The row records the largest |difference| of the two embeddings, the tokens
    each side ran (real + padding), and the compiled programs.

On several processes the fixed batch is one global batch over the global mesh (each process feeds
its rows); the mixed corpus is split into one contiguous block per process (`multiprocess.share`),
each encoded over the process's own devices as `encode_passages` encodes a process's shards, and
each timed call ends when every block is done. The row records each process's rows and
`embedding_abs_sum` (the sum of |embedding| over the whole corpus, to compare with a run on
another number of processes).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import numpy as np

from benchmarks import flops, models, multiprocess, timing
from benchmarks.presets import Preset
from rag_jax.distributed import process_count, process_index
from rag_jax.parallel import data_mesh, host_batch, local_data_mesh, replicate
from rag_jax.retrieval.encode import BucketedEncoder, EncodeConfig, make_encode_fn, plan_batches

TRANSFORMERS_BATCH = 16  # use_own_knowledge_dataset.py's ProcessingArguments.batch_size
LENGTH_SEED = 3


def run(preset: Preset, dtype: str, repeats: int, warmup: int, peer: bool) -> dict[str, Any]:
  rng = np.random.default_rng(2)
  b, length = preset.encode_batch, preset.encode_length
  ids = rng.integers(3, preset.question_encoder["vocab_size"], (b, length)).astype(np.int32)
  mask = np.ones_like(ids)
  torch_model = models.torch_context_encoder(preset).eval()
  model, params = models.to_rag_jax(torch_model, models.jnp_dtype(dtype))
  theirs = None
  if peer:
    import torch
    t_ids = torch.from_numpy(ids.astype(np.int64)).to(timing.torch_device())

    def run_torch():
      with torch.no_grad(), models.torch_autocast(dtype):
        torch_model(t_ids, attention_mask=torch.ones_like(t_ids)).pooler_output.float()
      models.torch_sync()

    timing.reset_host_peak()
    theirs = timing.measure(run_torch, repeats, warmup).as_dict()
    theirs.update(name="transformers DPRContextEncoder", host_peak_mib=timing.host_peak_mb())
  torch_model = None  # released before rag_jax allocates
  mesh = data_mesh()  # every device of every process: each process feeds its rows
  encode = make_encode_fn(model, mesh)
  params = replicate(params, mesh)
  batch = host_batch({"ids": ids, "mask": mask}, mesh)
  ids, mask = batch["ids"], batch["mask"]
  compiled = encode.lower(params, ids, mask).compile()
  timing.reset_host_peak()
  # No collective in the program: on several processes each call ends at a barrier.
  call = multiprocess.together(lambda: jax.block_until_ready(compiled(params, ids, mask)),
                               "benchmark/encode_fixed")
  ours = timing.measure(call, repeats, warmup).as_dict()
  ours.update(xla_flops=timing.compiled_flops(compiled), host_peak_mib=timing.host_peak_mb(),
              device=timing.jax_device_memory())
  return {"workload": "encode", "case": f"DPR context encoder, {b} x {length} tokens",
          "batch": b, "length": length, "dtype": dtype, "unit": "passages", "items": b,
          **multiprocess.fields(b),
          "flops_hand": flops.dpr_pooled_forward(preset.question_encoder, b, length),
          "rag_jax": ours, "peer": theirs}


def corpus(preset: Preset, seed: int = LENGTH_SEED) -> list[list[int]]:
  """The mixed-length corpus: `encode_corpus` passages of random ids, [CLS]-like first and
  [SEP]-like last token, no pad id (0) inside; lengths as in the module docstring."""
  rng = np.random.default_rng(seed)
  cfg = preset.question_encoder
  mean = preset.encode_mean_length
  lengths = np.clip(np.round(rng.normal(mean, mean / 8, preset.encode_corpus)), 8,
                    cfg["max_position_embeddings"]).astype(int)
  vocab = cfg["vocab_size"]
  return [[2, *rng.integers(5, vocab, n - 2).tolist(), 3] for n in lengths]


def corpus_order_batches(seqs: list[list[int]], batch: int, pad_id: int = 0) -> list[np.ndarray]:
  """transformers' side: consecutive `batch` passages, each batch padded to its longest."""
  out = []
  for s in range(0, len(seqs), batch):
    part = seqs[s:s + batch]
    ids = np.full((len(part), max(map(len, part))), pad_id, np.int64)
    for r, seq in enumerate(part):
      ids[r, :len(seq)] = seq
    out.append(ids)
  return out


def run_mixed(preset: Preset, dtype: str, repeats: int, warmup: int,
              peer: bool) -> dict[str, Any]:
  """The mixed-length corpus, encoded whole by each side, repeats alternating (on several
  processes, each process its block: module docstring)."""
  everything = corpus(preset)
  part = multiprocess.share(len(everything))
  seqs = everything[part.start:part.stop]
  if multiprocess.fields():  # process 0's line goes to benchmark.log, the others' to their log
    logging.info("process %d of %d: passages %d-%d (%d rows) of %d are its share",
                 process_index(), process_count(), part.start, part.stop - 1, len(part),
                 len(everything))
  torch_model = models.torch_context_encoder(preset).eval()
  model, params = models.to_rag_jax(torch_model, models.jnp_dtype(dtype))
  config = EncodeConfig(max_length=preset.question_encoder["max_position_embeddings"],
                        tokens_per_batch=TRANSFORMERS_BATCH * preset.encode_mean_length)
  encoder = BucketedEncoder(model, local_data_mesh())  # this process's devices, its block
  params = jax.device_put(params)
  out: dict[str, Any] = {}

  def encode_block():
    out["rag_jax"] = encoder.encode(params, seqs, pad_id=0, config=config)

  run_ours = multiprocess.together(encode_block, "benchmark/encode_mixed")

  batches = corpus_order_batches(seqs, TRANSFORMERS_BATCH)
  if peer:
    import torch
    batches_t = [torch.from_numpy(b).to(timing.torch_device()) for b in batches]

  def run_theirs():
    with torch.no_grad(), models.torch_autocast(dtype):
      rows = [torch_model(b, return_dict=True).pooler_output.float().cpu().numpy()
              for b in batches_t]
    out["peer"] = np.concatenate(rows)

  timing.reset_host_peak()
  sides = {"rag_jax": run_ours, **({"peer": run_theirs} if peer else {})}
  times: dict[str, list[float]] = {k: [] for k in sides}
  first: dict[str, float] = {}
  for step in range(max(1, warmup) + repeats):
    for name, fn in sides.items():
      start = time.perf_counter()
      fn()
      elapsed = time.perf_counter() - start
      if step == 0:
        first[name] = elapsed
      elif step >= max(1, warmup):
        times[name].append(elapsed)

  def side(name: str) -> dict[str, Any]:
    t = times[name]
    return {"first_s": first[name], "median_s": float(np.median(t)), "min_s": float(np.min(t)),
            "max_s": float(np.max(t)), "repeats": len(t), "system_s": 0.0}

  peak = timing.host_peak_mb()  # the process's, both sides in it
  ours = side("rag_jax")
  ours["host_peak_mib"] = peak
  shapes = sorted(encoder.shapes)  # this process's
  mine = {"rows": len(seqs), "tokens_run": sum(b * n for b, n in _shape_uses(seqs, config,
                                                                             encoder)),
          "embedding_abs_sum": float(np.abs(out["rag_jax"]).sum(dtype=np.float64))}
  each = multiprocess.gathered("benchmark/encode_mixed_rows", mine)
  ours.update(name="BucketedEncoder", tokens_run=sum(e["tokens_run"] for e in each),
              compiled_programs=encoder.fn._cache_size(), batch_shapes=[list(s) for s in shapes],
              length_bucket=config.length_bucket, batch_size=config.batch_size,
              tokens_per_batch=config.tokens_per_batch)
  theirs = None
  if peer:
    theirs = side("peer")
    theirs["host_peak_mib"] = peak
    theirs.update(name=f"transformers DPRContextEncoder, batches of {TRANSFORMERS_BATCH} in "
                  "corpus order", tokens_run=sum(b.size for b in batches))
  lengths = [len(s) for s in everything]
  row = {"workload": "encode", "case": f"DPR context encoder, {len(lengths)} passages of "
         f"{min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f})",
         "passages": len(lengths), "real_tokens": sum(lengths), "dtype": dtype,
         "unit": "passages", "items": len(lengths),
         "flops_hand": sum(flops.dpr_pooled_forward(preset.question_encoder, 1, n)
                           for n in lengths),
         "embedding_abs_sum": sum(e["embedding_abs_sum"] for e in each),
         "rag_jax": ours, "peer": theirs}
  if len(each) > 1:
    row.update(processes=len(each), rows_per_process=[e["rows"] for e in each])
  if peer:
    row["max_abs_diff"] = float(np.max(np.abs(out["rag_jax"] - out["peer"])))
    row["ratio_per_repeat"] = [p / o for o, p in zip(times["rag_jax"], times["peer"],
                                                     strict=True)]
  return row


def _shape_uses(seqs, config, encoder) -> list[tuple[int, int]]:
  """(batch, length) of every batch BucketedEncoder runs on `seqs`."""
  return [(b, n) for _, b, n in plan_batches([len(s) for s in seqs], config, encoder.devices)]
