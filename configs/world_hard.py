"""The harder synthetic world: subword tokens, multi-word answers, paraphrased questions.

    python train.py --config=configs/world_hard.py --workdir=runs/world_hard

The default job (configs/default.py) with `world.hard`: two-word names, multi-word values
(e.g. "the french horn", "north ambridge"), held-out questions asked with templates never seen
in training, and a byte-level BPE tokenizer, so answers span several tokens and the generator
must copy a span, not a word. Everything else (model sizes, recipe) is the default's; more steps
because copying spans takes longer. What it reaches: docs/world.md.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.world.hard = True  # Two-word names, multi-word values, unseen question templates.
  config.tokenizer.kind = "bpe"  # Byte-level BPE trained on the world.
  config.tokenizer.vocab_size = 1000  # Subword vocabulary.
  # EDA word noise on the retriever's training questions (Wei & Zou 2019): the held-out
  # template's entity position and words are never seen in training; docs/world.md.
  config.retriever.question_eda = 0.1
  config.rag.num_train_steps = 600  # Optimizer steps of each RAG model and the closed book.
  config.rag.warmup_steps = 60  # Linear warm-up, then linear decay.
  config.rag.checkpoint_every = 200  # Steps between orbax checkpoints.
  config.eval.max_answer_tokens = 16  # Multi-token answers.
  return config
