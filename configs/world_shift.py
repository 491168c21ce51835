"""The shifted world: a retriever trained on one world, RAG fine-tuned on a reworded one, with the
context encoder frozen, trained with the index refreshed every step, rolling, on a schedule, by
reranking, or not refreshed (rag_jax/experiments/world/shift.py):

    python train.py --config=configs/world_shift.py --workdir=runs/shift

World A is the default job's world (one fact per passage, titled with its person); DPR is
trained on it. World B states the same facts with the same questions and answers, each passage
naming its subject beside `shift.co_mentions` other people ("X , a friend of A , B and C , was
born in V"), which the world-A context encoder cannot tell apart. Every row is RAG-Sequence with
the default job's model sizes, batch, seed and steps, over world B's index, retrieved on the
devices. A smaller world than the default job's (300 people) keeps the every-step row (the
whole index re-encoded in each step) and the five others near 20 minutes on 2 CPU cores.
Report: workdir/report.md, report.json; docs/world.md, "The shifted world".

`--config=configs/world_shift.py:tiny`: a tiny world, a few steps per row (a wiring check,
not a measurement; tests/test_world_shift.py).
"""

import ml_collections

from configs import default


def get_config(size: str | None = None) -> ml_collections.ConfigDict:
  """The experiment, or with size "tiny" its wiring check (see the module docstring)."""
  config = default.get_config()
  config.trainer = "world_shift"  # train.py dispatch: rag_jax.experiments.world.shift.
  config.world.num_people = 300  # Invented people (the default job's 600 halved: speed).
  config.world.num_meetings = 100  # Distractor passages naming two people (halved with them).
  config.rag.retrieval = "device"  # Exact search in the jitted step: every refresh needs it.

  config.shift = ml_collections.ConfigDict()
  # Other people named in each world-B fact passage beside its subject (1 + co_mentions names
  # per passage, the subject first). The world-A retriever's held-out recall@5 falls from 1.0 on
  # world A to 0.61 on world B with 3 (docs/world.md).
  config.shift.co_mentions = 3
  # Rows, each one RAG-Sequence training from the same start (rag_jax.training.config_check
  # .SHIFT_ROWS): frozen = the context encoder and index fixed (standard RAG); every_step = the
  # context encoder trained and the whole index re-encoded in every step (the exact upper
  # bound); rolling = rolling_rows_per_step rows per step; scheduled = refresh_schedule;
  # rerank = rerank_candidates rescored; stale = trained, never refreshed.
  config.shift.rows = ("frozen", "every_step", "rolling", "scheduled", "rerank", "stale")
  # RAG-Sequence steps on world A (over its own index, the context encoder frozen) before the
  # rows: the generator learns to read passages there, and every row starts from that model on
  # world B. 0: the rows start from the fresh BART (which at 300 steps is the bottleneck).
  config.shift.world_a_steps = 300
  # Peak AdamW rate of the trained context encoder: the question encoder's (configs/default.py).
  # 1e-4 from a fresh BART collapsed the context encoder (held-out recall@5 0.61 -> 0.08).
  config.shift.ctx_learning_rate = 3e-5
  # rolling: rows re-encoded per step (1,657 passages: every row at most 25 steps old).
  config.shift.rolling_rows_per_step = 64
  config.shift.refresh_schedule = "50"  # scheduled: Atlas's syntax; "50": every 50 steps.
  config.shift.rerank_candidates = 20  # rerank: candidates L > rag.n_docs from the stale index.
  if size == "tiny":
    _tiny(config)
  elif size:
    raise ValueError(f"configs/world_shift.py:{size}: the only size is 'tiny'")
  return config


def _tiny(config: ml_collections.ConfigDict) -> None:
  """A tiny world and models, a few steps per row: every row and the report, no finding."""
  default.shrink_to_tiny(config, num_people=30)
  config.eval.batch_size = 30  # Questions per decoding batch.
  config.eval.recall_ks = (1, 5)  # recall@k depths.
  config.shift.co_mentions = 2  # Names beside the subject.
  config.shift.world_a_steps = 2  # RAG steps on world A.
  config.shift.rolling_rows_per_step = 16  # Rows per step (about 170 passages).
  config.shift.refresh_schedule = "2"  # A full refresh every 2 steps.
  config.shift.rerank_candidates = 6  # Candidates (> n_docs).
