"""A tiny BART learns to reverse token strings: the generator stack alone, in two minutes.

    python train.py --config=configs/reversal.py --workdir=runs/reversal

From nothing (no download), on 2 CPU cores: the generator, the optimizer recipe, data-parallel
jit, orbax checkpoints, resume and export, without retrieval (the default job,
configs/default.py, is the whole RAG). Override any field on the command line:
`python train.py --config=configs/reversal.py --config.num_train_steps=100`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.trainer = "reversal"  # train.py dispatch: rag_jax.experiments.reversal.
  config.seed = 0  # Seeds init, dropout (fold_in(key, step)) and the data stream.

  config.model = ml_collections.ConfigDict()
  config.model.preset = "tiny"  # tiny | base | large (rag_jax/models/presets.py).
  config.model.dtype = "float32"  # Compute dtype; "bfloat16" on accelerators. Params stay fp32.
  config.model.dropout = 0.1  # BART dropout on embeddings and sub-layer outputs.

  config.task = ml_collections.ConfigDict()
  config.task.vocab_size = 40  # Token ids: 3 specials + 37 symbols.
  config.task.min_length = 3  # Shortest string to reverse.
  config.task.max_length = 10  # Longest string to reverse.

  config.batch_size = 64  # Global batch (split over all devices).
  config.num_train_steps = 1200  # Optimizer steps (the schedule's length).
  config.learning_rate = 2e-3  # Peak AdamW learning rate.
  config.warmup_steps = 100  # Linear warm-up from 0.
  config.lr_end = 1e-7  # Polynomial decay target (the reference's lr_end).
  config.lr_power = 1.0  # Polynomial decay power (1 = linear).
  config.weight_decay = 0.001  # AdamW decoupled weight decay (reference recipe).
  config.max_grad_norm = 1.0  # Global-norm clipping; 0 disables.
  config.adam_b1 = 0.9  # AdamW beta1.
  config.adam_b2 = 0.999  # AdamW beta2.
  config.adam_eps = 1e-8  # AdamW epsilon.
  config.label_smoothing = 0.0  # Epsilon of the label-smoothed NLL.

  config.log_every = 50  # Steps between metric lines (metrics.jsonl, train.log).
  config.eval_every = 400  # Steps between held-out evaluations.
  config.eval_batches = 8  # Held-out batches per evaluation.
  config.checkpoint_every = 200  # Steps between orbax checkpoints.
  config.keep_checkpoints = 2  # Checkpoints kept on disk.
  return config
