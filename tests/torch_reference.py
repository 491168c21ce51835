"""Tiny seeded transformers (PyTorch) models: the independent numerical reference of the tests.

Each builder makes a random model offline with a fixed torch seed, saves it with transformers'
own `save_pretrained` (the exact public checkpoint layout) and returns the eval-mode torch model
with the directory. Tests then load the directory through rag_jax's loader and compare outputs.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import torch
import transformers

# Two BART shapes: (a) scale_embedding, odd head count, different encoder/decoder depth, erf GELU;
# (b) unscaled, even heads, tanh-GELU, untied LM head.
BART_CONFIGS = {
    "scaled_odd_heads": dict(
        vocab_size=64, d_model=24, encoder_layers=3, decoder_layers=2, encoder_attention_heads=3,
        decoder_attention_heads=3, encoder_ffn_dim=40, decoder_ffn_dim=36,
        max_position_embeddings=32, scale_embedding=True, activation_function="gelu"),
    "plain_untied": dict(
        vocab_size=72, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=2, encoder_ffn_dim=48, decoder_ffn_dim=64,
        max_position_embeddings=40, scale_embedding=False, activation_function="gelu_new",
        tie_word_embeddings=False),
}

DPR_CONFIG = dict(vocab_size=80, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=48, max_position_embeddings=40)


def _randomize_buffers_and_norms(model: torch.nn.Module, seed: int) -> None:
  """LayerNorms start at (1, 0) and final_logits_bias at 0: perturb them so they are tested."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name.lower() or name.endswith("bias"):
        p.add_(0.1 * torch.randn(p.shape, generator=gen))
    for name, b in model.named_buffers():
      if name.endswith("final_logits_bias"):
        b.copy_(0.5 * torch.randn(b.shape, generator=gen))


def bart(tmp: Path, name: str = "scaled_odd_heads", seed: int = 0, **overrides):
  """A BartForConditionalGeneration saved to tmp/name; returns (torch model, path)."""
  torch.manual_seed(seed)
  config = transformers.BartConfig(**{**BART_CONFIGS[name], **overrides})
  model = transformers.BartForConditionalGeneration(config).eval()
  _randomize_buffers_and_norms(model, seed)
  path = Path(tmp) / f"bart_{name}"
  model.save_pretrained(path)
  return model, path


def dpr(tmp: Path, kind: str = "question", projection_dim: int = 0, seed: int = 0,
        init_std: float = 0.02):
  """A DPRQuestionEncoder / DPRContextEncoder saved to tmp; returns (torch model, path)."""
  torch.manual_seed(seed)
  config = transformers.DPRConfig(**DPR_CONFIG, projection_dim=projection_dim,
                                  initializer_range=init_std)
  cls = {"question": transformers.DPRQuestionEncoder,
         "context": transformers.DPRContextEncoder}[kind]
  model = cls(config).eval()
  _randomize_buffers_and_norms(model, seed)
  path = Path(tmp) / f"dpr_{kind}_{projection_dim}"
  model.save_pretrained(path)
  return model, path


def rag(tmp: Path, kind: str = "sequence", n_docs: int = 3, seed: int = 0, projection_dim=0,
        init_std: float = 0.02):
  """A RagSequenceForGeneration / RagTokenForGeneration (DPR + BART) saved to tmp.

  A larger init_std gives logits that differ clearly between passages (gradient tests)."""
  torch.manual_seed(seed)
  q = transformers.DPRConfig(**DPR_CONFIG, projection_dim=projection_dim,
                             initializer_range=init_std)
  g = transformers.BartConfig(**BART_CONFIGS["scaled_odd_heads"], init_std=init_std)
  config = transformers.RagConfig.from_question_encoder_generator_configs(q, g, n_docs=n_docs)
  cls = {"sequence": transformers.RagSequenceForGeneration,
         "token": transformers.RagTokenForGeneration}[kind]
  model = cls(config).eval()
  _randomize_buffers_and_norms(model, seed)
  path = Path(tmp) / f"rag_{kind}"
  model.save_pretrained(path)
  return model, path


def to_torch(x) -> torch.Tensor:
  return torch.from_numpy(np.asarray(x))


def padded_batch(rng: np.random.Generator, batch: int, length: int, vocab: int, pad: int,
                 left: dict[int, int] | None = None, right: dict[int, int] | None = None):
  """Random ids in [3, vocab) with some rows padded on the left / right (pad id, mask 0)."""
  ids = rng.integers(3, vocab, (batch, length))
  mask = np.ones((batch, length), np.int64)
  for row, n in (left or {}).items():
    ids[row, :n], mask[row, :n] = pad, 0
  for row, n in (right or {}).items():
    ids[row, length - n:], mask[row, length - n:] = pad, 0
  return ids, mask


def wordpiece_vocabulary(corpus: list[str], size: int, special_tokens: list[str], normalizer,
                         pre_tokenizer) -> dict[str, int]:
  """A WordPiece vocabulary built deterministically from `corpus` (split into words by the
  tokenizer's own `normalizer` and `pre_tokenizer`): the special tokens, every word-initial
  character, every inner character as a "##" continuation, then whole words by descending count
  (ties alphabetical) up to `size` entries, ids in that order.

  `tokenizers`' WordPieceTrainer is not used because its ids (and, on ties, its tokens) follow
  Rust's per-process hash order: a seeded model would then see other token ids in each run.
  """
  words = collections.Counter(word for text in corpus for word, _ in
                              pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
  tokens = list(special_tokens)
  tokens += sorted({word[0] for word in words} - set(tokens))
  tokens += sorted({"##" + char for word in words for char in word[1:]})
  by_count = sorted(words.items(), key=lambda item: (-item[1], item[0]))
  tokens += [word for word, _ in by_count if word not in set(tokens)][:max(0, size - len(tokens))]
  return {token: i for i, token in enumerate(tokens)}


def train_tokenizers(corpus: list[str], question_vocab: int = 80, generator_vocab: int = 64):
  """An uncased WordPiece (DPR question encoder) and a byte-level BPE (BART) tokenizer built
  offline from `corpus`, wrapped in transformers' fast classes; both are the same in every
  process (same tokens, same ids)."""
  import tokenizers
  from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

  normalizer = normalizers.BertNormalizer(lowercase=True)
  pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  vocab = wordpiece_vocabulary(corpus, question_vocab,
                               ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], normalizer,
                               pre_tokenizer)
  wp = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  wp.normalizer = normalizer
  wp.pre_tokenizer = pre_tokenizer
  wp.post_processor = processors.BertProcessing(("[SEP]", wp.token_to_id("[SEP]")),
                                                ("[CLS]", wp.token_to_id("[CLS]")))
  wp.decoder = decoders.WordPiece()
  q_tok = transformers.DPRQuestionEncoderTokenizerFast(tokenizer_object=wp)

  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=generator_vocab, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]))
  bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
  bpe.decoder = decoders.ByteLevel()
  g_tok = transformers.BartTokenizerFast(tokenizer_object=bpe)
  return q_tok, g_tok
