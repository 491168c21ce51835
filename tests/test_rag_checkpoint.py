"""Nested RAG checkpoints: the question encoder and generator inside a saved transformers
RagSequenceForGeneration / RagTokenForGeneration load and match, and export back; their
tokenizers load as transformers loads them, in its current layout and in the hub's older one."""

import io
import json
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

from rag_jax.checkpoints import (
    CheckpointNotFoundError,
    RagTokenizers,
    load_pretrained,
    load_tokenizer,
    save_pretrained,
)
from rag_jax.commands import answer as answer_command
from rag_jax.models.rag import RagModel
from tests import torch_reference as ref

TOL = 1e-5


def _rag_inputs(model, batch=2, seed=0):
  cfg = model.config
  rng = np.random.default_rng(seed)
  q_ids, q_mask = ref.padded_batch(rng, batch, 7, cfg.question_encoder.vocab_size, pad=0,
                                   right={1: 2})
  ctx, ctx_mask = ref.padded_batch(rng, batch * cfg.n_docs, 12, cfg.generator.vocab_size,
                                   pad=1, right={0: 3, 4: 5})
  dec = rng.integers(3, cfg.generator.vocab_size, (batch, 6))
  doc_embeds = rng.normal(size=(batch, cfg.n_docs, cfg.question_encoder.embedding_dim))
  return q_ids, q_mask, ctx, ctx_mask, dec, doc_embeds.astype(np.float32)


@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_nested_models_load_and_match(tmp_path, kind):
  torch_model, path = ref.rag(tmp_path, kind, n_docs=3, projection_dim=8)
  model, params = load_pretrained(path)
  assert isinstance(model, RagModel)
  assert model.config.architecture == f"Rag{kind.capitalize()}ForGeneration"
  q_ids, q_mask, ctx, ctx_mask, dec, doc_embeds = _rag_inputs(model)

  with torch.no_grad():
    q_ref = torch_model.question_encoder(ref.to_torch(q_ids), ref.to_torch(q_mask))[0]
    scores_ref = torch.bmm(q_ref[:, None, :], ref.to_torch(doc_embeds).transpose(1, 2))[:, 0]
    out_ref = torch_model(context_input_ids=ref.to_torch(ctx),
                          context_attention_mask=ref.to_torch(ctx_mask),
                          doc_scores=scores_ref, decoder_input_ids=ref.to_torch(dec))
  out = jax.jit(model.apply)({"params": params}, ctx, ctx_mask, dec, input_ids=q_ids,
                             attention_mask=q_mask, retrieved_doc_embeds=doc_embeds)
  np.testing.assert_allclose(out.question_embeddings, q_ref.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(out.doc_scores, scores_ref.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(out.logits, out_ref.logits.numpy(), atol=TOL, rtol=0)


def test_rag_export_round_trip_through_transformers(tmp_path):
  torch_model, path = ref.rag(tmp_path, "sequence", n_docs=2)
  model, params = load_pretrained(path)
  out_dir = save_pretrained(model, params, tmp_path / "export")
  reloaded = transformers.RagSequenceForGeneration.from_pretrained(out_dir).eval()
  assert reloaded.config.n_docs == 2
  for a, b in zip(reloaded.state_dict().items(), torch_model.state_dict().items(), strict=True):
    assert a[0] == b[0]
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


def test_tokenizers_load_from_the_checkpoint_directory(tmp_path):
  corpus = ["who wrote the origin of species", "charles darwin wrote it in 1859",
            "the capital of france is paris"] * 5
  q_tok, g_tok = ref.train_tokenizers(corpus)
  _, path = ref.rag(tmp_path, "sequence", n_docs=2)
  transformers.RagTokenizer(question_encoder=q_tok, generator=g_tok).save_pretrained(path)
  loaded = load_tokenizer(path)
  assert isinstance(loaded, RagTokenizers)
  text = "Who wrote The Origin of Species?"
  assert loaded.question_encoder(text)["input_ids"] == q_tok(text)["input_ids"]
  assert loaded.generator(text)["input_ids"] == g_tok(text)["input_ids"]

  # A BART export carries its tokenizer; loading gives the same encoding.
  _, bart_path = ref.bart(tmp_path)
  model, params = load_pretrained(bart_path)
  out = save_pretrained(model, params, tmp_path / "bart_export", tokenizer=g_tok)
  assert load_tokenizer(out)(text)["input_ids"] == g_tok(text)["input_ids"]


@pytest.mark.parametrize("kind", ["question", "context"])
def test_dpr_export_round_trip_through_transformers(tmp_path, kind):
  torch_model, path = ref.dpr(tmp_path, kind, projection_dim=6)
  model, params = load_pretrained(path)
  out_dir = save_pretrained(model, params, tmp_path / "export")
  cls = type(torch_model)
  reloaded = cls.from_pretrained(out_dir).eval()
  ids, mask = ref.padded_batch(np.random.default_rng(0), 2, 9, 80, pad=0, right={0: 3})
  with torch.no_grad():
    a = reloaded(ref.to_torch(ids), ref.to_torch(mask)).pooler_output
    b = torch_model(ref.to_torch(ids), ref.to_torch(mask)).pooler_output
  torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------ the hub's older tokenizer layout

CORPUS = ["who wrote the origin of species", "charles darwin wrote it in 1859",
          "the capital of france is paris", "Où est la Tour Eiffel ?"] * 5
TEXTS = ["Who wrote The Origin of Species?", "charles  darwin, 1859", "Où est Paris ?\tzzz",
         "the capital"]


def old_hub_layout(directory):
  """A tokenizer directory saved by transformers 5 (tokenizer.json, and tokenizer_config.json
  naming its class) rewritten as older hub uploads hold it (facebook/rag-sequence-nq's
  question_encoder_tokenizer/ and generator_tokenizer/, the DPR encoders): the vocabulary files
  of its model (WordPiece: vocab.txt; byte-level BPE: vocab.json and merges.txt), and a
  tokenizer_config.json without tokenizer_class; no tokenizer.json."""
  model = json.loads((directory / "tokenizer.json").read_text())["model"]
  if model["type"] == "WordPiece":
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    assert [model["vocab"][t] for t in tokens] == list(range(len(tokens)))
    (directory / "vocab.txt").write_text("".join(f"{t}\n" for t in tokens))
  else:
    assert model["type"] == "BPE"
    (directory / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges))
  config = json.loads((directory / "tokenizer_config.json").read_text())
  for key in ("tokenizer_class", "backend"):
    config.pop(key, None)
  (directory / "tokenizer_config.json").write_text(json.dumps(config))
  (directory / "tokenizer.json").unlink()


def assert_same_encoding(got, expected):
  """The same class, ids, masks and decoded text as transformers' tokenizer, on TEXTS."""
  assert type(got) is type(expected)
  for text in TEXTS:
    assert got(text)["input_ids"] == expected(text)["input_ids"]
  batch = dict(padding=True, truncation=True, max_length=12)
  assert got(TEXTS, **batch).data == expected(TEXTS, **batch).data
  ids = expected(TEXTS[0])["input_ids"]
  assert got.decode(ids, skip_special_tokens=True) == expected.decode(ids,
                                                                      skip_special_tokens=True)


@pytest.fixture
def old_rag_checkpoint(tmp_path):
  """A RagSequenceForGeneration saved by transformers, its tokenizers in the older layout."""
  _, path = ref.rag(tmp_path, "sequence", n_docs=2)
  q_tok, g_tok = ref.train_tokenizers(CORPUS, question_vocab=80, generator_vocab=64)
  transformers.RagTokenizer(question_encoder=q_tok, generator=g_tok).save_pretrained(path)
  for sub in ("question_encoder_tokenizer", "generator_tokenizer"):
    old_hub_layout(path / sub)
  return path


def test_rag_tokenizers_in_the_hubs_older_layout_load_as_transformers_loads_them(
    old_rag_checkpoint):
  """No tokenizer_class: each sub-tokenizer's class comes from the sub-model's config
  (transformers' RagTokenizer.from_pretrained), DPR's for the question encoder, BART's for the
  generator."""
  path = old_rag_checkpoint
  assert sorted(f.name for f in (path / "generator_tokenizer").iterdir()) == [
      "merges.txt", "tokenizer_config.json", "vocab.json"]
  expected = transformers.RagTokenizer.from_pretrained(str(path))
  got = load_tokenizer(path)
  assert isinstance(got, RagTokenizers)
  assert_same_encoding(got.question_encoder, expected.question_encoder)
  assert_same_encoding(got.generator, expected.generator)
  assert type(got.question_encoder).__name__ == "DPRQuestionEncoderTokenizer"


@pytest.mark.parametrize("kind", ["question", "context"])
def test_dpr_encoder_directory_in_the_hubs_older_layout_loads_as_transformers_loads_it(
    tmp_path, kind):
  """A DPR encoder with vocab.txt beside its config.json: AutoTokenizer's class for model
  type dpr."""
  _, path = ref.dpr(tmp_path, kind)
  ref.train_tokenizers(CORPUS)[0].save_pretrained(path)
  old_hub_layout(path)
  assert_same_encoding(load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(path))


def test_a_tokenizer_directory_without_its_vocabulary_is_named_in_one_line(old_rag_checkpoint,
                                                                           tmp_path, capsys):
  """A missing vocabulary file is named (transformers fails on a BPE without merges.txt, and
  builds a WordPiece without vocab.txt whose every word is unknown); the answer command prints
  one `error:` line."""
  path = old_rag_checkpoint
  merges = path / "generator_tokenizer" / "merges.txt"
  merges.unlink()
  with pytest.raises(ValueError):
    transformers.RagTokenizer.from_pretrained(str(path))
  with pytest.raises(CheckpointNotFoundError, match=rf"^{merges}: no such file \(a "
                     r"RobertaTokenizer reads tokenizer.json, or vocab.json and merges.txt\)$"):
    load_tokenizer(path)

  vocab = path / "question_encoder_tokenizer" / "vocab.txt"
  vocab.unlink()
  empty = transformers.AutoTokenizer.from_pretrained(
      str(vocab.parent), config=transformers.RagConfig.from_pretrained(path).question_encoder)
  assert len(empty) == 5  # the special tokens alone
  code = answer_command.main(["--checkpoint", str(path), "--index_dir", str(tmp_path / "kb"),
                              "who wrote it"], stdout=io.StringIO())
  assert code == 1
  assert capsys.readouterr().err == (f"error: {vocab}: no such file (a "
                                     "DPRQuestionEncoderTokenizer reads tokenizer.json, or "
                                     "vocab.txt)\n")

  # A tokenizer directory alone (search's --tokenizer) with no class named anywhere.
  alone = tmp_path / "tokenizer_only"
  alone.mkdir()
  shutil.copy(path / "generator_tokenizer" / "vocab.json", alone)
  with pytest.raises(CheckpointNotFoundError, match=rf"^{alone}: no tokenizer.json, and neither "
                     "a tokenizer_class"):
    load_tokenizer(alone)
  with pytest.raises((ValueError, OSError)):  # transformers cannot load it either
    transformers.AutoTokenizer.from_pretrained(str(alone))
