"""The paper's findings in miniature: Table 1, the Table 6 ablations (BM25, frozen, learned
retriever x RAG-Sequence, RAG-Token), the hot-swap 2x2 and Figures 2 and 3, on the default and
the hard synthetic world, in one command (rag_jax/experiments/world/paper.py):

    python train.py --config=configs/world_paper.py --workdir=runs/paper

Each world is its own job config (configs/default.py, configs/world_hard.py) with DPR's BM25 hard
negatives for the retriever. Every RAG row of a world trains with the same steps, batch, seed and
model sizes; the closed book too. Step counts are lower than the default job's (300 / 600) so
that 2 worlds x 7 trainings fit about 30 minutes on 2 CPU cores: `rag_steps` below; the same
comparison with the default job's steps is `--config.worlds.default.rag.num_train_steps=300`.
Report: workdir/report.md, the PNGs beside it; docs/paper_in_miniature.md.
"""

import ml_collections

from configs import default, world_hard


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.trainer = "world_paper"  # train.py dispatch: rag_jax.experiments.world.paper.
  rag_steps = {"default": 150, "hard": 300}  # RAG / closed-book steps per row of each world.
  config.worlds = ml_collections.ConfigDict()
  for name, module in (("default", default), ("hard", world_hard)):
    world = module.get_config()
    world.retriever.hard_negatives = True  # One BM25 hard negative per question (DPR).
    world.rag.num_train_steps = rag_steps[name]
    world.rag.warmup_steps = rag_steps[name] // 10
    world.rag.checkpoint_every = rag_steps[name]
    config.worlds[name] = world

  config.paper = ml_collections.ConfigDict()
  config.paper.docs = (1, 2, 3, 5, 10, 20, 50)  # Figure 3: passages at test time.
  config.paper.sweep_questions = 100  # Held-out questions of the Figure-3 sweep (the first N).
  config.paper.figure2_questions = 3  # Figure 2 panels (hard world, multi-token answers).
  return config
