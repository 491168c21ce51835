"""`generate(model, params, ...)`: one entry for BART, RAG-Token and RAG-Sequence generation.

Argument names and defaults are transformers' (`GenerationMixin.generate`,
`RagTokenForGeneration.generate`, `RagSequenceForGeneration.generate`): an option left None
takes the checkpoint's value (legacy generation keys kept in config.json, as transformers v5
copies them into the model's generation_config, and the token ids), else GenerationConfig's
default (max_length 20, num_beams 1, length_penalty 1.0, early_stopping False, min_length 0).
`forced_eos_token_id` defaults to the config's (BART: 2); an explicit None forces nothing, as in
transformers v5.

Returns numpy arrays laid out as transformers returns them: sequences [B * R, T] starting with the
decoder start token, pad after each end, T cropped as transformers crops it; and one score per
sequence (beam: transformers' sequences_scores; greedy: the sum of processed log-probs;
RAG-Sequence: see rag_sequence.py); and `decoder`, the decoder that ran (RAG-Token, RAG-Sequence
thorough / fast, BART; beams, passages, length), for reports to record what produced an output.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from rag_jax.decoding.bart import compiled_bart_search
from rag_jax.decoding.beam_search import SearchConfig, SearchParams
from rag_jax.decoding.processors import ProcessorConfig, ProcessorParams
from rag_jax.decoding.rag_sequence import (
    RagSequenceConfig,
    compiled_rag_sequence_search,
    rag_sequence_search,
)
from rag_jax.decoding.rag_token import compiled_rag_token_search, rag_token_search
from rag_jax.models.bart import BartConfig, BartForConditionalGeneration
from rag_jax.models.rag import MODEL_TYPES, RagModel, model_type_of
from rag_jax.utils.errors import check_finite

# GenerationConfig defaults (transformers 5.23) and the keys read from a checkpoint's config.
FROM_CONFIG = "from_config"  # Default of forced_eos_token_id: the generator config's value.
GENERATION_DEFAULTS: dict[str, Any] = dict(
    max_length=20, min_length=0, num_beams=1, num_return_sequences=1, length_penalty=1.0,
    early_stopping=False, no_repeat_ngram_size=0, bad_words_ids=None, forced_bos_token_id=None)


# The transformers class whose `generate` each decoder reproduces, and its name in reports.
ARCHITECTURES = {"bart": BartConfig.architecture, **MODEL_TYPES}
DECODER_NAMES = {"bart": "BART", "rag_token": "RAG-Token", "rag_sequence": "RAG-Sequence"}


@dataclasses.dataclass(frozen=True)
class DecoderInfo:
  """The decoder one `generate` call ran, with the settings that shaped its output.

  Filled in by `generate` from the call itself (the model's architecture or the `architecture`
  override, the resolved options), so a report built from it says what actually decoded.
  """

  kind: str  # "bart", "rag_token" or "rag_sequence".
  architecture: str  # The transformers class whose generate() this reproduces.
  num_beams: int  # 1: greedy search.
  max_length: int  # Length limit, the decoder start token included.
  num_return_sequences: int
  n_docs: int | None = None  # RAG: passages marginalised over.
  decoding: str | None = None  # RAG-Sequence: "thorough" or "fast"; None otherwise.

  def describe(self) -> str:
    """A short label, e.g. 'RAG-Sequence thorough, greedy, 5 docs, max_length 8'."""
    name = DECODER_NAMES[self.kind] + (f" {self.decoding}" if self.decoding else "")
    parts = [name, "greedy" if self.num_beams == 1 else f"{self.num_beams} beams"]
    if self.n_docs is not None:
      parts.append(f"{self.n_docs} doc{'s' if self.n_docs != 1 else ''}")
    parts.append(f"max_length {self.max_length}")
    if self.num_return_sequences > 1:
      parts.append(f"{self.num_return_sequences} returned")
    return ", ".join(parts)

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready fields plus `name` (describe())."""
    return {**dataclasses.asdict(self), "name": self.describe()}


@dataclasses.dataclass
class GenerateOutput:
  """sequences [B * R, T] int32; sequences_scores [B * R] float32 (R = num_return_sequences);
  decoder: the decoder that produced them; num_candidates [B] (RAG-Sequence thorough only): the
  hypotheses each question's teacher-forced pass scored, transformers' `num_candidates` (the
  distinct ones with do_deduplication, all n x beams without)."""

  sequences: np.ndarray
  sequences_scores: np.ndarray
  decoder: DecoderInfo
  num_candidates: np.ndarray | None = None


def _defaults(model: Any) -> dict[str, Any]:
  """GENERATION_DEFAULTS updated by the legacy generation keys of the checkpoint's config."""
  out = dict(GENERATION_DEFAULTS)
  extra = json.loads(model.config.hf_extra)
  out.update({k: v for k, v in extra.items() if k in GENERATION_DEFAULTS and v is not None})
  return out


def _kind(model: Any, architecture: str | None) -> str:
  if isinstance(model, BartForConditionalGeneration):
    return "bart"
  if not isinstance(model, RagModel):
    raise TypeError(f"generate expects a BART or RAG model, got {type(model).__name__}")
  return model_type_of(architecture or model.config.architecture)


def _crop(sequences: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """[B, R, L] -> [B * R, 1 + max generated length] (transformers' output crop)."""
  width = 1 + int(lengths.max(initial=0))
  return sequences.reshape(-1, sequences.shape[-1])[:, :width]  # [B*R, T]


@dataclasses.dataclass
class GenerationPlan:
  """One `generate` call's resolved settings, before any input is seen.

  kind: "bart", "rag_token" or "rag_sequence". search: the static search settings;
  search_params: the traced ones (an argument of the compiled search); rag_sequence: the
  RAG-Sequence settings (None otherwise); num_return: sequences returned per example; decoder:
  the DecoderInfo reported with the output.
  """

  kind: str
  search: SearchConfig
  search_params: SearchParams
  rag_sequence: RagSequenceConfig | None
  num_return: int
  decoder: DecoderInfo


def plan_generation(model: Any, *, n_docs: int | None = None, decoding: str = "thorough",
                    max_length: int | None = None, min_length: int | None = None,
                    num_beams: int | None = None, num_return_sequences: int | None = None,
                    length_penalty: float | None = None,
                    early_stopping: bool | str | None = None,
                    no_repeat_ngram_size: int | None = None, bad_words_ids=None,
                    forced_bos_token_id: int | None = None, forced_eos_token_id=FROM_CONFIG,
                    decoder_start_token_id: int | None = None, eos_token_id=None,
                    pad_token_id: int | None = None, do_deduplication: bool | None = None,
                    do_sample: bool = False, mask_beam_contexts: bool = True,
                    rescore_candidates: int | None = None,
                    rescore_positions: int | None = None,
                    architecture: str | None = None) -> GenerationPlan:
  """`generate`'s options resolved (see `generate`); n_docs: the passages per question (RAG)."""
  if do_sample:
    raise NotImplementedError("sampling is not implemented; rag_jax decodes greedily or by beams")
  kind = _kind(model, architecture)
  gcfg = model.config if kind == "bart" else model.config.generator
  d = _defaults(model)
  pick = lambda value, key: d[key] if value is None else value  # noqa: E731
  max_length, min_length = pick(max_length, "max_length"), pick(min_length, "min_length")
  num_beams, length_penalty = pick(num_beams, "num_beams"), pick(length_penalty, "length_penalty")
  num_return = pick(num_return_sequences, "num_return_sequences")
  early_stopping = pick(early_stopping, "early_stopping")
  if num_return > num_beams:
    raise ValueError(f"num_return_sequences ({num_return}) must be <= num_beams ({num_beams})"
                     if num_beams > 1 or kind == "rag_sequence" else
                     "greedy search (num_beams=1) supports num_return_sequences=1 only")
  eos = gcfg.eos_token_id if eos_token_id is None else eos_token_id
  eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
  pad = gcfg.pad_token_id if pad_token_id is None else pad_token_id
  if pad is None:
    pad = eos[0] if eos else 0
  start = gcfg.decoder_start_token_id if decoder_start_token_id is None else decoder_start_token_id
  processor_cfg = ProcessorConfig.make(eos, pick(no_repeat_ngram_size, "no_repeat_ngram_size"),
                                       pick(bad_words_ids, "bad_words_ids"))
  processor_params = ProcessorParams.make(
      gcfg.vocab_size, min_length, pick(forced_bos_token_id, "forced_bos_token_id"),
      (gcfg.forced_eos_token_id if isinstance(forced_eos_token_id, str)
       else forced_eos_token_id))
  # transformers' beam output_fill_value: `pad or eos[0]`; greedy writes pad after EOS.
  fill = (pad or eos[0]) if (eos and num_beams > 1) else pad
  cfg = SearchConfig(num_beams, max_length, start, fill, processor_cfg)
  search_params = SearchParams.make(max_length, length_penalty, early_stopping, processor_params)
  rcfg = None
  if kind == "rag_sequence":
    rcfg = RagSequenceConfig(
        search=cfg, num_return_sequences=num_return, decoding=decoding,
        do_deduplication=(model.config.do_deduplication if do_deduplication is None
                          else do_deduplication),
        mask_beam_contexts=mask_beam_contexts, label_smoothing=model.config.label_smoothing,
        bos_token_id=model.config.bos_token_id or gcfg.bos_token_id,
        rescore_candidates=rescore_candidates, rescore_positions=rescore_positions)
  info = DecoderInfo(kind, ARCHITECTURES[kind], int(num_beams), int(max_length), int(num_return),
                     n_docs=None if kind == "bart" else n_docs,
                     decoding=decoding if kind == "rag_sequence" else None)
  return GenerationPlan(kind, cfg, search_params, rcfg, int(num_return), info)


def rag_search_fn(model: RagModel, plan: GenerationPlan) -> Callable[..., Any]:
  """The plan's RAG search as a pure function, to call inside a larger jitted program:
  f(params, search_params, context_input_ids [B * n, S], context_attention_mask [B * n, S],
  doc_scores [B, n]) -> its raw output (pass it to `finish`)."""
  if plan.kind == "rag_token":
    return functools.partial(rag_token_search, model, plan.search)
  if plan.kind == "rag_sequence":
    return functools.partial(rag_sequence_search, model, plan.rag_sequence)
  raise ValueError(f"not a RAG plan: {plan.kind}")


def finish(plan: GenerationPlan, out: Any) -> GenerateOutput:
  """A RAG search's raw output (on the devices) -> GenerateOutput on the host: sequences
  [B * R, T] cropped as transformers crops them, scores [B * R]; NaN / +inf scores refused."""
  if plan.kind == "rag_token":
    r = plan.num_return
    return _finish(out.sequences[:, :r], out.scores[:, :r], out.lengths[:, :r], plan.decoder)
  seqs = np.asarray(out.sequences)
  width_from = (out.candidate_lengths if plan.rag_sequence.decoding == "thorough"
                else out.lengths)
  width = 1 + int(np.asarray(width_from).max(initial=0))
  rescored = (np.asarray(out.num_candidates) if plan.rag_sequence.decoding == "thorough"
              else None)
  return _checked(GenerateOutput(seqs.reshape(-1, seqs.shape[-1])[:, :width],  # [B*R, T]
                                 np.asarray(out.scores).reshape(-1), plan.decoder, rescored))


def generate(model: Any, params: Any, input_ids=None, attention_mask=None, *,
             context_input_ids=None, context_attention_mask=None, doc_scores=None,
             n_docs: int | None = None, **options: Any) -> GenerateOutput:
  """Generates with a BART or RAG model from `rag_jax.checkpoints.load_pretrained`.

  BART: input_ids [B, S], attention_mask [B, S] (None: attend everywhere).
  RAG: context_input_ids, context_attention_mask [B * n, S] (batch-major) and doc_scores [B, n]
    from retrieval; n_docs defaults to doc_scores.shape[1]. RAG-Sequence: decoding "thorough"
    (transformers' rule) or "fast" (the paper's); do_deduplication defaults to the config's;
    mask_beam_contexts / rescore_candidates / rescore_positions: see rag_sequence.py.
    `architecture` overrides the config's (needed for a plain "RagModel" checkpoint).
  Generation options (`plan_generation`'s keywords): transformers' names and meaning (see the
  module docstring): decoding, max_length, min_length, num_beams, num_return_sequences,
  length_penalty, early_stopping, no_repeat_ngram_size, bad_words_ids, forced_bos_token_id,
  forced_eos_token_id, decoder_start_token_id, eos_token_id, pad_token_id, do_deduplication,
  do_sample, mask_beam_contexts, rescore_candidates, rescore_positions, architecture.
  """
  plan = plan_generation(model, **options)
  if plan.kind == "bart":
    if input_ids is None:
      raise ValueError("BART generation needs input_ids")
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    out = compiled_bart_search(model, plan.search)(params, plan.search_params, ids, mask)
    r = plan.num_return
    return _finish(out.sequences[:, :r], out.scores[:, :r], out.lengths[:, :r], plan.decoder)

  if context_input_ids is None or doc_scores is None:
    raise ValueError("RAG generation needs context_input_ids, context_attention_mask and "
                     "doc_scores (retrieve first, e.g. with rag_jax.retrieval)")
  check_finite(np.asarray(doc_scores, np.float32), "doc_scores given to RAG generation")
  doc_scores = jnp.asarray(doc_scores, jnp.float32)
  if n_docs is not None and n_docs != doc_scores.shape[1]:
    raise ValueError(f"n_docs={n_docs} but doc_scores has {doc_scores.shape[1]} columns")
  plan.decoder = dataclasses.replace(plan.decoder, n_docs=int(doc_scores.shape[1]))
  ctx = jnp.asarray(context_input_ids, jnp.int32)
  ctx_mask = (jnp.ones_like(ctx) if context_attention_mask is None
              else jnp.asarray(context_attention_mask, jnp.int32))
  if plan.kind == "rag_token":
    out = compiled_rag_token_search(model, plan.search)(params, plan.search_params, ctx,
                                                        ctx_mask, doc_scores)
  else:
    out = compiled_rag_sequence_search(model, plan.rag_sequence)(params, plan.search_params, ctx,
                                                                 ctx_mask, doc_scores)
  return finish(plan, out)


def _finish(sequences, scores, lengths, decoder: DecoderInfo) -> GenerateOutput:
  seqs, lens = np.asarray(sequences), np.asarray(lengths)
  return _checked(GenerateOutput(_crop(seqs, lens), np.asarray(scores).reshape(-1), decoder))


def _checked(out: GenerateOutput) -> GenerateOutput:
  """`out`, unless a sequence score is NaN or +inf (NaN logits: broken weights or inputs),
  which raises NonFiniteError instead of returning text decoded from garbage. -inf is kept: a
  beam that could not finish (every continuation masked) scores -inf in transformers too."""
  check_finite(out.sequences_scores, f"sequence scores of {out.decoder.describe()} decoding",
               allow_neg_inf=True)
  return out
