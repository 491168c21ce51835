"""The reference fine-tuning recipe as an optax transformation.

transformers' research example (finetune_rag.py / finetune_rag.sh) trains with AdamW, a linear
warm-up then polynomial decay (power 1, to lr_end 1e-7), gradient clipping by global norm and
weight decay on every parameter whose transformers name contains neither "bias" nor
"LayerNorm.weight". Our parameter names mirror transformers' (see rag_jax/checkpoints.py), so the
same rule reads: no decay for any path containing "bias" (biases and BART's final_logits_bias)
or a `LayerNorm/scale` (BERT's LayerNorms). BART's `*_layer_norm` scales ARE decayed, exactly as
in the reference. `final_logits_bias` is a buffer in transformers (never trained): it is frozen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.traverse_util
import jax
import ml_collections
import optax


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int,
                           end_value: float = 1e-7, power: float = 1.0) -> optax.Schedule:
  """transformers' get_polynomial_decay_schedule_with_warmup as an optax schedule."""
  decay_steps = max(1, total_steps - warmup_steps)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, max(1, warmup_steps)),
       optax.polynomial_schedule(peak, end_value, power, decay_steps)],
      boundaries=[warmup_steps])


def _path_name(path: tuple[str, ...]) -> str:
  return "/".join(path)


def weight_decay_mask(params: Any) -> Any:
  """True where weight decay applies (the reference's name rule, see the module docstring)."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({
      path: not ("bias" in _path_name(path) or _path_name(path).endswith("LayerNorm/scale"))
      for path in flat})


def is_frozen(path: tuple[str, ...]) -> bool:
  """Parameters the reference never trains: BART's final_logits_bias buffer."""
  return path[-1] == "final_logits_bias"


def make_optimizer(config: ml_collections.ConfigDict, params: Any,
                   frozen: Callable[[tuple[str, ...]], bool] = is_frozen,
                   group_learning_rates: Mapping[str, float] | None = None,
                   frozen_groups: Iterable[str] = ()) -> optax.GradientTransformation:
  """AdamW + warm-up/polynomial decay + global-norm clipping, frozen leaves held at zero update.

  Config fields (every trainer's, config_check.TRAINING): learning_rate, warmup_steps,
  num_train_steps, lr_end, lr_power, weight_decay, max_grad_norm (0 disables clipping), adam_b1,
  adam_b2, adam_eps. The RAG trainer's own fields come as arguments: group_learning_rates,
  {top-level parameter name: peak learning rate} (e.g. a smaller rate for RAG's
  "question_encoder" than for its "generator", configs/default.py), and frozen_groups, top-level
  parameter names whose every leaf gets no update at all (RAG's "question_encoder": the paper's
  "-Frozen" rows). `frozen(path) -> bool` picks further parameters that get no update at all.
  A frozen parameter's update is exactly zero (optax.set_to_zero, no weight decay), so it stays
  bit-identical; its gradient is zeroed before clipping.
  Clipping acts on the global norm of all trained gradients together, as in the reference.
  """

  def adamw(peak: float) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(peak, config.warmup_steps, config.num_train_steps,
                                      config.lr_end, config.lr_power)
    return optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                       weight_decay=config.weight_decay, mask=weight_decay_mask)

  groups = dict(group_learning_rates or {})
  frozen_groups = set(frozen_groups)
  flat = flax.traverse_util.flatten_dict(params)
  top = sorted({path[0] for path in flat})
  for field, names in (("group_learning_rates", groups), ("frozen_groups", frozen_groups)):
    if unknown := sorted(set(names) - set(top)):
      raise ValueError(f"{field} names {unknown}, not top-level parameters {top}")

  def label(path: tuple[str, ...]) -> str:
    if frozen(path) or path[0] in frozen_groups:
      return "frozen"
    return path[0] if path[0] in groups else "default"

  labels = flax.traverse_util.unflatten_dict({path: label(path) for path in flat})
  transforms = {"frozen": optax.set_to_zero(), "default": adamw(config.learning_rate)}
  transforms.update({name: adamw(lr) for name, lr in groups.items()})
  clip = [optax.clip_by_global_norm(config.max_grad_norm)] if config.max_grad_norm else []
  # Frozen gradients are zeroed before clipping, so they do not count in the global norm (the
  # reference's buffers have no gradient at all).
  frozen_mask = jax.tree.map(lambda name: name == "frozen", labels)
  return optax.chain(optax.masked(optax.set_to_zero(), frozen_mask), *clip,
                     optax.multi_transform(transforms, labels))


def count_params(params: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
