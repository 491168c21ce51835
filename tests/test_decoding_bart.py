"""BART generation: token-for-token parity with `BartForConditionalGeneration.generate`.

Settings that change no compiled shape (length_penalty, early_stopping, min_length, forced
BOS/EOS, num_return_sequences) are swept inside one test so that each compiled search is built
once; the tests also check that it was.
"""

import numpy as np
import pytest
import torch

from rag_jax.checkpoints import load_pretrained
from rag_jax.decoding import generate
from rag_jax.decoding.bart import compiled_bart_search
from tests import decoding_reference as dref
from tests import torch_reference as ref

SCORE_TOL = 1e-4


@pytest.fixture(scope="module")
def bart(tmp_path_factory):
  torch_model, path = dref.bart(tmp_path_factory.mktemp("bart"))
  model, params = load_pretrained(path)
  rng = np.random.default_rng(0)
  # Three inputs: right-padded, full, left-padded.
  ids, mask = ref.padded_batch(rng, 3, 9, model.config.vocab_size, pad=1, right={0: 4},
                               left={2: 2})
  return torch_model, model, params, ids, mask


def _compare(torch_model, model, params, ids, mask, **overrides):
  """Runs both generators with the same explicit options; asserts tokens and scores agree."""
  kwargs = dref.generation_kwargs(**overrides)
  with torch.no_grad():
    expected = torch_model.generate(
        ref.to_torch(ids), attention_mask=ref.to_torch(mask), return_dict_in_generate=True,
        output_scores=True, **dref.torch_kwargs(kwargs))
  got = generate(model, params, ids, mask, **kwargs)
  np.testing.assert_array_equal(got.sequences, expected.sequences.numpy(), err_msg=str(overrides))
  if kwargs["num_beams"] > 1:
    np.testing.assert_allclose(got.sequences_scores, expected.sequences_scores.numpy(),
                               atol=SCORE_TOL, rtol=0, err_msg=str(overrides))
  return got


BEAM_GRID = [
    dict(length_penalty=1.0, early_stopping=False),
    dict(length_penalty=0.6, early_stopping=True, num_return_sequences=2),
    dict(length_penalty=2.0, early_stopping="never", num_return_sequences=4),
    dict(length_penalty=1.0, early_stopping="never", min_length=8, num_return_sequences=3),
    dict(length_penalty=0.6, early_stopping=False, forced_bos_token_id=0),
    dict(length_penalty=2.0, early_stopping=True, forced_eos_token_id=None,
         num_return_sequences=2),
    dict(length_penalty=1.0, early_stopping=False, min_length=11, num_return_sequences=4),
    dict(length_penalty=-0.5, early_stopping="never", num_return_sequences=2),
]


def test_beam_search_grid_matches_transformers_with_one_compile(bart):
  torch_model, model, params, ids, mask = bart
  misses = compiled_bart_search.cache_info().misses
  ended_early = ran_to_max = 0
  for setting in BEAM_GRID:
    got = _compare(torch_model, model, params, ids, mask, num_beams=4, max_length=12, **setting)
    ends = (got.sequences == 1).any(axis=1)  # Padded: ended before max_length.
    ended_early, ran_to_max = ended_early + ends.sum(), ran_to_max + (~ends).sum()
  assert ended_early > 0 and ran_to_max > 0  # The grid exercises both stopping regimes.
  # One static setting: one cached jitted search, compiled once for this input shape.
  assert compiled_bart_search.cache_info().misses == misses + 1
  fn = compiled_bart_search(model, _search_config(num_beams=4, max_length=12))
  assert fn._cache_size() == 1


def _search_config(num_beams, max_length, no_repeat=0, bad=None):
  from rag_jax.decoding import ProcessorConfig, SearchConfig
  return SearchConfig(num_beams, max_length, 2, 1, ProcessorConfig.make((2,), no_repeat, bad))


def test_beam_search_with_ngram_and_bad_words_matches_transformers(bart):
  num_beams = 3
  torch_model, model, params, ids, mask = bart
  for setting in [dict(num_return_sequences=num_beams, early_stopping=True),
                  dict(length_penalty=0.6, forced_bos_token_id=0, min_length=5)]:
    _compare(torch_model, model, params, ids, mask, num_beams=num_beams, max_length=12,
             no_repeat_ngram_size=2, bad_words_ids=[[5], [7, 8], [0, 0]], **setting)


def test_greedy_matches_transformers_and_scores_are_teacher_forced_logprobs(bart):
  torch_model, model, params, ids, mask = bart
  for setting in [dict(), dict(min_length=6), dict(forced_bos_token_id=0, min_length=3)]:
    _compare(torch_model, model, params, ids, mask, max_length=12, **setting)
  got = _compare(torch_model, model, params, ids, mask, max_length=12, forced_eos_token_id=None)
  for row in range(ids.shape[0]):
    seq = got.sequences[row]
    length = int(np.argmax(seq[1:] == 2)) + 1 if (seq[1:] == 2).any() else len(seq) - 1
    expected = dref.sequence_logprob(torch_model, ids[row], mask[row], seq, length)
    np.testing.assert_allclose(got.sequences_scores[row], expected, atol=SCORE_TOL, rtol=0)


def test_greedy_with_ngram_and_bad_words_matches_transformers(bart):
  torch_model, model, params, ids, mask = bart
  _compare(torch_model, model, params, ids, mask, max_length=12, no_repeat_ngram_size=3,
           bad_words_ids=[[0, 0], [9]])


def test_second_architecture_untied_head_matches_transformers(tmp_path):
  torch_model, path = dref.bart(tmp_path, "plain_untied", seed=1)
  model, params = load_pretrained(path)
  ids, mask = ref.padded_batch(np.random.default_rng(1), 2, 7, model.config.vocab_size, pad=1,
                               right={1: 3})
  _compare(torch_model, model, params, ids, mask, num_beams=3, max_length=9,
           num_return_sequences=2, early_stopping=True)


def test_invalid_settings_are_rejected(bart):
  _, model, params, ids, mask = bart
  with pytest.raises(ValueError, match="num_return_sequences"):
    generate(model, params, ids, mask, num_beams=2, num_return_sequences=3)
  with pytest.raises(ValueError, match="greedy"):
    generate(model, params, ids, mask, num_return_sequences=2)
  with pytest.raises(ValueError, match="early_stopping"):
    generate(model, params, ids, mask, num_beams=2, early_stopping="sometimes")
  with pytest.raises(NotImplementedError):
    generate(model, params, ids, mask, do_sample=True)


def test_checkpoint_generation_defaults_are_honoured_like_transformers(tmp_path):
  """Legacy generation keys in config.json (facebook/bart-large style) become the defaults in
  transformers v5; generate() without options must decode as transformers does."""
  import json

  import transformers

  _, path = dref.bart(tmp_path, seed=2)
  config = json.loads((path / "config.json").read_text())
  config.update(num_beams=3, no_repeat_ngram_size=2, early_stopping=True, max_length=9,
                forced_bos_token_id=0)
  (path / "config.json").write_text(json.dumps(config))
  (path / "generation_config.json").unlink()
  torch_model = transformers.BartForConditionalGeneration.from_pretrained(path).eval()
  model, params = load_pretrained(path)
  ids, mask = ref.padded_batch(np.random.default_rng(2), 2, 7, model.config.vocab_size, pad=1)
  with torch.no_grad():
    expected = torch_model.generate(ref.to_torch(ids), attention_mask=ref.to_torch(mask))
  np.testing.assert_array_equal(generate(model, params, ids, mask).sequences, expected.numpy())
