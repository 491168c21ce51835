"""A tokenizer trained offline on a corpus with the `tokenizers` library (no download).

Two kinds, both wrapped in transformers' PreTrainedTokenizerFast with BART's special tokens
(<s>=0, <pad>=1, </s>=2, <unk>=3) and BART's template `<s> text </s>`, so the same tokenizer
serves the DPR question / passage encoders and the BART generator, saves with save_pretrained
and loads with AutoTokenizer:

- "word": lower-cased whole words split on whitespace (the synthetic world writes punctuation
  as separate words), every word of the corpus in the vocabulary;
- "bpe": byte-level BPE as BART's (no prefix space, so rag_jax.data.contexts' fast path
  applies), `vocab_size` merges' worth of subwords: names and values split into pieces.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast

from rag_jax.retrieval.corpus import read_dpr_tsv

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
KINDS = ("word", "bpe")
# RAG's title_sep / doc_sep ("/", "//") join passages and questions in the generator input.
SEPARATORS = "/ //"


def train_tokenizer(texts: Iterable[str], kind: str = "word", vocab_size: int = 1000) -> Any:
  """A PreTrainedTokenizerFast trained on `texts` (see the module docstring)."""

  if kind == "word":
    tok = tokenizers.Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(vocab_size=10**9, min_frequency=1, show_progress=False,
                                        special_tokens=list(SPECIAL_TOKENS))
  elif kind == "bpe":
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
  else:
    raise ValueError(f"tokenizer kind {kind!r}: expected one of {KINDS}")
  texts = list(texts)
  tok.train_from_iterator(tqdm(texts, desc="tokenizer", unit="text", dynamic_ncols=True),
                          trainer, length=len(texts))
  for i, token in enumerate(SPECIAL_TOKENS):
    if tok.token_to_id(token) != i:
      raise AssertionError(f"special token {token} got id {tok.token_to_id(token)}, not {i}")
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
      special_tokens=[("<s>", 0), ("</s>", 2)])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>", unk_token="<unk>", model_max_length=512)


def world_texts(directory: str | os.PathLike) -> list[str]:
  """Every passage title and text, question and answer of a world directory (both worlds)."""
  directory = Path(directory)
  texts = [SEPARATORS]
  for name in ("passages.tsv", "passages_swapped.tsv"):
    for passage in read_dpr_tsv(directory / name):
      texts.extend((passage.title, passage.text))
  for name in ("train.source", "train.target", "val.source", "val.target"):
    texts.extend((directory / name).read_text().splitlines())
  return texts
