"""A tiny question-answering world and transformers' answers over it: the reference of the
answering (tests/test_answer.py) and evaluation (tests/test_evaluate.py) tests.

`build_world` writes a title/text TSV corpus, indexes it with rag_jax's retrieval pipeline and
saves RAG-Token / RAG-Sequence checkpoints as transformers writes them. `torch_pipeline` answers
questions over the same corpus with transformers' PyTorch classes and numpy only: DPR question
and context encoders, a brute-force top-n, the context strings of transformers'
`RagRetriever.postprocess_docs` and `RagTokenForGeneration.generate` /
`RagSequenceForGeneration.generate` (as transformers 5.23 runs it, or with the contexts' mask
given to its per-passage beam search: `beam_contexts_masked`).
"""

from __future__ import annotations

import contextlib
import csv
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from rag_jax.retrieval.pipeline import build_from_corpus
from tests import decoding_reference as dref
from tests import torch_reference as ref

# (root, question tokenizer, generator tokenizer, DPRContextEncoder,
#  {"token" | "sequence": (torch RAG model, checkpoint path)})
World = tuple[Path, Any, Any, Any, dict[str, tuple[Any, Path]]]


def build_world(root: Path, titles: Sequence[str], texts: Sequence[str],
                questions: Sequence[str], n_docs: int, max_combined: int) -> World:
  """Corpus, exact index, tokenizers and both RAG checkpoints under `root`.

  The tokenizers are trained on the corpus and the questions; each RAG model's question encoder
  gives its weights to the passage encoder, so that questions retrieve the passages that share
  their words.
  """
  with open(root / "corpus.tsv", "w", newline="") as f:  # '"Cora"' is written '"""Cora"""'
    csv.writer(f, delimiter="\t", lineterminator="\n").writerows(zip(titles, texts, strict=True))
  q_tok, g_tok = ref.train_tokenizers([*texts, *questions, *titles], question_vocab=80,
                                      generator_vocab=64)
  models = {}
  for kind in ("token", "sequence"):
    torch_rag, path = dref.rag(root / kind, kind, n_docs=n_docs)
    torch_rag.config.max_combined_length = max_combined
    torch_rag.save_pretrained(path)
    transformers.RagTokenizer(q_tok, g_tok).save_pretrained(path)
    models[kind] = (torch_rag, path)
  ctx = transformers.DPRContextEncoder(transformers.DPRConfig(**ref.DPR_CONFIG)).eval()
  ctx.ctx_encoder.load_state_dict(models["token"][0].question_encoder.question_encoder
                                  .state_dict())
  ctx.save_pretrained(root / "ctx")
  q_tok.save_pretrained(root / "ctx")
  build_from_corpus(root / "corpus.tsv", root / "kb", encoder=str(root / "ctx"), fmt="tsv",
                    split_words=None, index_type="exact", progress=False)
  return root, q_tok, g_tok, ctx, models


def context_title(title: str) -> str:
  """The title as `RagRetriever.postprocess_docs` writes it: one leading and one trailing
  double quote dropped."""
  return title.removeprefix('"').removesuffix('"')


@contextlib.contextmanager
def beam_contexts_masked(torch_rag: Any, context_input_ids: torch.Tensor,
                         context_attention_mask: torch.Tensor, n_docs: int) -> Iterator[None]:
  """transformers' RagSequenceForGeneration.generate with the contexts' attention mask given to
  its per-passage beam search, which transformers 5.23 runs with `attention_mask=None` (its
  rescoring pass masks them): question i's `generator.generate` call gets rows
  i * n_docs ... (i + 1) * n_docs of the mask. Everything else is transformers' loop."""
  generate = torch_rag.generator.generate
  calls = itertools.count()

  def masked(input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    start = next(calls) * n_docs
    rows = slice(start, start + n_docs)
    assert kwargs.get("attention_mask") is None  # transformers' loop, as read
    assert torch.equal(input_ids, context_input_ids[rows])  # question i's passages, in order
    return generate(input_ids, **{**kwargs, "attention_mask": context_attention_mask[rows]})

  torch_rag.generator.generate = masked
  try:
    yield
  finally:
    del torch_rag.generator.generate


def torch_pipeline(world: World, kind: str, titles: Sequence[str], texts: Sequence[str],
                   questions: Sequence[str], n_docs: int, mask_beam_contexts: bool = False,
                   **generate_kwargs) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(top rows [Q, n_docs], their doc scores [Q, n_docs], answer strings) of transformers'
  `kind` ("token" | "sequence") model, with `generate_kwargs` for its generate;
  mask_beam_contexts: RAG-Sequence's per-passage beams get the contexts' mask
  (:func:`beam_contexts_masked`)."""
  _, q_tok, g_tok, ctx, models = world
  torch_rag = models[kind][0]
  with torch.no_grad():
    enc = q_tok(list(titles), list(texts), padding=True, truncation=True, return_tensors="pt",
                max_length=ref.DPR_CONFIG["max_position_embeddings"])
    passages = ctx(enc["input_ids"], enc["attention_mask"],
                   torch.zeros_like(enc["input_ids"])).pooler_output.numpy()
    q = q_tok(list(questions), padding=True, return_tensors="pt")
    question = torch_rag.question_encoder(q["input_ids"], q["attention_mask"])[0].numpy()
  scores = question @ passages.T  # [Q, P] brute force
  rows = np.argsort(-scores, axis=1, kind="stable")[:, :n_docs]
  strings = [(context_title(titles[r]) + " / " + texts[r] + " // "
              + q_tok.decode(q["input_ids"][i], skip_special_tokens=True)).replace("  ", " ")
             for i in range(len(questions)) for r in rows[i]]
  ctx_ids = g_tok(strings, max_length=torch_rag.config.max_combined_length,
                  padding="max_length", truncation=True, return_tensors="pt")
  doc_scores = np.take_along_axis(scores, rows, axis=1)
  masked = (beam_contexts_masked(torch_rag, ctx_ids["input_ids"], ctx_ids["attention_mask"],
                                 n_docs) if mask_beam_contexts else contextlib.nullcontext())
  with torch.no_grad(), masked:
    out = torch_rag.generate(context_input_ids=ctx_ids["input_ids"],
                             context_attention_mask=ctx_ids["attention_mask"],
                             doc_scores=torch.from_numpy(doc_scores), n_docs=n_docs,
                             **dref.torch_kwargs(dref.generation_kwargs(**generate_kwargs)))
  return rows, doc_scores, [s.strip() for s in g_tok.batch_decode(out, skip_special_tokens=True)]
