"""Train a DPR-style dual encoder on (question, positive passage) pairs, in one call.

    from rag_jax.training.retriever_trainer import RetrieverTrainConfig, train_retriever
    result = train_retriever(questions, titles, texts, tokenizer, encoder_config,
                             RetrieverTrainConfig(num_steps=800), out="runs/retriever")
    # runs/retriever/{question_encoder,context_encoder}: DPR checkpoints with the tokenizer,
    # ready for python -m rag_jax.commands.build_index --encoder runs/retriever/context_encoder

The objective is DPR's (Karpukhin et al. 2020): for a batch of B pairs, scores = q(x_i) . d(z_j)
for every question i and passage j of the batch, and the loss is the cross-entropy of picking
z_i among the B passages (in-batch negatives). A passage that is also another pair's positive
(one fact asked by two templates) is not counted as a negative. Both encoders are separate BERTs
(DPRQuestionEncoder / DPRContextEncoder); the passage input is DPR's `title [SEP] text`
(rag_jax.retrieval.encode.tokenize_passages, the tokenization the index builder uses).

The step is one jit on one device: the retriever is small (the world's 0.5M-parameter BERT
trains at ~10 steps/s on 2 CPU cores), and sharding its batch would need an all-gather of the
passage embeddings, which deadlocked on 8 fake CPU devices sharing 2 cores (XLA CPU
rendezvous timeout). Data-parallel training of a paper-size retriever is left for later.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from rag_jax import checkpoints
from rag_jax.models.bert import BertConfig, DPREncoder
from rag_jax.parallel import data_mesh, replicate
from rag_jax.retrieval.encode import tokenize_passages
from rag_jax.training.optimizer import learning_rate_schedule


@dataclasses.dataclass(frozen=True)
class RetrieverTrainConfig:
  """Optimisation settings of train_retriever."""

  batch_size: int = 64  # Pairs per step = 1 positive + (batch_size - 1) in-batch negatives.
  num_steps: int = 800  # Optimizer steps.
  learning_rate: float = 1e-3  # Peak AdamW learning rate (from scratch; DPR used 2e-5 on BERT).
  warmup_steps: int = 50  # Linear warm-up, then linear decay to 0.
  weight_decay: float = 0.0  # AdamW weight decay.
  max_grad_norm: float = 1.0  # Global-norm clipping (DPR: 2.0).
  max_question_length: int = 32  # Question tokens (with specials).
  max_passage_length: int = 48  # Passage tokens: title + text with specials.
  shared_encoder: bool = True  # One BERT for questions and passages (from scratch, a name
  # token then has one embedding on both sides, and matching names is learned in a fraction
  # of the steps); False: DPR's two encoders. Either way two checkpoints are written.
  seed: int = 0  # Initialisation, data order.


@dataclasses.dataclass
class RetrieverResult:
  """Trained parameters and the loss curve (mean loss per logged window)."""

  question_params: Any
  context_params: Any
  question_encoder: DPREncoder
  context_encoder: DPREncoder
  losses: list[tuple[int, float]]


def _pad(seqs: list[list[int]], pad_id: int, length: int | None = None) -> np.ndarray:
  length = length or max(len(s) for s in seqs)
  out = np.full((len(seqs), length), pad_id, np.int32)
  for i, s in enumerate(seqs):
    out[i, :len(s)] = s[:length]
  return out


def in_batch_loss(q: jax.Array, d: jax.Array, passage_ids: jax.Array) -> jax.Array:
  """Mean in-batch-negative cross-entropy. q, d: [B, D]; passage_ids [B] (equal ids = the same
  passage, not a negative for the other's question)."""
  scores = q @ d.T  # [B, B]
  same = passage_ids[:, None] == passage_ids[None, :]
  scores = jnp.where(same & ~jnp.eye(len(q), dtype=bool), -1e9, scores)
  return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(scores, axis=-1)))


def train_retriever(questions: list[str], titles: list[str], texts: list[str], tokenizer: Any,
                    encoder_config: BertConfig,
                    config: RetrieverTrainConfig = RetrieverTrainConfig(),
                    out: str | os.PathLike | None = None, progress: bool = True,
                    log_every: int = 100) -> RetrieverResult:
  """Trains question and passage encoders from scratch on aligned lists (pair i = questions[i]
  with passage (titles[i], texts[i])); saves both as DPR checkpoints in `out` if given."""
  if not len(questions) == len(titles) == len(texts):
    raise ValueError(f"questions ({len(questions)}), titles ({len(titles)}) and texts "
                     f"({len(texts)}) must be aligned pairs")
  mesh = data_mesh(jax.devices()[:1])
  if len(questions) < config.batch_size:
    raise ValueError(f"{len(questions)} pairs < batch_size {config.batch_size}")
  pad = tokenizer.pad_token_id
  q_ids = _pad(tokenizer(questions, truncation=True,
                         max_length=config.max_question_length)["input_ids"], pad)  # [N, Lq]
  p_ids = _pad(tokenize_passages(tokenizer, titles, texts, config.max_passage_length), pad)
  keys = {(t, x): i for i, (t, x) in enumerate(zip(titles, texts, strict=True))}
  passage_ids = np.asarray([keys[(t, x)] for t, x in zip(titles, texts, strict=True)], np.int32)

  q_cfg = dataclasses.replace(encoder_config, architecture="DPRQuestionEncoder")
  c_cfg = dataclasses.replace(encoder_config, architecture="DPRContextEncoder")
  q_model, c_model = DPREncoder(q_cfg), DPREncoder(c_cfg)
  init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
  kq, kc = jax.random.split(init_key)
  if config.shared_encoder:
    params = jax.jit(lambda: {"shared": q_model.init(kq, jnp.asarray(q_ids[:2]))["params"]})()
  else:
    params = jax.jit(lambda: {"question": q_model.init(kq, jnp.asarray(q_ids[:2]))["params"],
                              "context": c_model.init(kc, jnp.asarray(p_ids[:2]))["params"]})()
  towers = (("shared", "shared") if config.shared_encoder else ("question", "context"))
  schedule = learning_rate_schedule(config.learning_rate, config.warmup_steps, config.num_steps,
                                    0.0)
  tx = optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                   optax.adamw(schedule, weight_decay=config.weight_decay))
  opt_state = jax.jit(tx.init)(params)
  params, opt_state = replicate((params, opt_state), mesh)

  def step(params, opt_state, batch, step_index):
    key = jax.random.fold_in(dropout_key, step_index)
    kq, kc = jax.random.split(key)

    def loss_fn(p):
      q = q_model.apply({"params": p[towers[0]]}, batch["q"], deterministic=False,
                        rngs={"dropout": kq}).pooler_output
      d = c_model.apply({"params": p[towers[1]]}, batch["p"], deterministic=False,
                        rngs={"dropout": kc}).pooler_output
      return in_batch_loss(q, d, batch["pid"])

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  step_fn = jax.jit(step, in_shardings=(replicated, replicated, data, replicated),
                    out_shardings=(replicated, replicated, replicated), donate_argnums=(0, 1))
  rng = np.random.default_rng(config.seed)
  per_epoch = len(questions) // config.batch_size
  order = rng.permutation(len(questions))
  losses, window = [], []
  with tqdm(total=config.num_steps, desc="retriever", unit="step", disable=not progress,
            dynamic_ncols=True) as bar:
    for i in range(config.num_steps):
      if i and i % per_epoch == 0:
        order = rng.permutation(len(questions))
      rows = order[(i % per_epoch) * config.batch_size:(i % per_epoch + 1) * config.batch_size]
      batch = {"q": q_ids[rows], "p": p_ids[rows], "pid": passage_ids[rows]}
      params, opt_state, loss = step_fn(params, opt_state, batch, i)
      window.append(loss)
      bar.update(1)
      if (i + 1) % log_every == 0 or i + 1 == config.num_steps:
        mean = float(np.mean(jax.device_get(window)))
        losses.append((i + 1, mean))
        window = []
        bar.set_postfix(loss=f"{mean:.3f}")
        logging.info("retriever step %d: in-batch loss %.4f", i + 1, mean)
  params = jax.device_get(params)
  result = RetrieverResult(params[towers[0]], params[towers[1]], q_model, c_model, losses)
  if out is not None:
    save_retriever(result, tokenizer, out)
  return result


def save_retriever(result: RetrieverResult, tokenizer: Any, out: str | os.PathLike) -> None:
  """out/question_encoder and out/context_encoder: DPR checkpoints, each with the tokenizer."""

  out = Path(out)
  for name, model, params in (("question_encoder", result.question_encoder,
                               result.question_params),
                              ("context_encoder", result.context_encoder,
                               result.context_params)):
    checkpoints.save_pretrained(model, params, out / name)
    tokenizer.save_pretrained(str(out / name))


def recall_at_k(question_embeddings: np.ndarray, passage_embeddings: np.ndarray,
                gold_rows: np.ndarray, ks: tuple[int, ...] = (1, 5, 20)) -> dict[str, float]:
  """Exact-search recall@k: the share of questions whose gold passage row is in the top k."""
  scores = question_embeddings @ passage_embeddings.T  # [Q, N]
  top = np.argsort(-scores, axis=1)[:, :max(ks)]
  hit_rank = np.where(top == np.asarray(gold_rows)[:, None], np.arange(top.shape[1]), top.shape[1])
  first = hit_rank.min(axis=1)
  return {f"recall@{k}": float((first < k).mean()) for k in ks}
