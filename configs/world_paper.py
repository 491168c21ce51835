"""The paper's findings in miniature: Table 1, the Table 6 ablations (BM25, frozen, learned
retriever x RAG-Sequence, RAG-Token) with their FEVER-like column, the hot-swap 2x2 and Figures
2 and 3, on the default and the hard synthetic world, in one command
(rag_jax/experiments/world/paper.py):

    python train.py --config=configs/world_paper.py --workdir=runs/paper

Each world is its own job config (configs/default.py, configs/world_hard.py) with DPR's BM25 hard
negatives for the retriever. Every RAG row of a world trains with the same steps, batch, seed and
model sizes; the closed book too. Step counts are half the default job's (300 / 600) so that
the 2 worlds' 14 trainings and the 6 FEVER-like ones stay within an hour on 2 CPU cores (the
measured time: docs/world.md): `rag_steps` below; the same
comparison with the default job's steps is `--config.worlds.default.rag.num_train_steps=300`.
The FEVER-like rows (six more trainings on claims, default world) are `config.fever`.
Report: workdir/report.md, the PNGs beside it; docs/world.md, "The paper in miniature".

`--config=configs/world_paper.py:tiny`: every phase on a tiny default world only, a few steps
each (a couple of minutes on 2 CPU cores): a wiring check, not a measurement.
"""

import ml_collections

from configs import default, world_hard


def get_config(size: str | None = None) -> ml_collections.ConfigDict:
  """The full experiment, or with size "tiny" its wiring check (see the module docstring)."""
  config = ml_collections.ConfigDict()
  config.trainer = "world_paper"  # train.py dispatch: rag_jax.experiments.world.paper.
  rag_steps = {"default": 150, "hard": 300}  # RAG / closed-book steps per row of each world.
  config.worlds = ml_collections.ConfigDict()
  for name, module in (("default", default), ("hard", world_hard)):
    world = module.get_config()
    world.retriever.hard_negatives = True  # One BM25 hard negative per question (DPR).
    # DPR's recipe as the paper used it, no question noise (configs/world_hard.py adds EDA;
    # its effect with hard negatives: docs/world.md).
    world.retriever.question_eda = 0.0
    world.rag.num_train_steps = rag_steps[name]
    world.rag.warmup_steps = rag_steps[name] // 10
    world.rag.checkpoint_every = rag_steps[name]
    config.worlds[name] = world

  # Read by the evaluation phases only, like each world's `eval` group: changed on a trained
  # workdir, the trained rows are kept and evaluated again (rag_jax/training/loop.py).
  config.paper = ml_collections.ConfigDict()
  config.paper.docs = (1, 2, 3, 5, 10, 20, 50)  # Figure 3: passages at test time (<= passages).
  config.paper.sweep_questions = 100  # Held-out questions of the Figure-3 sweep (the first N).
  config.paper.figure2_questions = 3  # Figure 2 panels (hard world, multi-token answers).

  # The FEVER-like column (rag_jax.experiments.world.fever): the six rows fine-tuned on claims ->
  # label word after the world's QA phases. A fresh BART is still at chance on the label after 60
  # steps (held-out loss 1.99 per claim, ln 3 + the fixed tokens), so each row gets 200 steps, on
  # the default world only: the six rows and their evaluation took 16 minutes on 2 CPU cores
  # shared with other jobs (1.2-2.6 steps/s), about 9 expected on quiet ones at the QA rows'
  # speed; the hard world's six would add as much again (--config.fever.worlds='("default",
  # "hard")').
  config.fever = ml_collections.ConfigDict()
  config.fever.worlds = ("default",)  # Worlds that get the FEVER-like rows.
  config.fever.num_train_steps = 200  # Steps of each FEVER row (batch, seed: the world's rag).
  config.fever.max_label_tokens = 4  # Decoding length: decoder start, <s>, the label, </s>.
  if size == "tiny":
    _tiny(config)
  elif size:
    raise ValueError(f"configs/world_paper.py:{size}: the only size is 'tiny'")
  return config


def _tiny(config: ml_collections.ConfigDict) -> None:
  """One tiny default world, a few steps per phase: every table of the report, no finding."""
  del config.worlds["hard"]
  world = config.worlds.default
  default.shrink_to_tiny(world, num_people=40)
  world.eval.batch_size = 40  # Questions per decoding batch.
  config.paper.docs = (1, 3)  # Figure 3 sweep.
  config.paper.sweep_questions = 10  # Its questions.
  config.paper.figure2_questions = 0  # No Figure 2 (it needs the hard world).
  config.fever.worlds = ("default",)  # The FEVER-like rows of the tiny world.
  config.fever.num_train_steps = 4  # FEVER steps per row.
