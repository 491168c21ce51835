"""References for the decoding tests: tiny transformers models with well-separated scores, the
explicit generation kwargs transformers v5 needs, and teacher-forced torch log-likelihoods.

Random models with init_std 0.02 give near-uniform next-token distributions (beam scores tie to
1e-6); init_std 0.3 plus `torch_reference`'s perturbed norms and final_logits_bias give peaked,
distinct distributions, so token-for-token comparisons test the algorithm, not float noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests import torch_reference as ref

INIT_STD = 0.3
# Added to the EOS logit (final_logits_bias): hypotheses then end at varied lengths, some early,
# some at max_length, so that early stopping and the length penalty decide outcomes.
EOS_BIAS = 2.0


def _bias_eos(model: torch.nn.Module, bias_owner: torch.nn.Module, path: Path, eos: int = 2,
              bias: float = EOS_BIAS):
  with torch.no_grad():
    bias_owner.final_logits_bias[0, eos] += bias
  model.save_pretrained(path)


def bart(tmp: Path, name: str = "scaled_odd_heads", seed: int = 0):
  """(torch BartForConditionalGeneration, checkpoint dir) with separated scores."""
  model, path = ref.bart(tmp, name, seed=seed, init_std=INIT_STD)
  _bias_eos(model, model, path)
  return model, path


def rag(tmp: Path, kind: str, n_docs: int = 3, seed: int = 0, label_smoothing: float = 0.0,
        eos_bias: float = EOS_BIAS):
  """(torch RagTokenForGeneration / RagSequenceForGeneration, checkpoint dir); label_smoothing
  is saved in the config (RAG-Sequence thorough decoding ranks by the smoothed loss); eos_bias
  is added to the EOS logit (larger: shorter hypotheses)."""
  model, path = ref.rag(tmp, kind, n_docs=n_docs, seed=seed, init_std=INIT_STD)
  model.config.label_smoothing = label_smoothing
  _bias_eos(model, model.rag.generator, path, bias=eos_bias)
  return model, path


def generation_kwargs(**overrides) -> dict:
  """Every generation option explicit (transformers v5 pops them from configs), greedy defaults."""
  kwargs = dict(max_length=10, min_length=0, num_beams=1, num_return_sequences=1,
                length_penalty=1.0, early_stopping=False, no_repeat_ngram_size=0,
                bad_words_ids=None, forced_bos_token_id=None, forced_eos_token_id=2)
  kwargs.update(overrides)
  return kwargs


def torch_kwargs(kwargs: dict) -> dict:
  """generation_kwargs -> torch generate kwargs: None options dropped except
  forced_eos_token_id (an explicit None disables it in transformers v5, as in rag_jax)."""
  out = {k: v for k, v in kwargs.items() if v is not None or k == "forced_eos_token_id"}
  return dict(out, do_sample=False)


def contexts(rng: np.random.Generator, rows: int, length: int, vocab: int,
             padded: dict[int, int] | None = None):
  """Generator inputs [rows, length] with some rows right-padded (pad 1, mask 0)."""
  return ref.padded_batch(rng, rows, length, vocab, pad=1, right=padded)


def sequence_logprob(generator, input_ids: np.ndarray, attention_mask: np.ndarray,
                     sequence: np.ndarray, length: int) -> float:
  """log p(sequence[1:1+length] | input, sequence[0]) under a torch BART, teacher-forced, in
  float64. input_ids, attention_mask [S]; sequence [T] starting with the decoder start token."""
  seq = np.array(sequence)[:1 + length]
  with torch.no_grad():
    logits = generator(input_ids=ref.to_torch(input_ids[None]),
                       attention_mask=ref.to_torch(attention_mask[None]),
                       decoder_input_ids=ref.to_torch(seq[None, :-1])).logits[0]
  logp = torch.log_softmax(logits.double(), dim=-1).numpy()  # [length, V]
  return float(sum(logp[t, seq[t + 1]] for t in range(length)))
