"""Questions -> answers with the passages they came from: RAG end to end.

The library side of ``python -m rag_jax.commands.answer`` (rag_jax/commands/answer.py).

What transformers' `RagTokenForGeneration.generate(input_ids=...)` / `RagSequenceForGeneration`
do with a `RagRetriever`, in rag_jax's pieces:

  1. q(x): the RAG checkpoint's question encoder on the question-encoder tokenizer's ids;
  2. the index (rag_jax.retrieval, exact or ScaNN) returns the top n_docs passages and their
     exact inner products q(x) . d(z), the doc scores;
  3. generator inputs: the reference's strings (`title / text // question`, rag_jax.data.contexts),
     tokenized to max_combined_length;
  4. rag_jax.decoding.generate, decoded to strings: RAG-Token decoding for a
     RagTokenForGeneration checkpoint, RAG-Sequence (thorough / fast) for a
     RagSequenceForGeneration one (config.json's `architectures`; `architecture=` overrides it).

`RagAnswerer(checkpoint, index_dir)(questions)` returns one :class:`Answer` per question, with
its passages, their prior p(z|x) = softmax(doc scores), and the decoder that produced it.

`retrieval="device"` (or "auto", where the index fits the devices' memory:
rag_jax.retrieval.device.setup, the trainer's rule) runs steps 1-4 as one jitted program from
question ids to answer ids: q(x), the exact top-n over the passage embeddings sharded on the
devices, a gather of the n passages' pre-tokenized generator parts (the passage table, built
once beside the index), the generator rows assembled from token ids with static shapes (the same
ids as step 3's strings: rag_jax.data.passage_table), and the compiled RAG-Token or
RAG-Sequence search (rag_jax.decoding.rag_search_fn). The host only tokenizes the questions
(and their generator parts) and detokenizes the answers; the same ids, scores, rows and answers
as the host path over an exact index (tests/test_device_answer.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import textwrap
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rag_jax import checkpoints
from rag_jax.data import contexts
from rag_jax.data.passage_table import question_parts
from rag_jax.decoding import (
    DecoderInfo,
    GenerateOutput,
    GenerationPlan,
    finish,
    generate,
    plan_generation,
    rag_search_fn,
)
from rag_jax.models.rag import RagModel
from rag_jax.parallel import local_data_mesh
from rag_jax.retrieval import device
from rag_jax.retrieval.device import DeviceRetrieval
from rag_jax.retrieval.exact import ExactIndex
from rag_jax.retrieval.retriever import Hit, Retriever
from rag_jax.retrieval.store import PassageStore
from rag_jax.utils.errors import InputError, check_finite

SCORES_WHAT = "doc scores q(x) . d(z) of the retrieved passages (one row per question)"


@dataclasses.dataclass(frozen=True)
class Answer:
  """One question's answer.

  text / score: the best generated answer and its decoding score (beam: length-normalised
  log-prob; RAG-Sequence thorough: -loss; fast: the log-add-exp merge; greedy: log-prob sum).
  alternatives: every returned (text, score), best first (num_return_sequences of them).
  passages: the n_docs retrieved passages, best first (Hit.score is q(x) . d(z)).
  passage_probs: p(z|x) = softmax of the doc scores, the prior the generator marginalises over.
  decoder: the decoder that produced the text (as returned by rag_jax.decoding.generate).
  """

  question: str
  text: str
  score: float
  alternatives: tuple[tuple[str, float], ...]
  passages: tuple[Hit, ...]
  passage_probs: tuple[float, ...]
  decoder: DecoderInfo


def answer_program(model: RagModel, retrieval: DeviceRetrieval, plan: GenerationPlan):
  """Answering as one jitted program: (params, plan.search_params, question ids and mask
  [Q, Lq], question parts [Q, W] int32 and their lengths [Q] (passage_table.question_parts),
  retrieval.arrays) -> (generator inputs: context_input_ids / context_attention_mask [Q * n, L],
  doc_scores / doc_ids [Q, n]; the RAG search's raw output, for rag_jax.decoding.finish).

  Inside: q(x), the exact top-n over the sharded index, the cross-shard gather of the passages'
  parts, the generator rows' assembly and the compiled RAG-Token / RAG-Sequence search (thorough:
  per-passage beams, dedup and the teacher-forced rescoring, all in the same program).

  Decoding is split over the mesh's devices by questions when Q is a multiple of their number
  (RagAnswerer pads the batch to one): the generator rows and doc scores are constrained to
  be sharded by rows, and XLA partitions the search's loops accordingly, so each device decodes
  Q / devices questions (tests/test_device_answer.py compares the per-device FLOPs). Otherwise
  every device decodes the whole batch (the same result)."""
  search = rag_search_fn(model, plan)
  devices = retrieval.mesh.devices.size
  split = NamedSharding(retrieval.mesh, P(retrieval.axis))

  def program(params, search_params, input_ids, attention_mask, question_tokens,
              question_lengths, arrays):
    inputs = retrieval.generator_inputs(model, params, input_ids, attention_mask,
                                        question_tokens, question_lengths, arrays)
    if devices > 1 and input_ids.shape[0] % devices == 0:
      # Rows b * n + j of question b stay together: [Q * n, L] splits into whole questions.
      inputs = {k: jax.lax.with_sharding_constraint(v, split) for k, v in inputs.items()}
    return inputs, search(params, search_params, inputs["context_input_ids"],
                          inputs["context_attention_mask"], inputs["doc_scores"])

  return jax.jit(program)


def index_passages(index_dir: str | os.PathLike) -> int | None:
  """The number of passages of an index directory written by build_index, read from its
  passages/store.json without loading the index (None where there is no readable store: loading
  the directory names what is wrong)."""
  store = Path(index_dir) / "passages"
  if not (store / "store.json").is_file():
    return None
  try:
    return len(PassageStore(store))
  except (OSError, ValueError, KeyError):
    return None


def check_within_index(name: str, wanted: int, index_dir: str | os.PathLike) -> None:
  """Refuses `wanted` passages per question (the flag or setting called `name`) from an index
  that holds fewer, before anything is loaded: the search cannot return them, and the buffers
  sized for them can exceed any memory."""
  count = index_passages(index_dir)
  if count is not None and wanted > count:
    raise InputError(f"{name}={wanted}: the index {index_dir} holds {count} "
                     f"passage{'s' if count != 1 else ''}; ask for at most {count}")


class RagAnswerer:
  """A RAG checkpoint with its tokenizers, and an index directory built by rag_jax.retrieval.

  Args:
    checkpoint: a transformers RAG directory (RagSequenceForGeneration / RagTokenForGeneration
      weights, question_encoder_tokenizer/ and generator_tokenizer/), e.g. a trainer's export.
    index_dir: a directory written by `python -m rag_jax.commands.build_index` (passages/ and
      index/), encoded with the passage encoder that the checkpoint's question encoder was
      trained against.
    n_docs: passages per question (default: the checkpoint's config); more than the index holds
      is refused (InputError) before the checkpoint is loaded.
    dtype: compute dtype (bfloat16 on accelerators).
    max_question_length: question-encoder token budget (more than the question
      encoder's positions: its positions).
    retrieval: "host" (the index searched from the host, generator inputs from strings),
      "device" (one jitted program from question ids to answer ids, see the module docstring;
      an error if the index does not fit the devices) or "auto" (device where it fits, else
      host, said in one log line).
    mesh: the devices holding the index in device retrieval (default: index_kwargs' mesh, else
      every local device).
    device_index_dtype / device_index_memory_fraction: device retrieval's storage dtype ("auto":
      bf16 on accelerators, float32 on CPU) and memory budget (rag_jax.retrieval.device.setup).
    tables_dir: where the passage table is loaded from or built once (default
      index_dir/passage_tables, shared with the trainer).
    merged: on several processes, one exact or ScaNN index per process over its block of rows,
      every answer a collective call (Retriever.over_directory); host retrieval only.
    index_kwargs: passed to `load_index` (e.g. mesh= for an exact index).
  """

  def __init__(self, checkpoint: str | os.PathLike, index_dir: str | os.PathLike, *,
               n_docs: int | None = None, dtype: Any = jnp.float32,
               max_question_length: int = 128, retrieval: str = "host",
               mesh: Mesh | None = None, device_index_dtype: str = "auto",
               device_index_memory_fraction: float = 0.5,
               tables_dir: str | os.PathLike | None = None, merged: bool = False,
               **index_kwargs: Any):
    if merged and retrieval != "host" and jax.process_count() > 1:
      raise ValueError(f"retrieval={retrieval!r} with merged=True: a merged index is searched "
                       "on the host (retrieval='host')")
    if n_docs is not None:
      check_within_index("n_docs", n_docs, index_dir)
    else:
      check_within_index(f"n_docs of {Path(checkpoint) / checkpoints.CONFIG_NAME}",
                         checkpoints.read_config(checkpoint).get("n_docs", 0), index_dir)
    model, self.params = checkpoints.load_pretrained(checkpoint, dtype=dtype)
    if not isinstance(model, RagModel):
      raise checkpoints.CheckpointError(
          f"{checkpoint}: a {type(model).__name__} checkpoint; answering needs a "
          "RAG checkpoint (RagSequenceForGeneration or RagTokenForGeneration)")
    tokenizers = checkpoints.load_tokenizer(checkpoint)
    if not isinstance(tokenizers, checkpoints.RagTokenizers):
      raise checkpoints.CheckpointNotFoundError(f"{checkpoint}: no question_encoder_tokenizer/ and "
                              "generator_tokenizer/ (save the checkpoint with its tokenizers)")
    self.model = checkpoints.replace_config(model, n_docs=n_docs or model.config.n_docs)
    self.tokenizers = tokenizers
    own = Path(checkpoint) / "index"
    if (own / "passages" / "store.json").is_file() and Path(index_dir).resolve() != own.resolve():
      logging.warning("%s holds the passages as this checkpoint's trained context encoder "
                      "encodes them, but %s is searched (encoded by another encoder: stale for "
                      "this question encoder)", own, index_dir)
    self.retriever = Retriever.over_directory(index_dir, self.model, self.params,
                                              tokenizers.question_encoder, max_question_length,
                                              merged=merged, **index_kwargs)
    self.format = contexts.ContextFormat.from_rag_config(self.model.config)
    # The token-id assembly of device retrieval (its tokenizer and format checks apply there).
    self.assembler = (None if retrieval == "host"
                      else contexts.ContextAssembler(tokenizers.generator, self.format))
    mesh = mesh or index_kwargs.get("mesh") or local_data_mesh()
    self.device: DeviceRetrieval | None = device.setup(
        retrieval, self.retriever.index, self.retriever.store, self.assembler,
        Path(index_dir) / "passage_tables" if tables_dir is None else tables_dir, self.n_docs,
        mesh, dtype=device_index_dtype, memory_fraction=device_index_memory_fraction,
        progress=False)
    self._programs: dict[Any, Any] = {}

  @property
  def retrieval(self) -> str:
    """The path that answers: "device" or "host"."""
    return "host" if self.device is None else "device"

  @property
  def search(self) -> str:
    """What decides the retrieved passages: "exact <dtype>" (exact search of embeddings stored
    in dtype, on the host or the devices: the same passages and scores), else the index kind
    ("scann": approximate; "bm25")."""
    if self.device is not None:
      return f"exact {self.device.arrays['embeddings'].dtype}"
    index = self.retriever.index
    return f"exact {index.db.dtype}" if isinstance(index, ExactIndex) else index.kind

  @property
  def n_docs(self) -> int:
    return self.model.config.n_docs

  def retrieve(self, questions: list[str]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(question ids [Q, Lq], passage rows [Q, n] int64, doc scores [Q, n] float32)."""
    ids, mask = self.retriever.tokenize(questions)
    scores, rows = self.retriever.search(ids, mask, self.n_docs)
    return ids, rows, scores

  def generator_inputs(self, questions: list[str]
                       ) -> tuple[list[list[Hit]], np.ndarray, np.ndarray, np.ndarray]:
    """Retrieval and the generator's inputs: (hits per question, context_input_ids and
    context_attention_mask [Q * n, L] batch-major, doc scores [Q, n] float32)."""
    ids, rows, scores = self.retrieve(questions)
    hits = self.retriever.hits(scores, rows)
    decoded = contexts.decode_questions(self.tokenizers.question_encoder, ids)
    ctx, ctx_mask = contexts.exact_context_inputs(
        self.tokenizers.generator, [[h.title for h in row] for row in hits],
        [[h.text for h in row] for row in hits], decoded, self.format)  # [Q*n, L]
    return hits, ctx, ctx_mask, scores

  def device_program(self, plan: GenerationPlan):
    """The jitted answering program for `plan` (cached): (params, search_params, question ids
    and mask [Q, Lq], question parts [Q, W] and lengths [Q], the index arrays) -> (generator
    inputs: context_input_ids / context_attention_mask [Q * n, L], doc_scores / doc_ids [Q, n];
    the RAG search's raw output)."""
    key = (self.n_docs, plan.kind, plan.search, plan.rag_sequence)
    if key not in self._programs:
      self._programs[key] = answer_program(
          self.model, dataclasses.replace(self.device, n_docs=self.n_docs), plan)
    return self._programs[key]

  def answer_on_devices(self, questions: list[str], **generate_kwargs: Any
                        ) -> tuple[dict[str, np.ndarray], GenerateOutput]:
    """Device retrieval and decoding in one program: (its generator inputs on the host:
    context_input_ids / context_attention_mask [Q * n, L], doc_scores [Q, n] float32,
    doc_ids [Q, n]; the decoded output). Host work: tokenizing questions, cropping outputs."""
    if not questions:
      raise ValueError("answer_on_devices needs at least one question")
    if self.device is None:
      raise ValueError("this answerer retrieves on the host (retrieval='host', or 'auto' found "
                       "the index too large for the devices)")
    plan = plan_generation(self.model, n_docs=self.n_docs, **generate_kwargs)
    if plan.kind == "bart":
      raise ValueError("device answering decodes RAG-Token or RAG-Sequence")
    ids, mask = self.retriever.tokenize(questions)
    q_tokens, q_lengths = question_parts(
        self.assembler, contexts.decode_questions(self.tokenizers.question_encoder, ids))
    count = len(questions)
    # Pad the batch to a multiple of the devices (copies of the last question), so that
    # decoding splits over them (answer_program); the copies are cropped below.
    padded = -count % self.device.mesh.devices.size
    args = [np.concatenate([a, np.repeat(a[-1:], padded, axis=0)])
            for a in (ids, mask, q_tokens, q_lengths)]
    inputs, out = self.device_program(plan)(self.params, plan.search_params, *args,
                                            self.device.arrays)
    inputs, out = jax.device_get((inputs, out))
    n = self.n_docs
    inputs = {k: v[:count * n] if k.startswith("context_") else v[:count]  # [Q*n, L] / [Q, n]
              for k, v in inputs.items()}
    out = jax.tree.map(lambda a: a[:count], out)  # every output is [Q, ...]
    check_finite(inputs["doc_scores"], SCORES_WHAT)
    return inputs, finish(plan, out)

  def __call__(self, questions: list[str], **generate_kwargs: Any) -> list[Answer]:
    """Answers `questions`; `generate_kwargs` are rag_jax.decoding.generate's options
    (num_beams, max_length, decoding="fast", num_return_sequences, ...). The decoder is the
    checkpoint's kind (RagTokenForGeneration: RAG-Token; RagSequenceForGeneration:
    RAG-Sequence) unless `architecture=` names the other; each Answer records the one that ran."""
    if not questions:
      return []
    if self.device is None:
      hits, ctx, ctx_mask, scores = self.generator_inputs(questions)
      out = generate(self.model, self.params, context_input_ids=ctx,
                     context_attention_mask=ctx_mask, doc_scores=scores, n_docs=self.n_docs,
                     **generate_kwargs)
    else:
      inputs, out = self.answer_on_devices(questions, **generate_kwargs)
      scores = inputs["doc_scores"]
      hits = self.retriever.hits(scores, inputs["doc_ids"])
    texts = self.tokenizers.generator.batch_decode(out.sequences, skip_special_tokens=True)
    per_question = len(texts) // len(questions)
    priors = np.exp(scores - scores.max(axis=1, keepdims=True))
    priors /= priors.sum(axis=1, keepdims=True)  # softmax over the n passages
    answers = []
    for i, question in enumerate(questions):
      block = range(i * per_question, (i + 1) * per_question)
      alternatives = tuple((texts[j].strip(), float(out.sequences_scores[j])) for j in block)
      answers.append(Answer(question, alternatives[0][0], alternatives[0][1], alternatives,
                            tuple(hits[i]), tuple(float(p) for p in priors[i]), out.decoder))
    return answers


def format_answer(answer: Answer, max_chars: int = 300) -> str:
  """The question, its answer(s) with the decoder that produced them, and the passages with
  p(z|x) and doc score."""
  lines = [f"Q: {answer.question}",
           f"A: {answer.text}   (score {answer.score:.4f}; {answer.decoder.describe()})"]
  lines += [f"   or: {text}   (score {score:.4f})" for text, score in answer.alternatives[1:]]
  lines.append("   passages:")
  for rank, (hit, prob) in enumerate(zip(answer.passages, answer.passage_probs, strict=True), 1):
    text = textwrap.shorten(hit.text, max_chars, placeholder=" ...") if hit.text else ""
    lines.append(f"  {rank:>2}. p={prob:.3f} [{hit.score:9.4f}] {hit.title} (id {hit.id})")
    lines.append(textwrap.indent(textwrap.fill(text, 96), "      "))
  return "\n".join(lines)
