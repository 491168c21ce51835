"""Nested RAG checkpoints: the question encoder and generator inside a saved transformers
RagSequenceForGeneration / RagTokenForGeneration load and match, and export back."""

import jax
import numpy as np
import pytest
import torch
import transformers

from rag_jax.checkpoints import load_pretrained, save_pretrained
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
  from rag_jax.checkpoints import RagTokenizers, load_tokenizer

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
