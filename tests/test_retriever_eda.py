"""EDA question noise for the DPR retriever (Wei & Zou 2019; rag_jax.training.retriever_trainer):
the word operations checked by counting, a pure function of (seed, step), and a training run that
uses it (other parameters than without it, the same on a rerun)."""

import collections

import jax
import numpy as np
import pytest
import transformers

from rag_jax.models import presets
from rag_jax.training.retriever_trainer import default_config, eda, train_retriever

QUESTION = "where was ada lovelace born ?"
WORDS = ["zz", "yy", "xx"]


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.3, 0.9])
def test_eda_deletes_swaps_and_inserts_by_the_rate(alpha):
  words = QUESTION.split()
  n = max(1, round(alpha * len(words)))
  for seed in range(200):
    out = eda(QUESTION, np.random.default_rng(seed), alpha, WORDS).split()
    added = collections.Counter(out) - collections.Counter(words)
    kept = collections.Counter(out) - added
    # n insertions from the vocabulary; the rest a non-empty sub-multiset of the question.
    assert sum(added.values()) == n and set(added) <= set(WORDS)
    assert len(out) - n == sum(kept.values()) >= 1
    assert not kept - collections.Counter(words)
    assert eda(QUESTION, np.random.default_rng(seed), alpha, WORDS).split() == out
  if alpha == 0.0:  # nothing deleted: the question's words, one swap, one insertion
    assert sorted(w for w in out if w not in WORDS) == sorted(words)


def test_eda_leaves_an_empty_question_alone():
  assert eda("", np.random.default_rng(0), 0.3, WORDS) == ""


def _tokenizer(tmp_path, words):
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words))]
  (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
  return transformers.BertTokenizerFast(str(tmp_path / "vocab.txt"))


def test_training_with_eda_is_reproducible_and_uses_the_noise(tmp_path):
  people = [f"p{i}" for i in range(24)]
  questions = [f"where was {p} born ?" for p in people] + [f"who employs {p} ?" for p in people]
  titles = people * 2
  texts = [f"{p} was born in c{i % 5}" for i, p in enumerate(people)] + [
      f"{p} works for f{i % 4}" for i, p in enumerate(people)]
  words = " ".join(questions + texts).split()
  tok = _tokenizer(tmp_path, words)
  enc = presets.question_encoder_config("tiny", vocab_size=len(tok), hidden_size=16,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32, max_position_embeddings=32,
                                        pad_token_id=0)

  def run(alpha):
    config = default_config(batch_size=16, num_train_steps=6, warmup_steps=1,
                            max_question_length=12, max_passage_length=16, question_eda=alpha,
                            log_every=3, checkpoint_every=10**9)
    result = train_retriever(questions, titles, texts, tok, enc, config)
    return jax.tree.leaves(result.question_params)

  noisy, again, clean = run(0.3), run(0.3), run(0.0)
  assert all(np.array_equal(a, b) for a, b in zip(noisy, again, strict=True))
  assert not all(np.allclose(a, b) for a, b in zip(noisy, clean, strict=True))
