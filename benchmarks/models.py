"""The same random models and inputs on both sides.

transformers builds each model (seeded) on torch's device; `save_pretrained` writes it in the
public checkpoint layout and rag_jax loads that directory through `rag_jax.checkpoints`, so the
two implementations time identical weights. Inputs are seeded numpy arrays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from benchmarks.presets import Preset
from benchmarks.timing import torch_device
from rag_jax.checkpoints import load_pretrained
from rag_jax.models.rag import architecture_of


def _tmp_root() -> str | None:
  """RAM-backed scratch for multi-GB checkpoints where the machine has room there."""
  shm = Path("/dev/shm")
  return str(shm) if shm.is_dir() and shutil.disk_usage(shm).free > 8 * 2**30 else None


def torch_rag(preset: Preset, kind: str, n_docs: int):
  """transformers RagSequenceForGeneration / RagTokenForGeneration of the preset's shapes,
  built directly on torch's device (seed 0), in train mode."""
  import torch
  import transformers as tf
  q = tf.DPRConfig(projection_dim=0, **preset.question_encoder)
  g = tf.BartConfig(**preset.generator)
  config = tf.RagConfig.from_question_encoder_generator_configs(q, g, n_docs=n_docs)
  torch.manual_seed(0)
  with torch.device(torch_device()):
    return getattr(tf, architecture_of(kind))(config)


def torch_context_encoder(preset: Preset):
  import torch
  import transformers as tf
  torch.manual_seed(0)
  with torch.device(torch_device()):
    return tf.DPRContextEncoder(tf.DPRConfig(projection_dim=0, **preset.question_encoder))


def to_rag_jax(torch_model, dtype: Any, attention: str = "xla") -> tuple[Any, Any]:
  """(module, params) of rag_jax holding the torch model's weights (through a checkpoint);
  `attention` sets a RAG model's generator attention_implementation (layers.py)."""
  import transformers
  transformers.utils.logging.disable_progress_bar()  # The console shows the benchmark's own.
  with tempfile.TemporaryDirectory(dir=_tmp_root()) as tmp:
    torch_model.save_pretrained(tmp)
    model, params = load_pretrained(tmp, dtype=dtype)
  return with_attention(model, attention), params


def with_attention(model, attention: str):
  """The RAG model with its generator's attention_implementation set (same parameters); other
  models (the DPR encoders) have the XLA attention only."""
  generator = getattr(model.config, "generator", None)
  if generator is None and attention != "xla":
    raise ValueError(f"{type(model).__name__} has no attention_implementation to set")
  if generator is None or attention == generator.attention_implementation:
    return model
  generator = dataclasses.replace(generator, attention_implementation=attention)
  return model.clone(config=dataclasses.replace(model.config, generator=generator))


def case_label(label: str, attention: str) -> str:
  """A case's name, with the attention implementation when it is not the default."""
  return label if attention == "xla" else f"{label}, {attention} attention"


def compute_dtype(name: str, on_accelerator: bool, preset: Preset) -> str:
  """"auto" -> bfloat16 on accelerators (when the preset says so), float32 on CPU."""
  if name != "auto":
    return name
  return "bfloat16" if on_accelerator and preset.bf16_on_accel else "float32"


def jnp_dtype(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def torch_autocast(dtype_name: str):
  """bf16 autocast on torch's device (transformers' mixed precision), else nothing."""
  if dtype_name == "float32":
    return contextlib.nullcontext()
  import torch
  return torch.autocast(device_type=torch_device().type, dtype=torch.bfloat16)


def torch_sync() -> None:
  import torch
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def train_inputs(preset: Preset, batch: int, n_docs: int, seed: int = 0) -> dict[str, np.ndarray]:
  """The RAG train step's batch (rag_jax.training.rag_step layout), random ids."""
  rng = np.random.default_rng(seed)
  qv, gv = preset.question_encoder["vocab_size"], preset.generator["vocab_size"]
  b, n, s = batch, n_docs, preset.context_length
  labels = rng.integers(3, gv, (b, preset.target_length)).astype(np.int32)
  labels[:, 0] = preset.generator["bos_token_id"]
  dim = preset.question_encoder["hidden_size"]
  return {"input_ids": rng.integers(3, qv, (b, preset.question_length)).astype(np.int32),
          "attention_mask": np.ones((b, preset.question_length), np.int32),
          "context_input_ids": rng.integers(3, gv, (b, n, s)).astype(np.int32),
          "context_attention_mask": np.ones((b, n, s), np.int32),
          "doc_embeds": rng.standard_normal((b, n, dim)).astype(np.float32),
          "labels": labels, "weights": np.ones(b, np.float32)}


def torch_tensors(batch: dict[str, np.ndarray]) -> dict[str, Any]:
  import torch
  dev = torch_device()
  return {k: torch.from_numpy(v.astype(np.int64) if v.dtype == np.int32 else v).to(dev)
          for k, v in batch.items()}
