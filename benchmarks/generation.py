"""Workload (b): generation, rag_jax.decoding.generate against transformers' generate.

RAG-Token beam search and RAG-Sequence thorough decoding against RagTokenForGeneration /
RagSequenceForGeneration.generate on the same weights, retrieved contexts and doc scores;
RAG-Sequence fast decoding has no transformers counterpart and is compared with thorough.
min_length = max_length, so every hypothesis runs the full length on both sides (fixed work).
Agreement: the fraction of returned sequences identical token for token (exact in float32;
bf16 rounding may flip near-tied beams).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from benchmarks import flops, models, timing
from benchmarks.cli import rescore_setting
from benchmarks.presets import Preset
from rag_jax.decoding.generation import generate
from rag_jax.models.rag import architecture_of

MODES = (("rag_token", "beam"), ("rag_sequence", "thorough"), ("rag_sequence", "fast"))


def _inputs(preset: Preset, n_docs: int, seed: int = 1) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  rows, s = preset.batch * n_docs, preset.context_length
  return {"context_input_ids": rng.integers(3, preset.generator["vocab_size"], (rows, s)),
          "context_attention_mask": np.ones((rows, s), np.int64),
          "doc_scores": rng.standard_normal((preset.batch, n_docs)).astype(np.float32)}


def _options(preset: Preset) -> dict[str, Any]:
  return dict(num_beams=preset.num_beams, max_length=preset.target_length,
              min_length=preset.target_length, num_return_sequences=1, length_penalty=1.0,
              early_stopping=False, no_repeat_ngram_size=0)


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
  width = max(a.shape[1], b.shape[1])
  pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=-1)  # noqa: E731
  return float(np.mean(np.all(pad(a) == pad(b), axis=1)))


def run_case(preset: Preset, kind: str, decoding: str, n_docs: int, dtype: str, repeats: int,
             warmup: int, peer: bool, attention: str = "xla",
             rescore: tuple[str, ...] = ("auto:auto",)) -> Iterator[dict[str, Any]]:
  """Yields the mode's row: for thorough decoding one per `rescore` setting (G:W, see
  `rescore_setting`), each against the same transformers measurement."""
  inputs = _inputs(preset, n_docs)
  opts = _options(preset)
  torch_model = models.torch_rag(preset, kind, n_docs).eval()
  model, params = models.to_rag_jax(torch_model, models.jnp_dtype(dtype), attention)
  theirs, their_tokens = None, None
  if peer and decoding != "fast":
    import torch
    t = {k: torch.from_numpy(v).to(timing.torch_device()) for k, v in inputs.items()}
    holder = {}

    def run_torch():
      with torch.no_grad(), models.torch_autocast(dtype):
        holder["out"] = torch_model.generate(**t, n_docs=n_docs, do_sample=False, **opts)
      models.torch_sync()

    if torch.cuda.is_available():
      torch.cuda.reset_peak_memory_stats()
    timing.reset_host_peak()
    theirs = timing.measure(run_torch, repeats, warmup).as_dict()
    theirs["host_peak_mib"] = timing.host_peak_mb()
    if torch.cuda.is_available():
      theirs["device_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    their_tokens = holder["out"].cpu().numpy()
  torch_model = None  # released before rag_jax allocates
  params = jax.device_put(params)
  mode = "thorough" if decoding == "beam" else decoding
  label = {"beam": "RAG-Token beam", "thorough": "RAG-Sequence thorough",
           "fast": "RAG-Sequence fast"}[decoding]
  for spec in rescore if decoding == "thorough" else ("auto:auto",):
    group, width = rescore_setting(spec, preset, n_docs)
    holder = {}

    def run_ours(group=group, width=width, holder=holder):
      holder["out"] = generate(model, params, **inputs, decoding=mode, rescore_candidates=group,
                               rescore_positions=width, **opts)

    timing.reset_host_peak()
    ours = timing.measure(run_ours, repeats, warmup).as_dict()
    ours["compile_s"] = ours["first_s"] - ours["median_s"]  # first call = compile + one run
    ours["host_peak_mib"] = timing.host_peak_mb()
    ours["device"] = timing.jax_device_memory()
    rescored = holder["out"].num_candidates
    hand = flops.rag_generate(preset.generator, preset.batch, n_docs, preset.num_beams,
                              preset.target_length, preset.context_length,
                              "thorough" if decoding == "thorough" else "beam",
                              None if rescored is None else int(rescored.sum()))
    setting = "" if spec == "auto:auto" else f", rescoring G:W {spec}"
    case = models.case_label(f"{label} n_docs={n_docs}{setting}", attention)
    result = {"workload": "generate", "case": case, "kind": kind, "attention": attention,
              "decoding": decoding, "n_docs": n_docs, "batch": preset.batch,
              "num_beams": preset.num_beams, "tokens": preset.target_length, "dtype": dtype,
              "unit": "questions", "items": preset.batch, "flops_hand": hand, "rag_jax": ours,
              "peer": theirs and {"name": f"transformers {architecture_of(kind)}.generate",
                                  **theirs}}
    if decoding == "thorough":
      result["rescore"] = {"setting": spec, "rescore_candidates": group,
                           "rescore_positions": width}
    if rescored is not None:
      result["rescored_candidates"] = int(rescored.sum())
    if their_tokens is not None:
      result["token_agreement"] = _agreement(holder["out"].sequences, their_tokens)
    yield result
