"""The data-parallel RAG train step: 8 devices equal 1 device, and its gradient is the gradient of
the mean loss computed without any sharding (an independent single-device computation)."""

import functools

import jax
import ml_collections
import numpy as np
import pytest

from rag_jax import losses
from rag_jax.models import presets
from rag_jax.models.rag import RagModel
from rag_jax.parallel import data_mesh, replicate
from rag_jax.training import optimizer
from rag_jax.training.rag_step import BatchShapeError, make_train_step
from rag_jax.training.state import create_train_state

B, N, LQ, L, T = 8, 3, 6, 10, 5
STEPS = 2  # Optimizer steps compared across device layouts.


def _model():
  cfg = presets.rag_config(
      "tiny", n_docs=N,
      question_encoder=dict(vocab_size=50, projection_dim=16, num_hidden_layers=1),
      generator=dict(vocab_size=60, dropout=0.1, encoder_layers=1, decoder_layers=1))
  return RagModel(cfg)


def _batch(seed=0, padding_rows=0):
  rng = np.random.default_rng(seed)
  labels = np.concatenate([np.zeros((B, 1)), rng.integers(3, 60, (B, T - 2)),
                           np.full((B, 1), 2)], axis=1).astype(np.int32)
  labels[1, 3:] = 1  # A padded target.
  ctx_mask = np.ones((B, N, L), np.int32)
  ctx_mask[:, :, -2:] = 0
  weights = np.ones(B, np.float32)
  if padding_rows:
    weights[-padding_rows:] = 0
  return {
      "input_ids": rng.integers(1, 50, (B, LQ)).astype(np.int32),
      "attention_mask": np.ones((B, LQ), np.int32),
      "context_input_ids": rng.integers(3, 60, (B, N, L)).astype(np.int32),
      "context_attention_mask": ctx_mask,
      "doc_embeds": rng.normal(size=(B, N, 16)).astype(np.float32),
      "labels": labels,
      "weights": weights,
  }


def _opt_config():
  # adam_eps 1e-4, not 1e-8: a first Adam step moves every parameter by about lr * sign(g), so
  # gradients that are 0 in exact arithmetic (rounding noise ~1e-9, e.g. attention key biases)
  # would move by +-lr depending on the summation order. With eps >> noise, the parameters after
  # the step compare the sharded and unsharded computations, not Adam's view of rounding noise.
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=0, num_train_steps=10, lr_end=0.0, lr_power=1.0,
      weight_decay=0.01, max_grad_norm=1.0, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-4))


GROUP_LEARNING_RATES = {"question_encoder": 1e-4}  # The question encoder's own peak rate.


def _state(model, mesh=None):
  """Initial state (replicated on `mesh` when given, as the trainers place it)."""
  batch = _batch()
  params = jax.jit(model.init)(
      jax.random.key(0), batch["context_input_ids"].reshape(B * N, L),
      batch["context_attention_mask"].reshape(B * N, L), batch["labels"],
      input_ids=batch["input_ids"], retrieved_doc_embeds=batch["doc_embeds"])["params"]
  tx = optimizer.make_optimizer(_opt_config(), params, group_learning_rates=GROUP_LEARNING_RATES)
  state = create_train_state(model.apply, params, tx, jax.random.key_data(jax.random.key(1)))
  return state if mesh is None else replicate(state, mesh)


LOSS = functools.partial(losses.rag_sequence_nll, epsilon=0.1, pad_token_id=1)


@pytest.mark.parametrize("loss_fn", [LOSS, functools.partial(losses.rag_token_nll, epsilon=0.1)])
def test_eight_devices_equal_one(loss_fn):
  assert jax.device_count() == 8
  model = _model()
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = data_mesh(devices)
    step = make_train_step(model, mesh, loss_fn, deterministic=True)
    state = _state(model, mesh)
    for i in range(STEPS):
      state, metrics = step(state, _batch(seed=i))
    results.append((jax.device_get(state.params), jax.device_get(metrics)))
  (p1, m1), (p8, m8) = results
  diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p1, p8)
  assert max(jax.tree.leaves(diff)) <= 1e-5
  for k in m1:
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5)
  assert m1["examples"] == B


def test_step_is_the_gradient_of_the_global_mean_loss():
  """Independent check: the sharded step's update equals optax applied to jax.grad of the
  plainly computed (unsharded) weighted mean loss; padding rows (weight 0) do not count."""
  model = _model()
  batch = _batch(seed=3, padding_rows=2)
  mesh = data_mesh()
  state = _state(model, mesh)
  step = make_train_step(model, mesh, LOSS, deterministic=True, donate=False)
  new_state, metrics = step(state, batch)

  def mean_loss(p):
    out = model.apply({"params": p}, batch["context_input_ids"].reshape(B * N, L),
                      batch["context_attention_mask"].reshape(B * N, L), batch["labels"],
                      input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      retrieved_doc_embeds=batch["doc_embeds"])
    per_example = LOSS(out.logits, out.doc_scores, batch["labels"])
    return (per_example * batch["weights"]).sum() / batch["weights"].sum(), per_example

  (_, per_example), grads = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))(state.params)
  expected = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, grads)
  diff = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), new_state.params, expected.params)
  assert max(jax.tree.leaves(diff)) <= 1e-5
  assert metrics["examples"] == B - 2
  np.testing.assert_allclose(metrics["loss_sum"], (per_example * batch["weights"]).sum(),
                             rtol=1e-5)
  # The question encoder was trained (through doc_scores) at its own learning rate; the frozen
  # final_logits_bias buffer was not.
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), new_state.params, state.params)
  assert max(jax.tree.leaves(moved["question_encoder"])) > 0
  assert moved["generator"]["final_logits_bias"] == 0


def test_dropout_keys_differ_per_step_and_device():
  model = _model()
  mesh = data_mesh()
  step = make_train_step(model, mesh, LOSS, deterministic=False, donate=False)
  state = _state(model, mesh)
  a, ma = step(state, _batch())
  b, mb = step(state.replace(step=state.step + 1), _batch())
  c, mc = step(state, _batch())
  assert float(ma["loss_sum"]) != float(mb["loss_sum"])  # fold_in(key, step)
  assert float(ma["loss_sum"]) == float(mc["loss_sum"])  # deterministic given the step


@pytest.mark.parametrize("key,shape,message", [
    ("doc_embeds", (B, N, 12), r"batch\['doc_embeds'\] has shape \(8, 3, 12\), expected "
                               r"\[B, n_docs, retrieval dim\] = \(8, 3, 16\)"),
    ("context_input_ids", (B, N + 1, L), r"batch\['context_input_ids'\] has shape \(8, 4, 10\)"),
    ("weights", (B, 2), r"batch\['weights'\] has shape \(8, 2\), expected \[B\] = \(8,\)"),
    ("context_attention_mask", (B, N, 600), r"context_attention_mask.*\(8, 3, 600\)"),
])
def test_a_batch_that_disagrees_with_the_config_is_named(key, shape, message):
  model = _model()
  step = make_train_step(model, data_mesh(), LOSS, donate=False)
  batch = _batch()
  batch[key] = np.zeros(shape, batch[key].dtype)
  with pytest.raises(BatchShapeError, match=message):
    step(_state(model), batch)


def test_lengths_past_the_position_table_are_refused():
  model = _model()
  step = make_train_step(model, data_mesh(), LOSS, donate=False)
  batch = _batch()
  length = model.config.generator.max_position_embeddings + 1
  for key in ("context_input_ids", "context_attention_mask"):
    batch[key] = np.ones((B, N, length), np.int32)
  with pytest.raises(BatchShapeError, match=r"context_input_ids'\] has length \d+ > max_position"):
    step(_state(model), batch)


def _buffers(tree) -> list[int]:
  return [leaf.addressable_shards[0].data.unsafe_buffer_pointer() for leaf in jax.tree.leaves(tree)]


@pytest.mark.parametrize("devices", [1, 8])
def test_the_first_step_reuses_the_replicated_state_buffers(devices):
  """The state as the trainers place it (`replicate`) is donated to the first step: the new
  parameters and moments are written into the old state's buffers. A state the step cannot
  donate makes it allocate a second one silently (on the CPU backend, arrays rebuilt from numpy
  views of jax arrays wrap the views' memory and cannot be donated): two states at the first
  step's peak."""
  model = _model()
  mesh = data_mesh(jax.devices()[:devices])
  state = _state(model, mesh)
  before = set(_buffers((state.params, state.opt_state)))
  new_state, _ = make_train_step(model, mesh, LOSS)(state, _batch())
  after = _buffers((new_state.params, new_state.opt_state))
  reused = sum(a in before for a in after)
  assert reused == len(after), f"{len(after) - reused} of {len(after)} arrays newly allocated"
