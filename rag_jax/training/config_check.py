"""Config validation, one place for every trainer: each field a trainer reads is checked against
its allowed range before the workdir is touched, so a refused config never reaches the workdir's
config.json (which would lock a corrected rerun out) and never runs phases before failing.

    validate(config)                  # config.trainer picks the rules: world | reversal | rag
    validate(config, "seq2seq")       # a generator trainer's config (the world's closed book)

Every error is a ConfigError naming the dotted field, its value and the allowed range, e.g.
`config.rag.num_train_steps = -5: must be an integer >= 1`; all bad fields are listed at once,
on one line.
The world job's `rag` group is checked with the RAG trainer's rules (less the paths and token
lengths, which the job fills in).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections

from rag_jax.utils.errors import UserError


class ConfigError(UserError, ValueError):
  """A config field outside its allowed range (or a missing field, or an unknown trainer)."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """field: dotted path below the config; check(value) -> None if allowed, else the range text."""

  field: str
  check: Callable[[Any], str | None]
  optional: bool = False  # A missing field is allowed (the reader has a default).


def integer(low: int | None = None, high: int | None = None) -> Callable[[Any], str | None]:
  """An int (not a bool) in [low, high]."""
  text = "an integer" + (f" >= {low}" if low is not None else "") + (
      f" <= {high}" if high is not None else "")
  return lambda v: None if (isinstance(v, int) and not isinstance(v, bool)
                            and (low is None or v >= low) and (high is None or v <= high)) else text


def number(low: float, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Callable[[Any], str | None]:
  """A finite int or float in the interval (open ends as told)."""
  left = f"{'>' if low_open else '>='} {low}"
  right = f" and {'<' if high_open else '<='} {high}" if high is not None else ""
  text = f"a finite number {left}{right}"

  def check(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
      return text
    if v < low or (low_open and v == low):
      return text
    if high is not None and (v > high or (high_open and v == high)):
      return text
    return None

  return check


def one_of(*values: Any) -> Callable[[Any], str | None]:
  return lambda v: None if v in values else f"one of {list(values)}"


# The optimizer and loop fields that every trainer reads (rag_jax/training/optimizer.py, loop.py).
TRAINING = [
    Rule("seed", integer(0)),
    Rule("batch_size", integer(1)),
    Rule("num_train_steps", integer(1)),
    Rule("learning_rate", number(0, low_open=True)),
    Rule("warmup_steps", integer(0)),
    Rule("lr_end", number(0)),
    Rule("lr_power", number(0, low_open=True)),
    Rule("weight_decay", number(0)),
    Rule("max_grad_norm", number(0)),
    Rule("adam_b1", number(0, 1, high_open=True)),
    Rule("adam_b2", number(0, 1, high_open=True)),
    Rule("adam_eps", number(0, low_open=True)),
    Rule("log_every", integer(1)),
    Rule("eval_every", integer(1)),
    Rule("checkpoint_every", integer(1)),
    Rule("keep_checkpoints", integer(1)),
]
_LABEL_SMOOTHING = Rule("label_smoothing", number(0, 1, high_open=True))
_DTYPE = one_of("float32", "bfloat16", "float16")

RAG_NUMBERS = [
    *TRAINING, _LABEL_SMOOTHING,
    Rule("n_docs", integer(1)),
    Rule("retrieval", one_of("auto", "device", "host")),
    Rule("device_index_memory_fraction", number(0, 1, low_open=True)),
    Rule("dtype", _DTYPE),
    Rule("retriever_kind", one_of("dense", "bm25"), optional=True),
    Rule("frozen_groups", lambda v: None if isinstance(v, list | tuple) and all(
        isinstance(x, str) for x in v) else "a list of top-level parameter names", optional=True),
]
# The RAG trainer on its own also reads the token lengths (the world job measures them).
RAG = [*RAG_NUMBERS, Rule("max_source_length", integer(1)), Rule("max_target_length", integer(1)),
       Rule("max_combined_length", integer(1))]

REVERSAL = [
    *TRAINING, _LABEL_SMOOTHING,
    Rule("eval_batches", integer(1)),
    Rule("model.preset", one_of("tiny", "base", "large")),
    Rule("model.dtype", _DTYPE),
    Rule("model.dropout", number(0, 1, high_open=True)),
    Rule("task.vocab_size", integer(4)),
    Rule("task.min_length", integer(1)),
    Rule("task.max_length", integer(1)),
]

WORLD = [
    Rule("seed", integer(0)),
    *[Rule(f"world.{f}", integer(1)) for f in ("num_people", "num_cities", "num_companies",
                                                "num_years", "train_templates")],
    Rule("world.num_meetings", integer(0)),
    Rule("world.swap_fraction", number(0, 1)),
    Rule("tokenizer.kind", one_of("word", "bpe")),
    Rule("tokenizer.vocab_size", integer(1)),
    *[Rule(f"retriever.{f}", integer(1)) for f in ("hidden_size", "layers", "heads", "ffn_dim",
                                                    "batch_size", "num_train_steps")],
    Rule("retriever.warmup_steps", integer(0)),
    Rule("retriever.learning_rate", number(0, low_open=True)),
    Rule("retriever.dropout", number(0, 1, high_open=True)),
    *[Rule(f"generator.{f}", integer(1)) for f in ("d_model", "layers", "heads", "ffn_dim")],
    Rule("generator.dropout", number(0, 1, high_open=True)),
    *[Rule(f"eval.{f}", integer(1)) for f in ("batch_size", "num_beams", "max_answer_tokens")],
    *[Rule(f"rag.{r.field}", r.check) for r in RAG_NUMBERS],
]

PAPER_SCALE = [
    *RAG, Rule("model.preset", one_of("tiny", "base", "large")), Rule("index_rows", integer(1)),
    Rule("chunk_size", integer(1)),
    Rule("device_index_dtype", one_of("auto", "float32", "bfloat16")),
]

RULES: dict[str, list[Rule]] = {"world": WORLD, "reversal": REVERSAL, "rag": RAG,
                                "seq2seq": [*TRAINING], "paper_scale": PAPER_SCALE}


def _get(config: ml_collections.ConfigDict, field: str) -> Any:
  value: Any = config
  for part in field.split("."):
    if not isinstance(value, ml_collections.ConfigDict | dict) or part not in value:
      raise KeyError(field)
    value = value[part]
  return value


def problems(config: ml_collections.ConfigDict, rules: Sequence[Rule], prefix: str = "config"
             ) -> list[str]:
  """One line per bad field, `prefix.field = value: must be ...`, in rule order."""
  out = []
  for rule in rules:
    try:
      value = _get(config, rule.field)
    except KeyError:
      if rule.optional:
        continue
      out.append(f"{prefix}.{rule.field} is missing")
      continue
    wanted = rule.check(value)
    if wanted is not None:
      out.append(f"{prefix}.{rule.field} = {value!r}: must be {wanted}")
  return out


def _relations(config: ml_collections.ConfigDict, trainer: str, prefix: str) -> list[str]:
  """Checks between fields (and against the devices), on configs whose fields passed."""
  out = []
  groups = {"world": ["rag."], "reversal": [""], "rag": [""], "seq2seq": [""],
            "paper_scale": [""]}[trainer]
  devices = jax.device_count()
  for g in groups:
    batch = _get(config, f"{g}batch_size")
    if batch % devices:
      out.append(f"{prefix}.{g}batch_size = {batch}: must be a multiple of the {devices} devices")
  if trainer == "reversal" and config.task.min_length > config.task.max_length:
    out.append(f"{prefix}.task.min_length = {config.task.min_length}: must be <= "
               f"task.max_length ({config.task.max_length})")
  if trainer in ("rag", "world"):
    lrs = _get(config, "rag.group_learning_rates" if trainer == "world" else
               "group_learning_rates")
    g = "rag." if trainer == "world" else ""
    for name, lr in lrs.items():
      if number(0, low_open=True)(lr) is not None:
        out.append(f"{prefix}.{g}group_learning_rates.{name} = {lr!r}: must be a finite "
                   "number > 0")
  return out


def validate(config: ml_collections.ConfigDict, trainer: str | None = None,
             prefix: str = "config") -> None:
  """Raises ConfigError listing every field of `config` outside its range for `trainer`
  (default: config.trainer, which must name one of RULES; there is no default trainer)."""
  if trainer is None:
    trainer = config.get("trainer")
    if trainer == "world_paper":  # The paper experiment: one world job config per world.
      for name in config.worlds:
        validate(config.worlds[name], "world", f"{prefix}.worlds.{name}")
      return
    known = ["world", "reversal", "rag", "paper_scale", "world_paper"]
    if trainer not in known:
      raise ConfigError(f"{prefix}.trainer = {trainer!r}: must be one of {known} (the config "
                        "file sets it)")
  if trainer not in RULES:
    raise ConfigError(f"no config rules for trainer {trainer!r}; known: {sorted(RULES)}")
  found = problems(config, RULES[trainer], prefix)
  if not found:
    found = _relations(config, trainer, prefix)
  if found:
    raise ConfigError("; ".join(found) + " (invalid config: nothing was run or written)")
