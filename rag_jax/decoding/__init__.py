"""Decoding: one jit-compiled beam/greedy search, BART, RAG-Token and RAG-Sequence generation.

  processors.py    transformers' logits processors as masks over static-shape buffers
  beam_search.py   model-agnostic beam and greedy search (`tokens_to_logits` interface, t5x
                   style) under lax.while_loop, transformers v5 `_beam_search` / `_sample` rules
  bart.py          BART generation (encoder once, cross-attention K/V once)
  rag_token.py     RAG-Token: beam search over the per-step marginal over passages
  rag_sequence.py  RAG-Sequence: batched thorough decoding and fast decoding
  generation.py    `generate(model, params, ...)`, transformers' argument names; its resolved
                   options (`plan_generation`) and pure RAG search (`rag_search_fn`) for
                   callers that jit retrieval and decoding together (rag_jax.answer)

See docs/decoding.md for the semantics and what matches transformers.
"""

from rag_jax.decoding.beam_search import (
    DecodingState,
    SearchConfig,
    SearchOutput,
    SearchParams,
    beam_search,
    gather_beams,
    greedy_search,
)
from rag_jax.decoding.generation import (
    DecoderInfo,
    GenerateOutput,
    GenerationPlan,
    finish,
    generate,
    plan_generation,
    rag_search_fn,
)
from rag_jax.decoding.processors import ProcessorConfig, ProcessorParams, apply_processors

__all__ = [
    "DecoderInfo", "DecodingState", "GenerateOutput", "GenerationPlan", "ProcessorConfig",
    "ProcessorParams", "SearchConfig", "SearchOutput", "SearchParams", "apply_processors",
    "beam_search", "finish", "gather_beams", "generate", "greedy_search", "plan_generation",
    "rag_search_fn",
]
