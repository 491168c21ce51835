"""The default job's RAG training step: rag_jax against transformers' PyTorch RAG, same run.

Same random weights (a DPR question encoder and a BART of the world job's sizes, built by
transformers, loaded through rag_jax.checkpoints), same inputs (`--batch` questions x `--n_docs`
passages of `--src` generator tokens, `--tgt` label tokens), the whole step on both sides:
question encoder, doc_scores = q . d, generator on every passage, the RAG marginal likelihood,
backward, global-norm clipping and AdamW. Medians of `--iters` steps after `--warmup`; our compile
time excluded. Also prints XLA's FLOP count of our step, the FLOP rate each side reaches, and
a plain float32 matmul's rate on the same cores (the ceiling either side can approach), beside
the torch feasibility run's 4.55 steps/s (shared/reference/synthetic_world.md).

  python benchmarks/world_step.py                      # the world job's shape (32 x 5, 21 -> 4)
  python benchmarks/world_step.py --model_type rag_token
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.timing import median_seconds  # noqa: E402
from rag_jax.training.world_report import FEASIBILITY_STEPS_PER_S  # noqa: E402


def torch_rag(args):
  """A transformers RAG model with the world job's sizes (dropout 0)."""
  import transformers as tf
  q = tf.DPRConfig(vocab_size=args.vocab, hidden_size=128, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=512, hidden_dropout_prob=0.0,
                   attention_probs_dropout_prob=0.0, max_position_embeddings=64)
  g = tf.BartConfig(vocab_size=args.vocab, d_model=128, encoder_layers=2, decoder_layers=2,
                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=512,
                    decoder_ffn_dim=512, dropout=0.0, attention_dropout=0.0,
                    activation_dropout=0.0, max_position_embeddings=64)
  config = tf.RagConfig.from_question_encoder_generator_configs(q, g, n_docs=args.n_docs)
  cls = (tf.RagSequenceForGeneration if args.model_type == "rag_sequence"
         else tf.RagTokenForGeneration)
  import torch
  torch.manual_seed(0)
  return cls(config, question_encoder=tf.DPRQuestionEncoder(q),
             generator=tf.BartForConditionalGeneration(g))


def inputs(args) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  b, n = args.batch, args.n_docs
  labels = rng.integers(3, args.vocab, (b, args.tgt)).astype(np.int32)
  labels[:, 0] = 0
  return {"input_ids": rng.integers(3, args.vocab, (b, args.question)).astype(np.int32),
          "attention_mask": np.ones((b, args.question), np.int32),
          "context_input_ids": rng.integers(3, args.vocab, (b, n, args.src)).astype(np.int32),
          "context_attention_mask": np.ones((b, n, args.src), np.int32),
          "doc_embeds": rng.standard_normal((b, n, 128)).astype(np.float32),
          "labels": labels, "weights": np.ones(b, np.float32)}


def optimizer_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=10, num_train_steps=1000, lr_end=0.0, lr_power=1.0,
      weight_decay=0.0, max_grad_norm=1.0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8))


def ours(args, checkpoint: str, batch: dict[str, np.ndarray]) -> dict[str, float]:
  import dataclasses

  from rag_jax import checkpoints, losses
  from rag_jax.training import optimizer
  from rag_jax.training.mesh import data_mesh, global_batch, replicate
  from rag_jax.training.rag_step import make_train_step
  from rag_jax.training.state import create_train_state
  model, params = checkpoints.load_pretrained(checkpoint)
  model = model.clone(config=dataclasses.replace(model.config, n_docs=args.n_docs))
  loss = {"rag_sequence": losses.rag_sequence_nll, "rag_token": losses.rag_token_nll}
  loss_fn = functools.partial(loss[args.model_type], epsilon=0.0, pad_token_id=1)
  mesh = data_mesh()
  state = replicate(create_train_state(model.apply, params,
                                       optimizer.make_optimizer(optimizer_config(), params),
                                       jax.random.key_data(jax.random.key(0))), mesh)
  step = make_train_step(model, mesh, loss_fn)
  device_batch = global_batch(batch, mesh)
  cost = step.lower(state, device_batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  holder = {"state": state}

  def run():
    holder["state"], metrics = step(holder["state"], device_batch)
    jax.block_until_ready(metrics)

  seconds = median_seconds(run, args.iters, args.warmup)
  return {"step_s": seconds, "flops": float(cost["flops"])}


def torch_step_seconds(args, model, batch: dict[str, np.ndarray]) -> float:
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
  t = {k: torch.from_numpy(v.astype(np.int64) if v.dtype == np.int32 else v)
       for k, v in batch.items()}
  b, n, length = batch["context_input_ids"].shape

  def run():
    q = model.question_encoder(t["input_ids"], attention_mask=t["attention_mask"])[0]
    doc_scores = torch.bmm(q.unsqueeze(1), t["doc_embeds"].transpose(1, 2)).squeeze(1)
    out = model(context_input_ids=t["context_input_ids"].reshape(b * n, length),
                context_attention_mask=t["context_attention_mask"].reshape(b * n, length),
                doc_scores=doc_scores, labels=t["labels"], n_docs=n, reduce_loss=False)
    opt.zero_grad(set_to_none=True)
    out.loss.mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  return median_seconds(run, args.iters, args.warmup)


def matmul_gflops(size: int = 2048) -> float:
  """A plain float32 matmul's rate under XLA on these cores: the practical ceiling."""
  x = jnp.ones((size, size), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  seconds = median_seconds(lambda: jax.block_until_ready(f(x)), 5, 2)
  return 2 * size**3 / seconds / 1e9


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--model_type", default="rag_sequence", choices=["rag_sequence", "rag_token"])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--n_docs", type=int, default=5)
  parser.add_argument("--src", type=int, default=21, help="generator input tokens per passage")
  parser.add_argument("--tgt", type=int, default=4, help="label tokens")
  parser.add_argument("--question", type=int, default=10, help="question tokens")
  parser.add_argument("--vocab", type=int, default=1101, help="the world's word vocabulary")
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args()

  torch_model = torch_rag(args)
  batch = inputs(args)
  with tempfile.TemporaryDirectory() as tmp:
    torch_model.save_pretrained(tmp)
    mine = ours(args, tmp, batch)
  peer = torch_step_seconds(args, torch_model, batch)
  peak = matmul_gflops()
  shape = {k: getattr(args, k) for k in ("model_type", "batch", "n_docs", "src", "tgt")}
  rows = [
      {"impl": "rag_jax", "step_s": mine["step_s"], "steps_per_s": 1 / mine["step_s"],
       "gflop_per_s": mine["flops"] / mine["step_s"] / 1e9},
      {"impl": "transformers_torch", "step_s": peer, "steps_per_s": 1 / peer,
       "gflop_per_s": mine["flops"] / peer / 1e9},
  ]
  for row in rows:
    print(json.dumps({**shape, **row}))
  print(json.dumps({
      **shape, "step_gflop": mine["flops"] / 1e9, "matmul_peak_gflop_per_s": peak,
      "speedup_vs_transformers": peer / mine["step_s"],
      "vs_feasibility_run": (1 / mine["step_s"]) / FEASIBILITY_STEPS_PER_S,
      "steps_per_s_at_matmul_peak": peak * 1e9 / mine["flops"],
      "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}))


if __name__ == "__main__":
  main()
