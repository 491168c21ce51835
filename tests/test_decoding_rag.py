"""RAG decoding: RAG-Token and RAG-Sequence thorough against transformers' generate, batched
thorough against one question at a time, RAG-Sequence fast against a numpy computation of the
paper's rule on transformers' per-passage beams and teacher-forced log-likelihoods."""

import numpy as np
import pytest
import torch

from rag_jax.checkpoints import load_pretrained
from rag_jax.decoding import generate
from tests import decoding_reference as dref
from tests import torch_reference as ref

N_DOCS, BATCH, CONTEXT_LEN, SCORE_TOL = 3, 2, 8, 1e-4


def _retrieval_inputs(vocab: int, seed: int = 0, padded: bool = True, batch: int = BATCH):
  rng = np.random.default_rng(seed)
  pad_rows = {0: 3, 2: 2, 4: 4} if padded else None
  ids, mask = dref.contexts(rng, batch * N_DOCS, CONTEXT_LEN, vocab, pad_rows)
  doc_scores = (2.0 * rng.normal(size=(batch, N_DOCS))).astype(np.float32)
  return ids, mask, doc_scores


def _torch_rag_generate(torch_model, ids, mask, doc_scores, **kwargs):
  with torch.no_grad():
    return torch_model.generate(
        context_input_ids=ref.to_torch(ids), context_attention_mask=ref.to_torch(mask),
        doc_scores=ref.to_torch(doc_scores), n_docs=N_DOCS, **dref.torch_kwargs(kwargs))


@pytest.fixture(scope="module")
def rag_token(tmp_path_factory):
  torch_model, path = dref.rag(tmp_path_factory.mktemp("rag_token"), "token", N_DOCS)
  return (torch_model, *load_pretrained(path))


@pytest.fixture(scope="module")
def rag_sequence(tmp_path_factory):
  torch_model, path = dref.rag(tmp_path_factory.mktemp("rag_seq"), "sequence", N_DOCS,
                               label_smoothing=0.1)
  return (torch_model, *load_pretrained(path))


@pytest.mark.parametrize("num_beams,settings", [
    (1, [dict(), dict(forced_bos_token_id=0, min_length=4)]),
    (4, [dict(num_return_sequences=2), dict(early_stopping=True, forced_bos_token_id=0,
                                            num_return_sequences=4),
         dict(length_penalty=0.6, early_stopping="never", min_length=5)]),
])
def test_rag_token_matches_transformers(rag_token, num_beams, settings):
  torch_model, model, params = rag_token
  assert model.config.architecture == "RagTokenForGeneration"
  ids, mask, doc_scores = _retrieval_inputs(model.config.generator.vocab_size)
  for setting in settings:
    kwargs = dref.generation_kwargs(num_beams=num_beams, bad_words_ids=[[0, 0]], **setting)
    expected = _torch_rag_generate(torch_model, ids, mask, doc_scores, **kwargs,
                                   return_dict_in_generate=True, output_scores=True)
    got = generate(model, params, context_input_ids=ids, context_attention_mask=mask,
                   doc_scores=doc_scores, n_docs=N_DOCS, **kwargs)
    np.testing.assert_array_equal(got.sequences, expected.sequences.numpy(), err_msg=str(setting))
    # The decoder that ran is reported as the class it reproduced, with its beams and passages.
    assert got.decoder.architecture == type(torch_model).__name__ == "RagTokenForGeneration"
    assert (got.decoder.kind, got.decoder.decoding, got.decoder.num_beams, got.decoder.n_docs,
            got.decoder.max_length) == ("rag_token", None, num_beams, N_DOCS, kwargs["max_length"])
    if num_beams > 1:
      np.testing.assert_allclose(got.sequences_scores, expected.sequences_scores.numpy(),
                                 atol=SCORE_TOL, rtol=0)


def _torch_thorough_scores(torch_model, ids, mask, doc_scores, sequences, per_question):
  """-loss of each returned sequence under transformers' RAG-Sequence forward."""
  out = []
  for q in range(doc_scores.shape[0]):
    labels = ref.to_torch(np.array(sequences[q * per_question:(q + 1) * per_question]))
    rows = slice(q * N_DOCS, (q + 1) * N_DOCS)
    with torch.no_grad():
      loss = torch_model(
          context_input_ids=ref.to_torch(ids[rows]).repeat(per_question, 1),
          context_attention_mask=ref.to_torch(mask[rows]).repeat(per_question, 1),
          doc_scores=ref.to_torch(doc_scores[q:q + 1]).repeat(per_question, 1),
          labels=labels, exclude_bos_score=True, n_docs=N_DOCS).loss
    out.append(-loss.numpy())
  return np.concatenate(out)


@pytest.mark.parametrize("num_beams,settings", [
    (1, [dict(forced_bos_token_id=0)]),
    (3, [dict(num_return_sequences=2, forced_bos_token_id=0, length_penalty=0.6,
              early_stopping=True, min_length=3),
         dict(num_return_sequences=2),
         # Passes of 2 and 4 distinct candidates, across the two questions' boundary; calls of
         # 4 positions (of 9: the last call's start is clamped back to position 5).
         dict(num_return_sequences=2, forced_bos_token_id=0, rescore_candidates=2,
              rescore_positions=4),
         dict(num_return_sequences=3, rescore_candidates=4)]),
    (2, [dict(num_return_sequences=2, do_deduplication=False, forced_bos_token_id=0),
         dict(num_return_sequences=2, do_deduplication=False, forced_bos_token_id=0,
              rescore_candidates=4)]),
])
def test_rag_sequence_thorough_matches_transformers(rag_sequence, num_beams, settings):
  """Padded contexts: transformers 5.23's per-passage beams attend to the padding, which
  mask_beam_contexts=False reproduces; scores are -loss of transformers' forward (eps 0.1)."""
  torch_model, model, params = rag_sequence
  assert model.config.label_smoothing == 0.1
  ids, mask, doc_scores = _retrieval_inputs(model.config.generator.vocab_size, seed=1)
  for setting in settings:
    setting = dict(setting)
    rescore = {k: setting.pop(k, None) for k in ("rescore_candidates", "rescore_positions")}
    kwargs = dref.generation_kwargs(num_beams=num_beams, **setting)
    expected = _torch_rag_generate(torch_model, ids, mask, doc_scores, **kwargs).numpy()
    got = generate(model, params, context_input_ids=ids, context_attention_mask=mask,
                   doc_scores=doc_scores, n_docs=N_DOCS, mask_beam_contexts=False,
                   **rescore, **kwargs)
    np.testing.assert_array_equal(got.sequences, expected, err_msg=str(setting))
    assert got.decoder.architecture == type(torch_model).__name__ == "RagSequenceForGeneration"
    assert (got.decoder.kind, got.decoder.decoding, got.decoder.num_beams,
            got.decoder.num_return_sequences) == ("rag_sequence", "thorough", num_beams,
                                                  kwargs["num_return_sequences"])
    if setting.get("forced_bos_token_id") == 0:  # Every candidate has BOS: one exclusion rule.
      per_question = kwargs["num_return_sequences"]
      np.testing.assert_allclose(
          got.sequences_scores,
          _torch_thorough_scores(torch_model, ids, mask, doc_scores, expected, per_question),
          atol=SCORE_TOL, rtol=0)


@pytest.mark.parametrize("rescore", [None, 2])
def test_rag_sequence_thorough_with_duplicate_hypotheses_matches_transformers(rag_sequence,
                                                                             rescore):
  """A passage retrieved twice gives the same beams twice: transformers drops the duplicates
  before its forward pass and rag_jax skips them (passes of `rescore` distinct candidates per
  question; the default is 3 of the 9 here)."""
  torch_model, model, params = rag_sequence
  ids, mask, doc_scores = _retrieval_inputs(model.config.generator.vocab_size, seed=4)
  ids[1], mask[1] = ids[0], mask[0]  # Question 0: passages 0 and 1 are one passage.
  ids[4], mask[4] = ids[3], mask[3]  # Question 1: passages 0, 1 and 2 are one passage.
  ids[5], mask[5] = ids[3], mask[3]
  kwargs = dref.generation_kwargs(num_beams=3, num_return_sequences=3, forced_bos_token_id=0)
  expected = _torch_rag_generate(torch_model, ids, mask, doc_scores, **kwargs).numpy()
  got = generate(model, params, context_input_ids=ids, context_attention_mask=mask,
                 doc_scores=doc_scores, mask_beam_contexts=False, rescore_candidates=rescore,
                 **kwargs)
  np.testing.assert_array_equal(got.sequences, expected)
  np.testing.assert_allclose(
      got.sequences_scores, _torch_thorough_scores(torch_model, ids, mask, doc_scores, expected, 3),
      atol=SCORE_TOL, rtol=0)
  # The candidates rescored: the distinct rows of the per-passage beams transformers' RAG
  # generate asks its generator for (unmasked contexts, k returned per passage).
  distinct = []
  for q in range(BATCH):
    with torch.no_grad():
      beams = torch_model.generator.generate(
          ref.to_torch(ids[q * N_DOCS:(q + 1) * N_DOCS]), attention_mask=None,
          **dref.torch_kwargs(kwargs))
    distinct.append(len({tuple(row) for row in beams.numpy().tolist()}))
  assert all(d < N_DOCS * 3 for d in distinct)  # Both questions do have duplicates.
  np.testing.assert_array_equal(got.num_candidates, distinct)


@pytest.fixture(scope="module")
def rag_sequence_short(tmp_path_factory):
  """A RAG-Sequence model whose hypotheses end early, at lengths from 1 token to max_length."""
  torch_model, path = dref.rag(tmp_path_factory.mktemp("rag_seq_short"), "sequence", N_DOCS,
                               label_smoothing=0.1, eos_bias=dref.EOS_BIAS + 2.0)
  return (torch_model, *load_pretrained(path))


def test_rag_sequence_thorough_with_short_hypotheses_matches_transformers(rag_sequence_short):
  """Hypotheses of varied lengths, most far shorter than max_length: rescoring stops after each
  pass's longest one (W positions per call, the last call's start clamped), where transformers
  crops its labels to the question's longest; tokens and scores must not change."""
  torch_model, model, params = rag_sequence_short
  ids, mask, doc_scores = _retrieval_inputs(model.config.generator.vocab_size, seed=1)
  kwargs = dref.generation_kwargs(num_beams=3, num_return_sequences=3, max_length=12,
                                  forced_bos_token_id=0)
  expected = _torch_rag_generate(torch_model, ids, mask, doc_scores, **kwargs).numpy()
  reference = _torch_thorough_scores(torch_model, ids, mask, doc_scores, expected, 3)
  lengths = []
  for candidates, positions in [(None, None), (2, 1), (9, 4)]:
    got = generate(model, params, context_input_ids=ids, context_attention_mask=mask,
                   doc_scores=doc_scores, mask_beam_contexts=False, rescore_candidates=candidates,
                   rescore_positions=positions, **kwargs)
    setting = f"rescore_candidates={candidates}, rescore_positions={positions}"
    np.testing.assert_array_equal(got.sequences, expected, err_msg=setting)
    np.testing.assert_allclose(got.sequences_scores, reference, atol=SCORE_TOL, rtol=0,
                               err_msg=setting)
    lengths.append([len(_strip(r)) for r in got.sequences])
  # Both questions answer in under half of max_length, so passes holding only short candidates
  # stop early (the full-length candidates of passage 2 rank below them).
  assert max(max(row) for row in lengths) < 6


def test_rag_sequence_masked_beams_match_transformers_on_unpadded_contexts(rag_sequence):
  torch_model, model, params = rag_sequence
  ids, mask, doc_scores = _retrieval_inputs(model.config.generator.vocab_size, seed=2,
                                            padded=False)
  kwargs = dref.generation_kwargs(num_beams=3, num_return_sequences=2)
  expected = _torch_rag_generate(torch_model, ids, mask, doc_scores, **kwargs).numpy()
  got = generate(model, params, context_input_ids=ids, context_attention_mask=mask,
                 doc_scores=doc_scores, **kwargs)
  np.testing.assert_array_equal(got.sequences, expected)


def _strip(row: np.ndarray) -> tuple[int, ...]:
  """A returned row without its trailing pad."""
  row = list(row)
  while row and row[-1] == 1:
    row.pop()
  return tuple(row)


@pytest.mark.parametrize("decoding,rescore", [("thorough", None), ("thorough", 5), ("fast", None)])
def test_batched_decoding_equals_one_question_at_a_time(rag_sequence, decoding, rescore):
  _, model, params = rag_sequence
  batch = 3
  ids, mask, doc_scores = _retrieval_inputs(model.config.generator.vocab_size, seed=3,
                                            batch=batch)
  kwargs = dref.generation_kwargs(num_beams=3, num_return_sequences=2, decoding=decoding)
  together = generate(model, params, context_input_ids=ids, context_attention_mask=mask,
                      doc_scores=doc_scores, rescore_candidates=rescore, **kwargs)
  for q in range(batch):
    rows = slice(q * N_DOCS, (q + 1) * N_DOCS)
    alone = generate(model, params, context_input_ids=ids[rows], context_attention_mask=mask[rows],
                     doc_scores=doc_scores[q:q + 1], **kwargs)
    assert [_strip(r) for r in alone.sequences] == [_strip(r) for r in
                                                    together.sequences[2 * q:2 * q + 2]]
    np.testing.assert_allclose(alone.sequences_scores, together.sequences_scores[2 * q:2 * q + 2],
                               atol=1e-5, rtol=0)


def _paper_fast_rule(torch_model, ids, mask, doc_scores, num_beams, kwargs):
  """Numpy reference of fast decoding: per-passage beams from transformers' generator, each
  hypothesis' log p(y|x,z_j) by teacher forcing in float64, summed over the passages whose beam
  holds it, weighted by the doc prior; absent -> probability 0. Returns, per question, the
  hypotheses sorted by log p(y|x), best first: [(tokens, score), ...]."""
  prior = torch.log_softmax(torch.from_numpy(doc_scores).double(), dim=1).numpy()
  generator = torch_model.rag.generator
  answers = []
  for q in range(doc_scores.shape[0]):
    merged: dict[tuple[int, ...], float] = {}
    for j in range(N_DOCS):
      row = q * N_DOCS + j
      with torch.no_grad():
        out = generator.generate(
            ref.to_torch(ids[row:row + 1]), attention_mask=ref.to_torch(mask[row:row + 1]),
            return_dict_in_generate=True,
            **dref.torch_kwargs(dict(kwargs, num_return_sequences=num_beams)))
      lengths = (out.beam_indices.numpy() != -1).sum(axis=1)
      seen = set()
      for seq, length in zip(out.sequences.numpy(), lengths, strict=True):
        tokens = tuple(int(t) for t in seq[:1 + length])
        if tokens in seen:
          continue
        seen.add(tokens)
        logp = prior[q, j] + dref.sequence_logprob(generator, ids[row], mask[row], seq, length)
        merged[tokens] = np.logaddexp(merged.get(tokens, -np.inf), logp)
    answers.append(sorted(merged.items(), key=lambda kv: -kv[1]))
  return answers


def test_rag_sequence_fast_equals_numpy_paper_rule(rag_sequence):
  torch_model, model, params = rag_sequence
  ids, mask, doc_scores = _retrieval_inputs(model.config.generator.vocab_size, seed=4)
  ids[1], mask[1] = ids[0], mask[0]  # Two passages of question 0 share their beams.
  num_beams, returned = 3, 3
  # No forced tokens: the search's processed log-probs are then the model's log-probs.
  kwargs = dref.generation_kwargs(num_beams=num_beams, forced_eos_token_id=None, min_length=2)
  expected = _paper_fast_rule(torch_model, ids, mask, doc_scores, num_beams, kwargs)
  got = generate(model, params, context_input_ids=ids, context_attention_mask=mask,
                 doc_scores=doc_scores, decoding="fast", **dict(kwargs,
                                                               num_return_sequences=returned))
  assert got.decoder.describe() == (f"RAG-Sequence fast, 3 beams, {N_DOCS} docs, max_length 10, "
                                    "3 returned")
  for q in range(BATCH):
    best = expected[q][:returned]
    gaps = np.diff([s for _, s in expected[q][:returned + 1]])
    assert np.all(np.abs(gaps) > 1e-3), "reference ranking has a near-tie"
    rows = got.sequences[q * returned:(q + 1) * returned]
    assert [_strip(r) for r in rows] == [tokens for tokens, _ in best]
    np.testing.assert_allclose(got.sequences_scores[q * returned:(q + 1) * returned],
                               [s for _, s in best], atol=SCORE_TOL, rtol=0)
  # Question 0's answers come from two passages' beams: the merge is exercised.
  assert len(expected[0]) < N_DOCS * num_beams


@pytest.mark.parametrize("option", ["rescore_candidates", "rescore_positions"])
def test_rescore_settings_below_one_are_refused(rag_sequence, option):
  _, model, params = rag_sequence
  ids, mask, doc_scores = _retrieval_inputs(model.config.generator.vocab_size)
  with pytest.raises(ValueError, match=f"{option} must be None or >= 1, got 0"):
    generate(model, params, context_input_ids=ids, context_attention_mask=mask,
             doc_scores=doc_scores, **{option: 0})
