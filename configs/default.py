"""The default job of `python train.py`: a small RAG trained from nothing on a synthetic world.

    python train.py                        # this config, in ./workdir

No download: the world, its tokenizer, a DPR retriever, a ScaNN index, RAG-Sequence, RAG-Token
and a closed-book BART are all built here, on CPU, in about 3 minutes on 2 cores, and the
report (held-out exact match, retrieval recall before/after RAG training, index hot-swap, speed,
phase times) is printed and written to the workdir (rag_jax/experiments/world/job.py). Model sizes
are those of the torch feasibility run (docs/world.md). The harder world
(subword tokenizer, multi-word answers, paraphrased questions) is configs/world_hard.py.
Override any field: `python train.py --config.rag.num_train_steps=600 --workdir=runs/longer`.
Figures of a full run: README.md and docs/world.md.
"""

import ml_collections

from configs import rag_finetune


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.trainer = "world"  # train.py dispatch: rag_jax.experiments.world.job.
  config.seed = 0  # Seeds every phase (init, data order, dropout).

  config.world = ml_collections.ConfigDict()
  config.world.seed = 0  # The world is a pure function of this seed and the fields below.
  config.world.num_people = 600  # Invented people, 4-6 facts each.
  config.world.num_cities = 40  # Birthplace values.
  config.world.num_companies = 30  # Employer values.
  config.world.first_year = 1900  # Birth years first_year .. first_year + num_years - 1.
  config.world.num_years = 100
  config.world.num_meetings = 200  # Distractor passages naming two people, a city, a year.
  config.world.train_templates = 2  # Training questions per training fact.
  config.world.swap_fraction = 0.3  # Share of held-out facts changed in world 2.
  config.world.hard = False  # Two-word names, multi-word answers, paraphrased held-out questions.

  config.tokenizer = ml_collections.ConfigDict()
  config.tokenizer.kind = "word"  # word (whole words) | bpe (byte-level subwords).
  config.tokenizer.vocab_size = 1000  # BPE vocabulary (word: every word of the world).

  config.retriever = ml_collections.ConfigDict()
  config.retriever.hidden_size = 128  # BERT width of each DPR encoder (0.53M parameters).
  config.retriever.layers = 2  # BERT layers.
  config.retriever.heads = 4  # Attention heads.
  config.retriever.ffn_dim = 512  # Feed-forward width.
  config.retriever.dropout = 0.0  # Dropout (none: the world is small and clean).
  config.retriever.batch_size = 64  # Pairs per step (63 in-batch negatives each).
  config.retriever.num_train_steps = 200  # Optimizer steps (docs/world.md: recall@1 after them).
  config.retriever.learning_rate = 1e-3  # Peak AdamW rate (3e-3 collapses: docs/world.md).
  config.retriever.warmup_steps = 50  # Linear warm-up, then linear decay.
  config.retriever.question_eda = 0.0  # EDA word noise on training questions (0: off).
  config.retriever.hard_negatives = False  # One BM25 hard negative per question (DPR's recipe).

  config.generator = ml_collections.ConfigDict()
  config.generator.d_model = 128  # BART width (1.09M parameters with the word tokenizer).
  config.generator.layers = 2  # Encoder and decoder layers each.
  config.generator.heads = 4  # Attention heads.
  config.generator.ffn_dim = 512  # Feed-forward width.
  config.generator.dropout = 0.0  # Dropout (the feasibility run's setting).

  # The RAG trainer's config (configs/rag_finetune.py, the same fields and shape) with the
  # world's values below. The job fills its model_type, checkpoint, index and data paths, seed
  # and the token lengths measured on the world. The closed-book baseline trains with the same
  # batch, steps and schedule.
  config.rag = rag_finetune.get_config()
  config.rag.n_docs = 5  # Passages retrieved per question (paper: 5 or 10; <= the passages).
  config.rag.label_smoothing = 0.0  # Epsilon of the marginal likelihood.
  # Labels `<s> <s> answer </s>` (start token prepended): the answer is predicted after the
  # start token, as in generation. With the reference's `<s> answer </s>` the fresh BART never
  # learned to copy (docs/world.md).
  config.rag.prepend_decoder_start = True
  config.rag.batch_size = 32  # Questions per step.
  config.rag.num_train_steps = 300  # Optimizer steps of each RAG model and the closed book
  # (copying from the passages appears near step 150; held-out EM 0.99 at 300).
  config.rag.learning_rate = 1e-3  # Peak AdamW rate of the generator.
  config.rag.group_learning_rates = ml_collections.ConfigDict(
      {"question_encoder": 3e-5})  # Question encoder: 1e-4 damaged recall in the torch run.
  config.rag.warmup_steps = 30  # Linear warm-up, then linear decay.
  config.rag.lr_end = 0.0  # Decay target.
  config.rag.weight_decay = 0.0  # AdamW weight decay.
  config.rag.max_grad_norm = 1.0  # Global-norm clipping.
  config.rag.eval_every = 100_000  # Held-out loss only at the end (the job evaluates after).
  config.rag.checkpoint_every = 100  # Steps between orbax checkpoints (a kill resumes).
  config.rag.keep_checkpoints = 1  # Checkpoints kept on disk.

  # Read by the evaluation phase only: changed on a trained workdir, the trained models are kept
  # and the evaluation runs again (rag_jax/training/loop.py, EVALUATION_ONLY).
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 100  # Questions per decoding batch.
  config.eval.num_beams = 1  # Greedy decoding (beam search works too; slower on CPU).
  config.eval.max_answer_tokens = 8  # Decoder length limit (with the start and end tokens).
  config.eval.recall_ks = (1, 5, 20)  # recall@k of the question encoder (each k <= passages).
  return config


def shrink_to_tiny(world: ml_collections.ConfigDict, num_people: int) -> None:
  """A world job's config (this file's shape) made tiny in place: a small world, 1-layer models
  of width 32, a few steps. The experiments' wiring checks (`:tiny` configs) start from it."""
  world.world.num_people = num_people  # Invented people.
  world.world.num_cities = 6  # Birthplace values.
  world.world.num_companies = 5  # Employer values.
  world.world.num_years = 10  # Birth years.
  world.world.num_meetings = 10  # Distractor passages.
  for part, width in ((world.retriever, "hidden_size"), (world.generator, "d_model")):
    part[width] = 32  # Model width (both DPR encoders; BART).
    part.layers = 1  # Layers (fewer ops to compile).
    part.heads = 2  # Attention heads.
    part.ffn_dim = 64  # Feed-forward width.
  world.retriever.batch_size = 16  # DPR pairs per step.
  world.retriever.num_train_steps = 10  # DPR steps.
  world.retriever.warmup_steps = 2  # DPR warm-up.
  world.rag.batch_size = 8  # Questions per RAG step.
  world.rag.n_docs = 3  # Passages per question.
  world.rag.num_train_steps = 4  # RAG steps per row.
  world.rag.warmup_steps = 1  # RAG warm-up.
  world.rag.checkpoint_every = 4  # One checkpoint, at the end.
  world.rag.log_every = 2  # Metric lines.
