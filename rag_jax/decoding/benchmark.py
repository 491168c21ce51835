"""Decoding throughput: rag_jax.decoding.generate against transformers' generate, same run.

    python -m rag_jax.decoding.benchmark [--batch 4] [--n-docs 5] [--beams 4] [--repeats 3]

Builds random BART / RAG-Token / RAG-Sequence models with transformers (offline, seeded), saves
and loads them with rag_jax.checkpoints, and times generation of the same batch by both
(min_length = max_length - 1 so that every hypothesis runs the full length in both: the work
is fixed). Prints questions/s (sequences/s) per mode; rag_jax's compile time is reported
separately and excluded. RAG-Sequence fast decoding has no transformers counterpart.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from rag_jax.checkpoints import load_pretrained
from rag_jax.decoding.generate import generate

BART = dict(vocab_size=8192, d_model=256, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=1024,
            decoder_ffn_dim=1024, max_position_embeddings=128)
DPR = dict(vocab_size=8192, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
           intermediate_size=128, max_position_embeddings=128)


def _models(tmp: Path, n_docs: int):
  import torch
  import transformers

  torch.manual_seed(0)
  out = {"bart": transformers.BartForConditionalGeneration(transformers.BartConfig(**BART))}
  rag_cfg = transformers.RagConfig.from_question_encoder_generator_configs(
      transformers.DPRConfig(**DPR), transformers.BartConfig(**BART), n_docs=n_docs)
  out["rag_token"] = transformers.RagTokenForGeneration(rag_cfg)
  out["rag_sequence"] = transformers.RagSequenceForGeneration(rag_cfg)
  paths = {}
  for name, model in out.items():
    model.eval().save_pretrained(tmp / name)
    paths[name] = tmp / name
  return out, paths


def _time(fn, repeats: int) -> float:
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> None:
  import torch

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--n-docs", type=int, default=5)
  parser.add_argument("--beams", type=int, default=4)
  parser.add_argument("--max-length", type=int, default=20)
  parser.add_argument("--context-length", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  b, n = args.batch, args.n_docs
  rng = np.random.default_rng(0)
  ids = rng.integers(3, BART["vocab_size"], (b * n, args.context_length))
  mask = np.ones_like(ids)
  doc_scores = rng.normal(size=(b, n)).astype(np.float32)
  opts = dict(num_beams=args.beams, max_length=args.max_length, min_length=args.max_length - 1,
              num_return_sequences=1, length_penalty=1.0, early_stopping=False)
  with tempfile.TemporaryDirectory() as tmp:
    torch_models, paths = _models(Path(tmp), n)
    loaded = {name: load_pretrained(path) for name, path in paths.items()}
  t = lambda x: torch.from_numpy(np.asarray(x))  # noqa: E731
  rag_in = dict(context_input_ids=ids, context_attention_mask=mask, doc_scores=doc_scores)
  cases = [
      ("BART beam", "bart", dict(input_ids=ids[:b], attention_mask=mask[:b]),
       lambda m: m.generate(t(ids[:b]), attention_mask=t(mask[:b]), do_sample=False, **opts)),
      ("RAG-Token beam", "rag_token", rag_in, lambda m: m.generate(
          context_input_ids=t(ids), context_attention_mask=t(mask), doc_scores=t(doc_scores),
          n_docs=n, do_sample=False, **opts)),
      ("RAG-Seq thorough", "rag_sequence", dict(rag_in, decoding="thorough"), lambda m: m.generate(
          context_input_ids=t(ids), context_attention_mask=t(mask), doc_scores=t(doc_scores),
          n_docs=n, do_sample=False, **opts)),
      ("RAG-Seq fast", "rag_sequence", dict(rag_in, decoding="fast"), None),
  ]
  print(f"batch {b} questions, n_docs {n}, beams {args.beams}, max_length {args.max_length}, "
        f"context length {args.context_length}, torch threads {torch.get_num_threads()}")
  print(f"{'mode':18s} {'rag_jax q/s':>12s} {'compile s':>10s} {'transformers q/s':>17s}")
  for label, name, inputs, torch_call in cases:
    model, params = loaded[name]
    run = lambda model=model, params=params, inputs=inputs: generate(  # noqa: E731
        model, params, **inputs, **opts)
    compile_s = _time(run, 1)
    ours = _time(run, args.repeats)
    theirs = "n/a"
    if torch_call is not None:
      with torch.no_grad():
        call = lambda m=torch_models[name], f=torch_call: f(m)  # noqa: E731
        theirs = f"{b / _time(call, args.repeats):.2f}"
    print(f"{label:18s} {b / ours:12.2f} {compile_s - ours:10.1f} {theirs:>17s}")


if __name__ == "__main__":
  main()
