"""Workload (d): passage encoding, rag_jax's DPR context encoder against transformers'
DPRContextEncoder, same weights and passages (full-length, so both do the same work)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from benchmarks import flops, models, timing
from benchmarks.presets import Preset
from rag_jax.parallel import data_mesh
from rag_jax.retrieval.encode import make_encode_fn


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
  mesh = data_mesh()
  encode = make_encode_fn(model, mesh)
  params = jax.device_put(params)
  compiled = encode.lower(params, ids, mask).compile()
  timing.reset_host_peak()
  ours = timing.measure(lambda: jax.block_until_ready(compiled(params, ids, mask)), repeats,
                        warmup).as_dict()
  ours.update(xla_flops=timing.compiled_flops(compiled), host_peak_mib=timing.host_peak_mb(),
              device=timing.jax_device_memory())
  return {"workload": "encode", "case": f"DPR context encoder, {b} x {length} tokens",
          "batch": b, "length": length, "dtype": dtype, "unit": "passages", "items": b,
          "flops_hand": flops.bert_forward(preset.question_encoder, b, length),
          "rag_jax": ours, "peer": theirs}
