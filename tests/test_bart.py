"""BART parity with transformers' BartForConditionalGeneration (the reference oracle)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from rag_jax.checkpoints import load_pretrained, save_pretrained
from rag_jax.decoding.bart import expand_self_attention
from tests import torch_reference as ref

TOL = 1e-5


def _inputs(vocab: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  # Encoder rows: left-padded, right-padded, full. Decoder rows: one right-padded.
  ids, mask = ref.padded_batch(rng, 3, 11, vocab, pad=1, left={0: 3}, right={1: 4})
  dec, dec_mask = ref.padded_batch(rng, 3, 8, vocab, pad=1, right={2: 3})
  return ids, mask, dec, dec_mask


def _torch_forward(model, ids, mask, dec, dec_mask):
  with torch.no_grad():
    return model(input_ids=ref.to_torch(ids), attention_mask=ref.to_torch(mask),
                 decoder_input_ids=ref.to_torch(dec),
                 decoder_attention_mask=ref.to_torch(dec_mask))


@pytest.mark.parametrize("name", sorted(ref.BART_CONFIGS))
def test_encoder_states_and_logits_match_transformers(tmp_path, name):
  torch_model, path = ref.bart(tmp_path, name)
  model, params = load_pretrained(path)
  ids, mask, dec, dec_mask = _inputs(model.config.vocab_size)
  expected = _torch_forward(torch_model, ids, mask, dec, dec_mask)
  out = jax.jit(model.apply)({"params": params}, input_ids=ids, attention_mask=mask,
                             decoder_input_ids=dec, decoder_attention_mask=dec_mask)
  np.testing.assert_allclose(out.encoder_last_hidden_state,
                             expected.encoder_last_hidden_state.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(out.logits, expected.logits.numpy(), atol=TOL, rtol=0)
  assert out.logits.dtype == jnp.float32


def test_left_padded_decoder_matches_on_real_positions(tmp_path):
  torch_model, path = ref.bart(tmp_path)
  model, params = load_pretrained(path)
  rng = np.random.default_rng(1)
  ids, mask = ref.padded_batch(rng, 2, 9, 64, pad=1)
  dec, dec_mask = ref.padded_batch(rng, 2, 7, 64, pad=1, left={1: 2})
  expected = _torch_forward(torch_model, ids, mask, dec, dec_mask).logits.numpy()
  got = np.asarray(model.apply({"params": params}, input_ids=ids, attention_mask=mask,
                               decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits)
  real = dec_mask.astype(bool)
  np.testing.assert_allclose(got[real], expected[real], atol=TOL, rtol=0)


def test_default_decoder_inputs_are_shifted_input_ids(tmp_path):
  torch_model, path = ref.bart(tmp_path)
  model, params = load_pretrained(path)
  ids, _ = ref.padded_batch(np.random.default_rng(2), 2, 6, 64, pad=1)
  with torch.no_grad():
    expected = torch_model(input_ids=ref.to_torch(ids)).logits.numpy()
  got = model.apply({"params": params}, input_ids=ids).logits
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)


def _step_by_step_logits(model, params, ids, mask, dec, prefill: int):
  """Encode once, init the cache, feed `prefill` tokens at once, then one token per step."""
  enc = model.apply({"params": params}, ids, mask, method=model.encode)
  _, cache = model.apply({"params": params}, enc, dec.shape[1], method=model.init_cache,
                         mutable=["cache"])
  step = jax.jit(lambda cache, tok: model.apply(
      {"params": params, **cache}, tok, None, mask, decode=True, method=model.decode,
      mutable=["cache"]))
  chunks = [dec[:, :prefill]] + [dec[:, t:t + 1] for t in range(prefill, dec.shape[1])]
  logits = []
  for tok in chunks:
    out, cache = step(cache, jnp.asarray(tok))
    logits.append(out)
  return jnp.concatenate(logits, axis=1), cache


@pytest.mark.parametrize("prefill", [1, 3])
def test_cached_decoding_equals_teacher_forcing(tmp_path, prefill):
  torch_model, path = ref.bart(tmp_path, "plain_untied")
  model, params = load_pretrained(path)
  rng = np.random.default_rng(3)
  ids, mask = ref.padded_batch(rng, 3, 10, model.config.vocab_size, pad=1, left={0: 2},
                               right={2: 5})
  dec = rng.integers(3, model.config.vocab_size, (3, 7))
  dec[:, 0] = model.config.decoder_start_token_id
  with torch.no_grad():
    expected = torch_model(input_ids=ref.to_torch(ids), attention_mask=ref.to_torch(mask),
                           decoder_input_ids=ref.to_torch(dec)).logits.numpy()
  got, cache = _step_by_step_logits(model, params, ids, mask, dec, prefill)
  np.testing.assert_allclose(got, expected, atol=TOL, rtol=0)
  assert int(cache["cache"]["decoder"]["cache_index"]) == dec.shape[1]
  # The cross-attention K/V were projected once, at init_cache: keys [B, H, Dh, S].
  cross = cache["cache"]["decoder"]["layers_0"]["encoder_attn"]["cross_key"]
  assert cross.shape == (3, 2, 16, 10)


# (outer A, shared by G, inner C): decoder row (a*G + g)*C + c reads encoder row a*C + c.
# Beam search (C = 1), RAG-Token's beams x passages (C = n), RAG-Sequence rescoring (A = 1).
SHARED_LAYOUTS = [(3, 2, 1), (1, 4, 3), (2, 2, 2)]


def _encoder_row_of_each_decoder_row(outer: int, group: int, inner: int) -> np.ndarray:
  return np.array([a * inner + c for a in range(outer) for _ in range(group)
                   for c in range(inner)])


@pytest.mark.parametrize("outer,group,inner", SHARED_LAYOUTS)
def test_decoder_rows_sharing_encoder_rows_match_repeated_rows(tmp_path, outer, group, inner):
  """Shared encoder rows (teacher forcing and the cached step) give transformers' logits with
  each decoder row's encoder input written out."""
  torch_model, path = ref.bart(tmp_path, "plain_untied")
  model, params = load_pretrained(path)
  rng = np.random.default_rng(4)
  shared = outer * inner
  ids, mask = ref.padded_batch(rng, shared, 9, model.config.vocab_size, pad=1,
                               right={0: 3, shared - 1: 2})
  rows = _encoder_row_of_each_decoder_row(outer, group, inner)
  dec = rng.integers(3, model.config.vocab_size, (len(rows), 5))
  dec[:, 0] = model.config.decoder_start_token_id
  with torch.no_grad():
    expected = torch_model(input_ids=ref.to_torch(ids[rows]),
                           attention_mask=ref.to_torch(mask[rows]),
                           decoder_input_ids=ref.to_torch(dec)).logits.numpy()
  enc = model.apply({"params": params}, ids, mask, method=model.encode)  # [E, S, d]
  forced = model.apply({"params": params}, dec, enc, mask, method=model.decode,
                       cross_inner_rows=inner)
  np.testing.assert_allclose(forced, expected, atol=TOL, rtol=0)
  # Cached: the cross K/V keep E rows, the self-attention buffers are expanded to the B rows.
  _, cache = model.apply({"params": params}, enc, dec.shape[1], method=model.init_cache,
                         mutable=["cache"])
  cache = expand_self_attention(cache, lambda x: x[rows])
  logits = []
  for t in range(dec.shape[1]):
    out, cache = model.apply({"params": params, **cache}, dec[:, t:t + 1], None, mask,
                             decode=True, method=model.decode, mutable=["cache"],
                             cross_inner_rows=inner)
    logits.append(out)
  np.testing.assert_allclose(jnp.concatenate(logits, axis=1), expected, atol=TOL, rtol=0)
  assert cache["cache"]["decoder"]["layers_0"]["encoder_attn"]["cross_key"].shape[0] == shared


def test_decoder_rows_that_cannot_share_encoder_rows_are_an_error(tmp_path):
  _, path = ref.bart(tmp_path)
  model, params = load_pretrained(path)
  enc = jnp.zeros((2, 4, model.config.d_model))
  with pytest.raises(ValueError, match="cannot serve 3 decoder rows"):
    model.apply({"params": params}, jnp.zeros((3, 2), jnp.int32), enc, method=model.decode)
  with pytest.raises(ValueError, match="encoder_attention_mask has 4 rows"):  # one per decoder row
    model.apply({"params": params}, jnp.zeros((4, 2), jnp.int32), enc, jnp.ones((4, 4)),
                method=model.decode)


def test_decode_without_cache_is_an_error(tmp_path):
  _, path = ref.bart(tmp_path)
  model, params = load_pretrained(path)
  with pytest.raises(Exception, match="init_cache"):
    model.apply({"params": params}, jnp.zeros((1, 1), jnp.int32), None, None, decode=True,
                method=model.decode, mutable=["cache"])


@pytest.mark.parametrize("shard_bytes", [None, 20_000])
def test_export_round_trip_through_transformers(tmp_path, shard_bytes):
  torch_model, path = ref.bart(tmp_path, "plain_untied")
  model, params = load_pretrained(path)
  out_dir = save_pretrained(model, params, tmp_path / "export", max_shard_bytes=shard_bytes)
  if shard_bytes:
    assert (out_dir / "model.safetensors.index.json").is_file()
  reloaded = transformers.BartForConditionalGeneration.from_pretrained(out_dir).eval()
  ids, mask, dec, dec_mask = _inputs(model.config.vocab_size, seed=4)
  np.testing.assert_array_equal(_torch_forward(reloaded, ids, mask, dec, dec_mask).logits,
                                _torch_forward(torch_model, ids, mask, dec, dec_mask).logits)
  model2, params2 = load_pretrained(out_dir)
  assert model2.config == model.config
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_transformers_sharded_and_torch_bin_checkpoints_load(tmp_path):
  torch_model, path = ref.bart(tmp_path)
  sharded = tmp_path / "sharded"
  torch_model.save_pretrained(sharded, max_shard_size="20KB")
  assert (sharded / "model.safetensors.index.json").is_file()
  binary = tmp_path / "bin"
  binary.mkdir()
  (binary / "config.json").write_text((path / "config.json").read_text())
  torch.save(torch_model.state_dict(), binary / "pytorch_model.bin")
  model, params = load_pretrained(path)
  for other in (sharded, binary):
    _, other_params = load_pretrained(other)
    jax.tree.map(np.testing.assert_array_equal, other_params, params)


def test_bf16_compute_stays_close_to_fp32(tmp_path):
  """bf16 matmuls (fp32 params, softmax, logits): max |diff| <= 5% of the logits' spread."""
  _, path = ref.bart(tmp_path)
  model32, params = load_pretrained(path)
  model16, params16 = load_pretrained(path, dtype=jnp.bfloat16)
  assert params16["shared"]["embedding"].dtype == jnp.float32
  ids, mask, dec, dec_mask = _inputs(model32.config.vocab_size, seed=5)
  kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
            decoder_attention_mask=dec_mask)
  l32 = np.asarray(model32.apply({"params": params}, **kw).logits)
  l16 = model16.apply({"params": params16}, **kw).logits
  assert l16.dtype == jnp.float32
  assert np.abs(np.asarray(l16) - l32).max() <= 0.05 * l32.std()
  # And the argmax token agrees almost everywhere.
  assert (np.asarray(l16).argmax(-1) == l32.argmax(-1)).mean() >= 0.95


def test_dropout_is_active_only_when_not_deterministic(tmp_path):
  _, path = ref.bart(tmp_path, dropout=0.3)
  model, params = load_pretrained(path)
  ids, mask, dec, dec_mask = _inputs(model.config.vocab_size)
  kw = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
  det = model.apply({"params": params}, **kw).logits
  a = model.apply({"params": params}, **kw, deterministic=False,
                  rngs={"dropout": jax.random.key(0)}).logits
  b = model.apply({"params": params}, **kw, deterministic=False,
                  rngs={"dropout": jax.random.key(1)}).logits
  assert not np.allclose(a, det) and not np.allclose(a, b)
