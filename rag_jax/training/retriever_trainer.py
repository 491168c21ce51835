"""Train a DPR-style dual encoder on (question, positive passage) pairs, in one call.

    from rag_jax.training.retriever_trainer import default_config, train_retriever
    result = train_retriever(questions, titles, texts, tokenizer, encoder_config,
                             default_config(num_train_steps=800), out="runs/retriever")
    # runs/retriever/{question_encoder,context_encoder}: DPR checkpoints with the tokenizer,
    # ready for python -m rag_jax.commands.build_index --encoder runs/retriever/context_encoder;
    # runs/retriever/train/: metrics.jsonl, train.log and the checkpoints a killed run resumes

The objective is DPR's (Karpukhin et al. 2020): for a batch of B pairs, scores = q(x_i) . d(z_j)
for every question i and passage j of the batch, and the loss is the cross-entropy of picking
z_i among the B passages (in-batch negatives). A passage that is also another pair's positive
(one fact asked by two templates) is not counted as a negative. Both encoders are separate BERTs
(DPRQuestionEncoder / DPRContextEncoder); the passage input is DPR's `title [SEP] text`
(rag_jax.retrieval.encode.tokenize_passages, the tokenization the index builder uses).

With `config.hard_negatives` each pair also brings one hard negative passage, DPR's recipe
(Karpukhin et al. 2020, section 3.2: "the top passage returned by BM25 which does not contain
the answer", :func:`bm25_hard_negatives`): the B hard negatives join the B in-batch passages, so
each question picks its positive among 2B passages (DPR's best setting: gold + in-batch + one
BM25 negative per question).

The loop is rag_jax.training.loop.train_loop (resume, NaN stop, metrics, checkpoints), the
optimizer rag_jax.training.optimizer.make_optimizer, as for the other trainers. The step is one
jit with explicit shardings, data parallel over every device of every process (the global
"data" mesh; batch_size a multiple of the devices): each device encodes its rows of the batch,
and XLA all-gathers the passage embeddings for the in-batch scores and all-reduces the
gradients. On several processes (rag_jax.distributed) each process feeds its rows of every
global batch (parallel.host_batch), orbax's saves are collective, and process 0 alone writes
the log, the metrics and the two DPR checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rag_jax import checkpoints, metrics
from rag_jax.data.sampling import epoch_rows
from rag_jax.distributed import barrier, is_primary, on_primary
from rag_jax.models.bert import BertConfig, DPREncoder
from rag_jax.parallel import data_mesh, host_batch, replicate
from rag_jax.retrieval.encode import tokenize_passages
from rag_jax.retrieval.index import TextIndex
from rag_jax.training import loop, optimizer
from rag_jax.training.state import TrainState, create_train_state
from rag_jax.utils.logs import workdir_logging

AGREE_TIMEOUT_S = 600  # several processes: how long each waits for process 0's files


def default_config(**overrides: Any) -> ml_collections.ConfigDict:
  """train_retriever's config: the shared optimizer and loop fields (configs/rag_finetune.py's
  names) and the retriever's own. `overrides` replace fields."""
  config = ml_collections.ConfigDict()
  config.batch_size = 64  # Pairs per step = 1 positive + (batch_size - 1) in-batch negatives.
  config.num_train_steps = 800  # Optimizer steps.
  config.learning_rate = 1e-3  # Peak AdamW rate (from scratch; DPR used 2e-5 on BERT).
  config.warmup_steps = 50  # Linear warm-up, then linear decay to lr_end.
  config.lr_end = 0.0  # Decay target.
  config.lr_power = 1.0  # Linear decay.
  config.weight_decay = 0.0  # AdamW weight decay.
  config.max_grad_norm = 1.0  # Global-norm clipping (DPR: 2.0).
  config.adam_b1 = 0.9  # AdamW beta1.
  config.adam_b2 = 0.999  # AdamW beta2.
  config.adam_eps = 1e-8  # AdamW epsilon.
  config.max_question_length = 32  # Question tokens (with specials).
  config.max_passage_length = 48  # Passage tokens: title + text with specials.
  # One BERT for questions and passages (from scratch, a name token then has one embedding on
  # both sides, and matching names is learned in a fraction of the steps); False: DPR's two
  # encoders. Either way two checkpoints are written.
  config.shared_encoder = True
  # One BM25 hard negative per pair beside the in-batch negatives (DPR's recipe; give
  # train_retriever's hard_negatives).
  config.hard_negatives = False
  # EDA noise on the training questions (Wei & Zou 2019): per step, each question's words are
  # deleted, swapped and joined by random training words at this rate (0: off). See eda().
  config.question_eda = 0.0
  config.log_every = 100  # Steps between metric lines.
  config.eval_every = 10**9  # No held-out evaluation inside the loop.
  config.checkpoint_every = 100  # Steps between orbax checkpoints (a kill resumes).
  config.keep_checkpoints = 1  # Checkpoints kept on disk.
  config.seed = 0  # Initialisation, data order, dropout.
  config.update(overrides)
  return config


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


def in_batch_loss(q: jax.Array, d: jax.Array, passage_ids: jax.Array,
                  negatives: jax.Array | None = None,
                  negative_ids: jax.Array | None = None) -> jax.Array:
  """Mean in-batch-negative cross-entropy. q, d: [B, D]; passage_ids [B] (equal ids = the same
  passage, not a negative for the other's question). With hard `negatives` [M, D] (ids
  [M]): question i picks d_i among the B positives and the M negatives; a negative that is
  question i's own positive passage is not counted against it."""
  cands, ids = d, passage_ids
  if negatives is not None:
    cands = jnp.concatenate([d, negatives])  # [B + M, D]
    ids = jnp.concatenate([passage_ids, negative_ids])
  scores = q @ cands.T  # [B, B + M]
  target = jnp.eye(len(q), cands.shape[0], dtype=bool)
  same = passage_ids[:, None] == ids[None, :]
  scores = jnp.where(same & ~target, -1e9, scores)
  return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(scores, axis=-1)))


def eda(question: str, rng: np.random.Generator, alpha: float, words: list[str]) -> str:
  """Easy data augmentation (Wei & Zou 2019), applied at once: each word deleted with
  probability alpha (one is kept), then n = max(1, round(alpha * len)) random swaps of two
  words and n insertions of random `words` at random positions. It moves the question's
  entity and varies the words around it, so the encoder cannot key on one template's word
  positions."""
  tokens = question.split()
  if not tokens:  # nothing to delete, swap or move
    return question
  kept = [w for w in tokens if rng.random() >= alpha] or [tokens[rng.integers(len(tokens))]]
  n = max(1, round(alpha * len(tokens)))
  for _ in range(n):
    i, j = rng.integers(len(kept), size=2)
    kept[i], kept[j] = kept[j], kept[i]
  for _ in range(n):
    kept.insert(int(rng.integers(len(kept) + 1)), words[rng.integers(len(words))])
  return " ".join(kept)


def bm25_hard_negatives(index: TextIndex, questions: list[str], answers: list[str],
                        gold_rows: np.ndarray, passage_text: Any, depth: int = 20) -> np.ndarray:
  """DPR's hard negative per question: the row of BM25's best passage that is not the gold one
  and does not contain the answer (case-insensitive); -1 where none of the top `depth` does.

  passage_text(row) -> the passage's "title text"."""
  _, rows = index.search_text(questions, min(depth, index.count))
  out = np.full(len(questions), -1, np.int64)
  for i, (answer, gold, cands) in enumerate(zip(answers, gold_rows, rows, strict=True)):
    needle = answer.strip().lower()
    for r in cands:
      if r != gold and needle not in passage_text(int(r)).lower():
        out[i] = r
        break
  return out


def train_retriever(questions: list[str], titles: list[str], texts: list[str], tokenizer: Any,
                    encoder_config: BertConfig, config: ml_collections.ConfigDict | None = None,
                    out: str | os.PathLike | None = None,
                    hard_negatives: tuple[list[str], list[str]] | None = None
                    ) -> RetrieverResult:
  """Trains question and passage encoders from scratch on aligned lists (pair i = questions[i]
  with passage (titles[i], texts[i])). With `out`, saves both as DPR checkpoints there and keeps
  the loop's metrics and checkpoints in out/train (a rerun resumes); without it they go to a
  temporary directory. hard_negatives: (titles, texts) aligned with the pairs, one negative
  passage each (e.g. from :func:`bm25_hard_negatives`); used when config.hard_negatives."""
  config = config or default_config()
  use_negatives = config.hard_negatives
  if use_negatives and (hard_negatives is None or len(hard_negatives[0]) != len(questions)):
    raise ValueError("config.hard_negatives needs hard_negatives=(titles, texts) with one "
                     f"passage per pair ({len(questions)})")
  if not len(questions) == len(titles) == len(texts):
    raise ValueError(f"questions ({len(questions)}), titles ({len(titles)}) and texts "
                     f"({len(texts)}) must be aligned pairs")
  if len(questions) < config.batch_size:
    raise ValueError(f"{len(questions)} pairs < batch_size {config.batch_size}")
  mesh = data_mesh()  # every device of every process: see the module docstring
  if config.batch_size % mesh.devices.size:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                     f"{mesh.devices.size} devices")
  pad = tokenizer.pad_token_id
  q_ids = _pad(tokenizer(questions, truncation=True,
                         max_length=config.max_question_length)["input_ids"], pad)  # [N, Lq]
  p_ids = _pad(tokenize_passages(tokenizer, titles, texts, config.max_passage_length), pad)
  keys = {(t, x): i for i, (t, x) in enumerate(zip(titles, texts, strict=True))}
  passage_ids = np.asarray([keys[(t, x)] for t, x in zip(titles, texts, strict=True)], np.int32)
  if use_negatives:
    n_titles, n_texts = hard_negatives
    n_seqs = tokenize_passages(tokenizer, n_titles, n_texts, config.max_passage_length)
    width = max(p_ids.shape[1], max(len(x) for x in n_seqs))
    n_ids = _pad(n_seqs, pad, width)
    p_ids = np.pad(p_ids, ((0, 0), (0, width - p_ids.shape[1])), constant_values=pad)
    # A negative that is some pair's positive gets that passage's id (masked for that pair).
    n_pids = np.asarray([keys.get((t, x), len(keys) + i) for i, (t, x) in
                         enumerate(zip(n_titles, n_texts, strict=True))], np.int32)

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
  tx = optimizer.make_optimizer(config, params, frozen=lambda path: False)
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  state = replicate(create_train_state(None, params, tx, jax.random.key_data(dropout_key)),
                    mesh)

  def step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.dropout_key), state.step)
    kq, kc = jax.random.split(key)

    def loss_fn(p):
      q = q_model.apply({"params": p[towers[0]]}, batch["q"], deterministic=False,
                        rngs={"dropout": kq}).pooler_output
      passages = (jnp.concatenate([batch["p"], batch["n"]]) if use_negatives else batch["p"])
      d = c_model.apply({"params": p[towers[1]]}, passages, deterministic=False,
                        rngs={"dropout": kc}).pooler_output
      if use_negatives:
        b = batch["q"].shape[0]
        return in_batch_loss(q, d[:b], batch["pid"], d[b:], batch["nid"])
      return in_batch_loss(q, d, batch["pid"])

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), {
        "loss_sum": loss, "steps": jnp.ones((), jnp.float32),
        "grad_norm": optax.global_norm(grads)}

  step_fn = jax.jit(step, in_shardings=(replicated, data), out_shardings=(replicated, replicated),
                    donate_argnums=0)

  alpha = float(config.question_eda)
  vocabulary = sorted({w for q in questions for w in q.split()})

  def question_batch(rows: np.ndarray, index: int) -> np.ndarray:
    if not alpha:
      return q_ids[rows]
    rng = np.random.default_rng((config.seed, index))  # a pure function of the step
    noisy = [eda(questions[r], rng, alpha, vocabulary) for r in rows]
    return _pad(tokenizer(noisy, truncation=True, max_length=config.max_question_length)
                ["input_ids"], pad, q_ids.shape[1])  # [B, Lq]: the static width

  def train_step(state: TrainState, index: int):
    rows = epoch_rows(config.seed, index, len(questions), config.batch_size)
    batch = {"q": question_batch(rows, index), "p": p_ids[rows], "pid": passage_ids[rows]}
    if use_negatives:
      batch.update(n=n_ids[rows], nid=n_pids[rows])
    return step_fn(state, host_batch(batch, mesh))

  if out is None and jax.process_count() > 1:
    raise ValueError("train_retriever on several processes needs `out` (a directory they share)")
  with contextlib.ExitStack() as stack:
    workdir = (Path(out) / "train" if out is not None
               else Path(stack.enter_context(tempfile.TemporaryDirectory())))
    workdir.mkdir(parents=True, exist_ok=True)
    if is_primary():  # several processes: process 0's log; the others log to their own
      stack.enter_context(workdir_logging(workdir))
    state, _ = loop.train_loop(
        config, workdir, state, train_step, desc="retriever",
        summarize=lambda w: {"loss": w["loss_sum"] / w["steps"]},
        postfix=lambda r: {"loss": f"{r['loss']:.3f}"})
    barrier("retriever/metrics", AGREE_TIMEOUT_S)  # process 0 has written metrics.jsonl
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]
  losses = sorted({r["step"]: r["loss"] for r in records}.items())  # The last run's, per step.
  params = jax.device_get(state.params)
  result = RetrieverResult(params[towers[0]], params[towers[1]], q_model, c_model, losses)
  if out is not None:
    on_primary("retriever/save", lambda: save_retriever(result, tokenizer, out), AGREE_TIMEOUT_S)
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
  recall = metrics.id_recall_at_k(top, np.asarray(gold_rows)[:, None], ks)
  return {f"recall@{k}": r for k, r in recall.items()}
