"""The optimizer recipe against the reference's own: torch AdamW with finetune_rag's weight-decay
groups, transformers' get_polynomial_decay_schedule_with_warmup and clip_grad_norm_, fed the same
gradients for several steps."""

import jax
import ml_collections
import numpy as np
import optax
import torch
import transformers

from rag_jax.checkpoints import load_pretrained, to_hf_state_dict
from rag_jax.training import optimizer
from tests import torch_reference as ref


def _config():
  return ml_collections.ConfigDict(dict(
      learning_rate=3e-3, warmup_steps=2, num_train_steps=6, lr_end=1e-7, lr_power=1.0,
      weight_decay=0.1, max_grad_norm=0.1, adam_b1=0.9, adam_b2=0.999, adam_eps=1e-8))


def test_schedule_matches_transformers():
  schedule = optimizer.learning_rate_schedule(2e-3, 3, 10, end_value=1e-7, power=2.0)
  opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
  sched = transformers.get_polynomial_decay_schedule_with_warmup(opt, 3, 10, lr_end=1e-7,
                                                                 power=2.0)
  for step in range(13):
    np.testing.assert_allclose(float(schedule(step)), sched.get_last_lr()[0], rtol=1e-6,
                               atol=1e-12)
    opt.step()
    sched.step()


def test_adamw_recipe_matches_torch(tmp_path):
  torch_model, path = ref.rag(tmp_path, "sequence", n_docs=2)
  model, params = load_pretrained(path)
  trained = _compare_with_torch(model, params, dict(torch_model.named_parameters()), {})
  # The buffer transformers never trains stayed where it was.
  np.testing.assert_array_equal(trained["rag.generator.final_logits_bias"],
                                torch_model.rag.generator.final_logits_bias.numpy())


def test_context_encoder_group_matches_torch(tmp_path):
  """A trained context encoder (params["ctx_encoder"]) at its own peak rate, the question
  encoder at another: torch AdamW with one parameter group per (module, decay), clipped
  together."""
  torch_model, path = ref.rag(tmp_path, "sequence", n_docs=2)
  torch_ctx, ctx_path = ref.dpr(tmp_path, "context", seed=1)
  model, params = load_pretrained(path)
  ctx_model, ctx_params = load_pretrained(ctx_path)
  named = dict(torch_model.named_parameters())
  named.update({f"rag.{k}": p for k, p in torch_ctx.named_parameters()})
  rates = {"question_encoder": 1e-3, "ctx_encoder": 5e-4}
  _compare_with_torch(model, {**params, "ctx_encoder": ctx_params}, named, rates, ctx_model)


def _compare_with_torch(model, params, named, rates, ctx_model=None):
  """Several steps of our recipe and of finetune_rag's torch AdamW on the same gradients; returns
  our trained parameters under transformers' names."""
  config = _config()
  tx = optimizer.make_optimizer(config, params, group_learning_rates=rates)
  opt_state = jax.jit(tx.init)(params)

  def hf(tree):
    out = to_hf_state_dict(model, {k: v for k, v in tree.items() if k != "ctx_encoder"})
    if ctx_model is not None:
      ctx = to_hf_state_dict(ctx_model, tree["ctx_encoder"])
      out.update({f"rag.{k}": v for k, v in ctx.items()})
    return out

  @jax.jit
  def update(grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  # finetune_rag.py's groups: no decay for names containing "bias" or "LayerNorm.weight"; a
  # module with its own rate gets its own pair of groups.
  no_decay = ("bias", "LayerNorm.weight")
  prefixes = {"question_encoder": "rag.question_encoder.", "ctx_encoder": "rag.ctx_encoder."}

  def rate(name):
    return next((lr for group, lr in rates.items() if name.startswith(prefixes[group])),
                config.learning_rate)

  groups = [{"params": [p for n, p in named.items() if rate(n) == lr
                        and any(nd in n for nd in no_decay) == skip],
             "lr": lr, "weight_decay": 0.0 if skip else config.weight_decay}
            for lr in {config.learning_rate, *rates.values()} for skip in (False, True)]
  torch_opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate,
                                eps=config.adam_eps, betas=(config.adam_b1, config.adam_b2))
  sched = transformers.get_polynomial_decay_schedule_with_warmup(
      torch_opt, config.warmup_steps, config.num_train_steps, lr_end=config.lr_end,
      power=config.lr_power)

  rng = np.random.default_rng(0)
  for _ in range(config.num_train_steps):
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32) * 0.01, params)
    hf_grads = hf(grads)
    for name, p in named.items():
      p.grad = torch.from_numpy(hf_grads[name].copy())
    torch.nn.utils.clip_grad_norm_(list(named.values()), config.max_grad_norm)
    torch_opt.step()
    sched.step()
    params, opt_state = update(grads, opt_state, params)

  ours = hf(params)
  for name, p in named.items():
    np.testing.assert_allclose(ours[name], p.detach().numpy(), atol=2e-6, rtol=1e-5,
                               err_msg=name)
  return ours


def test_weight_decay_mask_follows_the_reference_name_rule(tmp_path):
  _, path = ref.rag(tmp_path, "sequence", n_docs=2)
  model, params = load_pretrained(path)
  full = jax.tree.map(lambda m, p: np.full(p.shape, m, np.float32),
                      optimizer.weight_decay_mask(params), params)
  mask = {name: bool(v.flat[0]) for name, v in to_hf_state_dict(model, full).items()}
  for name, decayed in mask.items():
    expected = not ("bias" in name or "LayerNorm.weight" in name)
    assert decayed == expected, name
  # BART's own layer norms are decayed (their names contain no "LayerNorm"), BERT's are not.
  assert mask["rag.generator.model.encoder.layers.0.self_attn_layer_norm.weight"]
  assert not mask["rag.question_encoder.question_encoder.bert_model.embeddings.LayerNorm.weight"]
