"""Generator inputs: our exact path equals transformers' RagRetriever.postprocess_docs, and the
fast token-id path equals the exact path, on a corpus of edge cases."""

import types

import numpy as np
import pytest
import transformers

from rag_jax.data import contexts
from tests import torch_reference as ref

TITLES = ['"Charles Darwin"', 'Paris', '""Double quoted""', '"only leading', 'trailing"',
          'Émile Zola', 'a  b', '"']
TEXTS = [
    "Charles Darwin wrote On the Origin of Species in 1859.",
    "Paris  is the capital   of France.  ",
    "  leading spaces and \"quotes\" inside",
    "",
    "Unicode: café, naïve, 東京, emoji 🙂 and dashes — here.",
    " ".join(f"word{i}" for i in range(120)),  # Long: truncates the question away.
    "tabs\tand\nnewlines stay",
    "ends with sep //",
]
QUESTIONS = ["Who wrote The Origin of Species?", "what is the capital of france",
             "WHERE  is  Paris", "", "a question: with punctuation!?"]


def _tokenizers():
  corpus = TEXTS + QUESTIONS + TITLES
  return ref.train_tokenizers(corpus * 3, question_vocab=120, generator_vocab=200)


def _retrieved(rng, batch, n_docs):
  picks = rng.integers(0, len(TITLES), (batch, n_docs)), rng.integers(0, len(TEXTS),
                                                                       (batch, n_docs))
  titles = [[TITLES[i] for i in row] for row in picks[0]]
  texts = [[TEXTS[i] for i in row] for row in picks[1]]
  return titles, texts


def test_exact_path_equals_reference_postprocess_docs():
  q_tok, g_tok = _tokenizers()
  fmt = contexts.ContextFormat(max_combined_length=48)
  rng = np.random.default_rng(0)
  questions = QUESTIONS
  q_ids = q_tok(questions, padding="max_length", max_length=24, truncation=True)["input_ids"]
  titles, texts = _retrieved(rng, len(questions), 3)

  # The reference: RagRetriever.postprocess_docs run on a stand-in `self` (it needs no index),
  # with the question strings decoded from the question ids as RagRetriever.__call__ does.
  config = transformers.RagConfig(title_sep=fmt.title_sep, doc_sep=fmt.doc_sep,
                                  max_combined_length=fmt.max_combined_length)
  fake_self = types.SimpleNamespace(config=config, generator_tokenizer=g_tok)
  input_strings = q_tok.batch_decode(q_ids, skip_special_tokens=True)
  docs = [{"title": t, "text": x} for t, x in zip(titles, texts, strict=True)]
  ref_ids, ref_mask = transformers.RagRetriever.postprocess_docs(
      fake_self, docs, input_strings, None, 3, return_tensors="np")

  decoded = contexts.decode_questions(q_tok, np.asarray(q_ids))
  assert decoded == input_strings
  assert decoded[0] == "who wrote the origin of species?"  # uncased round trip
  ids, mask = contexts.exact_context_inputs(g_tok, titles, texts, decoded, fmt)
  np.testing.assert_array_equal(ids, ref_ids)
  np.testing.assert_array_equal(mask, ref_mask)
  assert ids.shape == (len(questions) * 3, 48)
  assert (mask.sum(1) == 48).any() and (mask.sum(1) < 48).any()  # some truncated, some padded


def test_fast_path_equals_exact_path_on_every_pair():
  _, g_tok = _tokenizers()
  mismatches, pairs = 0, 0
  for length in (16, 40, 300):
    fmt = contexts.ContextFormat(max_combined_length=length)
    assembler = contexts.ContextAssembler(g_tok, fmt)
    passage_ids = {(t, x): assembler.passage_ids(t, x) for t in TITLES for x in TEXTS}
    for q in QUESTIONS:
      titles = [[t for t in TITLES for _ in TEXTS]]
      texts = [[x for _ in TITLES for x in TEXTS]]
      exact_ids, exact_mask = contexts.exact_context_inputs(g_tok, titles, texts, [q], fmt)
      fast_ids, fast_mask = assembler.assemble(
          [[passage_ids[(t, x)] for t, x in zip(titles[0], texts[0], strict=True)]],
          [assembler.question_ids(q)])
      mismatches += int((fast_ids != exact_ids).any(axis=1).sum())
      np.testing.assert_array_equal(fast_mask, exact_mask)
      pairs += len(exact_ids)
  assert pairs == 3 * len(QUESTIONS) * len(TITLES) * len(TEXTS)
  assert mismatches == 0


def test_fast_path_refuses_a_separator_it_cannot_split():
  _, g_tok = _tokenizers()
  with pytest.raises(ValueError, match="trailing space"):
    contexts.ContextAssembler(g_tok, contexts.ContextFormat(doc_sep="//"))
