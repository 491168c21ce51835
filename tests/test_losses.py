"""RAG-Sequence / RAG-Token losses against transformers' own `get_nll` (values and gradients),
and end-to-end gradients through the whole RAG model against torch autograd."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rag_jax import losses
from rag_jax.checkpoints import load_pretrained, to_hf_state_dict
from tests import torch_reference as ref

B, N, T, V = 3, 4, 7, 64
PAD, BOS, EOS, START = 1, 0, 2, 2


def _targets(style: str, rng: np.random.Generator) -> np.ndarray:
  """Padded targets. 'train': <s> answer </s> as finetune_rag feeds them (the shifted target
  starts with an answer token, so BOS exclusion never applies); 'generated': </s> <s> answer
  </s> as generate()'s candidates (shifted target starts with BOS)."""
  head = [BOS] if style == "train" else [START, BOS]
  rows = []
  for length in (4, 2, 1):  # Answer lengths; the shorter rows end in padding.
    row = head + list(rng.integers(3, V, length)) + [EOS]
    rows.append(row + [PAD] * (T - len(row)))
  return np.array(rows, np.int64)


@pytest.fixture(scope="module")
def torch_rag(tmp_path_factory):
  seq, _ = ref.rag(tmp_path_factory.mktemp("seq"), "sequence", n_docs=N)
  tok, _ = ref.rag(tmp_path_factory.mktemp("tok"), "token", n_docs=N)
  return {"sequence": seq, "token": tok}


def _reference(model, kind, logits, scores, target, **kw):
  """transformers' get_nll with autograd: (loss, d loss.sum() / d logits, / d doc_scores)."""
  tl = torch.tensor(logits, requires_grad=True)
  ts = torch.tensor(scores, requires_grad=True)
  loss = model.get_nll(tl, ts, torch.tensor(target), n_docs=N, **kw)
  loss.sum().backward()
  return loss.detach().numpy(), tl.grad.numpy(), ts.grad.numpy()


def _ours(fn, logits, scores, target, **kw):
  loss = fn(jnp.asarray(logits), jnp.asarray(scores), jnp.asarray(target), **kw)
  grads = jax.grad(lambda lg, s: fn(lg, s, jnp.asarray(target), **kw).sum(), argnums=(0, 1))(
      jnp.asarray(logits), jnp.asarray(scores))
  return np.asarray(loss), *(np.asarray(g) for g in grads)


def _random(seed):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(B * N, T, V)).astype(np.float32) * 3,
          rng.normal(size=(B, N)).astype(np.float32) * 2, rng)


def _assert_close(ours, theirs):
  loss, g_logits, g_scores = ours
  ref_loss, ref_g_logits, ref_g_scores = theirs
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6, atol=1e-5)
  for g, r in ((g_logits, ref_g_logits), (g_scores, ref_g_scores)):
    assert np.abs(g - r).max() <= 1e-4 * max(np.abs(r).max(), 1e-6)


@pytest.mark.parametrize("style,epsilon,exclude_bos,reduce", list(itertools.product(
    ["train", "generated"], [0.0, 0.1], [False, True], [False, True])))
def test_rag_sequence_nll_matches_get_nll(torch_rag, style, epsilon, exclude_bos, reduce):
  logits, scores, rng = _random(0)
  target = _targets(style, rng)
  theirs = _reference(torch_rag["sequence"], "sequence", logits, scores, target, epsilon=epsilon,
                      exclude_bos_score=exclude_bos, reduce_loss=reduce)
  ours = _ours(losses.rag_sequence_nll, logits, scores, target, epsilon=epsilon,
               exclude_bos_score=exclude_bos, reduce_loss=reduce, pad_token_id=PAD,
               bos_token_id=BOS)
  _assert_close(ours, theirs)


def test_per_row_bos_flag_equals_get_nll_on_each_batch(torch_rag):
  """Rows of two reference batches scored in one call: 'generated' rows (BOS after the start
  token, excluded) and 'train' rows (not excluded); use_bos carries each batch's own flag."""
  logits, scores, rng = _random(1)
  generated, train = _targets("generated", rng), _targets("train", rng)
  mixed = np.concatenate([generated[:2], train[:1]])  # [B, T]: batch 1, batch 1, batch 2
  theirs = np.concatenate([
      _reference(torch_rag["sequence"], "sequence", logits[rows], scores[batch], target,
                 epsilon=0.1, exclude_bos_score=True)[0]
      for rows, batch, target in ((slice(0, 2 * N), slice(0, 2), mixed[:2]),
                                  (slice(2 * N, 3 * N), slice(2, 3), mixed[2:]))])
  ours = losses.rag_sequence_nll(
      jnp.asarray(logits), jnp.asarray(scores), jnp.asarray(mixed), epsilon=0.1,
      exclude_bos_score=True, pad_token_id=PAD, bos_token_id=BOS,
      use_bos=jnp.array([True, True, False]))
  np.testing.assert_allclose(np.asarray(ours), theirs, rtol=1e-6, atol=1e-5)
  # The batch-wide rule differs here (one row without BOS turns it off for all three).
  batch_wide = losses.rag_sequence_nll(
      jnp.asarray(logits), jnp.asarray(scores), jnp.asarray(mixed), epsilon=0.1,
      exclude_bos_score=True, pad_token_id=PAD, bos_token_id=BOS)
  assert np.abs(np.asarray(batch_wide)[:2] - theirs[:2]).max() > 1e-2
  with pytest.raises(ValueError, match=r"use_bos has shape \(2,\); expected \(3,\)"):
    losses.rag_sequence_nll(jnp.asarray(logits), jnp.asarray(scores), jnp.asarray(mixed),
                            exclude_bos_score=True, use_bos=jnp.array([True, False]))


@pytest.mark.parametrize("style,epsilon,reduce", list(itertools.product(
    ["train", "generated"], [0.0, 0.1], [False, True])))
def test_rag_token_nll_matches_get_nll(torch_rag, style, epsilon, reduce):
  logits, scores, rng = _random(1)
  target = _targets(style, rng)
  theirs = _reference(torch_rag["token"], "token", logits, scores, target, epsilon=epsilon,
                      reduce_loss=reduce)
  ours = _ours(losses.rag_token_nll, logits, scores, target, epsilon=epsilon, reduce_loss=reduce,
               pad_token_id=PAD)
  _assert_close(ours, theirs)


def test_marginalize_matches_transformers(torch_rag):
  logits, scores, _ = _random(2)
  expected = torch_rag["token"].marginalize(torch.tensor(logits), torch.tensor(scores), N)
  np.testing.assert_allclose(losses.marginalize(jnp.asarray(logits), jnp.asarray(scores)),
                             expected.numpy(), atol=1e-5, rtol=0)


def test_rag_sequence_equals_brute_force_marginal_likelihood():
  """Independent check of the formula: -log sum_j p(z_j) prod_t p(y_t | z_j) by enumeration."""
  logits, scores, rng = _random(3)
  target = _targets("train", rng)
  tgt = np.concatenate([target[:, 1:], np.full((B, 1), PAD)], 1)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  prior = scores - np.log(np.exp(scores).sum(1, keepdims=True))
  expected = []
  for b in range(B):
    per_doc = [prior[b, j] + sum(logp[b * N + j, t, tgt[b, t]] for t in range(T)
                                 if tgt[b, t] != PAD) for j in range(N)]
    expected.append(-np.log(np.exp(per_doc).sum()))
  got = losses.rag_sequence_nll(jnp.asarray(logits), jnp.asarray(scores), jnp.asarray(target))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sequence", "token"])
@pytest.mark.parametrize("precision", ["float32", "float64"])
def test_end_to_end_gradients_match_torch_autograd(tmp_path, kind, precision):
  """Loss and gradients w.r.t. the parameters and the doc scores, against transformers'
  forward(labels=...) + backward, doc_scores = q . d computed from the question encoder.

  float32: generator parameters and doc scores within 1e-4 relative (the question encoder's
  gradient is a sum over docs of d(loss)/d(score_j) * d_j whose terms cancel, since the scores
  enter through a softmax, so its fp32 rounding is amplified); float64: every parameter, the
  question encoder included, within 1e-6.
  """
  with jax.enable_x64(precision == "float64"):
    _end_to_end(tmp_path, kind, precision)


def _end_to_end(tmp_path, kind, precision):
  dtype = {"float32": jnp.float32, "float64": jnp.float64}[precision]
  torch_model, path = ref.rag(tmp_path, kind, n_docs=3, projection_dim=8, init_std=0.2)
  model, params = load_pretrained(path, dtype=dtype, param_dtype=dtype)
  if precision == "float64":
    torch_model = torch_model.double()
  np_dtype = np.dtype(precision)
  rng = np.random.default_rng(4)
  q_ids, q_mask = ref.padded_batch(rng, 2, 7, 80, pad=0, right={1: 2})
  ctx, ctx_mask = ref.padded_batch(rng, 6, 12, 64, pad=1, right={0: 3, 4: 5})
  labels = np.array([[0, 5, 9, 12, 2, 1], [0, 7, 2, 1, 1, 1]])
  embeds = rng.normal(size=(2, 3, 8)).astype(np_dtype)
  kw = dict(epsilon=0.1, reduce_loss=True, pad_token_id=1)

  # transformers: doc_scores from the question encoder, passed in with the contexts.
  torch_model.config.label_smoothing = 0.1
  q = torch_model.question_encoder(ref.to_torch(q_ids), ref.to_torch(q_mask))[0]
  t_scores = torch.bmm(q[:, None, :], ref.to_torch(embeds).transpose(1, 2))[:, 0]
  t_scores.retain_grad()
  out = torch_model(context_input_ids=ref.to_torch(ctx),
                    context_attention_mask=ref.to_torch(ctx_mask), doc_scores=t_scores,
                    decoder_input_ids=ref.to_torch(labels), labels=ref.to_torch(labels),
                    reduce_loss=True, n_docs=3)
  out.loss.backward()

  fn = losses.rag_sequence_nll if kind == "sequence" else losses.rag_token_nll

  def loss_fn(p):
    o = model.apply({"params": p}, ctx, ctx_mask, labels, input_ids=q_ids, attention_mask=q_mask,
                    retrieved_doc_embeds=embeds)
    return fn(o.logits, o.doc_scores, jnp.asarray(labels), **kw), o.doc_scores

  (loss, scores), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  tol = 1e-4 if precision == "float32" else 1e-6
  np.testing.assert_allclose(loss, out.loss.item(), rtol=tol)
  np.testing.assert_allclose(scores, t_scores.detach().numpy(), rtol=tol, atol=tol)
  g_scores = jax.jit(jax.grad(lambda s: fn(
      model.apply({"params": params}, ctx, ctx_mask, labels, doc_scores=s).logits, s,
      jnp.asarray(labels), **kw)))(scores)
  ref_g = t_scores.grad.numpy()
  assert np.abs(g_scores - ref_g).max() <= tol * np.abs(ref_g).max()

  ours = {k: v.astype(np.float64) for k, v in _hf_grads(model, grads).items()}
  theirs = {k: p.grad.double().numpy() for k, p in torch_model.named_parameters()
            if p.grad is not None}
  assert set(theirs) <= set(ours)
  checked = {k: g for k, g in theirs.items()
             if precision == "float64" or not k.startswith("rag.question_encoder")}
  assert any(k.startswith("rag.generator") for k in checked)
  assert precision == "float32" or any(k.startswith("rag.question_encoder") for k in checked)
  # Each tensor relative to its largest gradient; tensors whose gradient is zero in exact
  # arithmetic (attention key biases: softmax is shift-invariant) hold rounding noise only, so
  # the scale is floored at 1e-3 of the largest gradient in the model.
  floor = 1e-3 * max(np.abs(g).max() for g in checked.values())
  for name, g in checked.items():
    scale = max(np.abs(g).max(), floor)
    assert np.abs(ours[name] - g).max() <= tol * scale, name


def _hf_grads(model, grads):
  """Our gradient pytree under transformers' names (same layout as the parameters)."""
  return to_hf_state_dict(model, grads, dtype=np.float64)


def test_logsumexp_over_docs_equals_float64_logsumexp():
  """The unrolled passage logsumexp against numpy in float64, with a column whose passages are
  all -inf (probability 0 everywhere) and a +inf one; its gradient is the passage posterior."""
  rng = np.random.default_rng(2)
  x = (rng.normal(size=(3, 5, 4, 7)) * 30).astype(np.float32)
  x[0, :, 0, 0] = -np.inf
  x[1, 2, 1, 3] = np.inf
  got = np.asarray(losses.logsumexp_over_docs(jnp.asarray(x)))
  x64 = x.astype(np.float64)
  top = np.max(x64, axis=1, keepdims=True)
  top = np.where(np.isfinite(top), top, 0.0)
  with np.errstate(divide="ignore"):  # log(0) = -inf is the expected value there
    want = np.log(np.sum(np.exp(x64 - top), axis=1)) + top[:, 0]
  assert got[0, 0, 0] == -np.inf and got[1, 1, 3] == np.inf
  finite = np.isfinite(want)
  np.testing.assert_allclose(got[finite], want[finite], rtol=1e-6, atol=1e-5)
  y = jnp.asarray(np.where(np.isfinite(x), x, 0.0))
  grad = np.asarray(jax.grad(lambda v: losses.logsumexp_over_docs(v).sum())(y))
  y64 = np.asarray(y, np.float64)
  posterior = np.exp(y64 - np.log(np.sum(np.exp(y64 - y64.max(1, keepdims=True)), 1,
                                         keepdims=True)) - y64.max(1, keepdims=True))
  np.testing.assert_allclose(grad, posterior, rtol=1e-5, atol=1e-6)
