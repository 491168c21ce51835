"""Config validation, one place for every trainer: each field a trainer reads is checked against
its allowed range before the workdir is touched, so a refused config never reaches the workdir's
config.json (which would lock a corrected rerun out) and never runs phases before failing.

    validate(config)                  # config.trainer picks the rules: world | reversal | rag
    validate(config, "seq2seq")       # a generator trainer's config (the world's closed book)

Every error is a ConfigError naming the dotted field, its value and the allowed range, e.g.
`config.rag.num_train_steps = -5: must be an integer >= 1`; all bad fields are listed at once,
on one line.
The world job's `rag` group is checked with the RAG trainer's rules (less the paths and token
lengths, which the job fills in). The `eval` groups (the world's, paper_scale's, and a paper
row's through rag_jax.evaluation.paper.validate) are checked with the rest, before any phase
runs, although only evaluation reads them.

Fields bounded by the index's number of passages (passages per question, the world's recall@k
depths) are checked by check_index_size as soon as that number is known: the RAG trainer reads
it from the index before training, the world jobs compute their world's passages before their
first phase.
Every field of every shipped config has a rule, or is one the world job fills in (RAG_JOB_FILLED),
or a free-form group of overrides (tests/test_config_fields.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections

from rag_jax.models.rag import MODEL_TYPES
from rag_jax.retrieval.refresh import REFRESH_MODES, ScheduleError, parse_schedule
from rag_jax.utils.errors import UserError


class ConfigError(UserError, ValueError):
  """A config field outside its allowed range (or a missing field, or an unknown trainer)."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """field: dotted path below the config; check(value) -> None if allowed, else the range text.
  Every field is required: its default lives in configs/, the library reads it plainly."""

  field: str
  check: Callable[[Any], str | None]


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
  return lambda v: None if v in values and type(v) in {type(x) for x in values} else (
      f"one of {list(values)}")


def boolean(v: Any) -> str | None:
  return None if isinstance(v, bool) else "True or False"


def text(v: Any) -> str | None:
  """A string (a path or a label; what it must hold is checked where it is used)."""
  return None if isinstance(v, str) else "a string"


def name(v: Any) -> str | None:
  """A non-empty string usable as a folder name."""
  return None if isinstance(v, str) and v and "/" not in v else "a non-empty name without '/'"


def positive_ints(v: Any) -> str | None:
  """A non-empty list of integers >= 1 (recall@k depths, numbers of passages)."""
  ok = (isinstance(v, list | tuple) and len(v) > 0
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v))
  return None if ok else "a non-empty list of integers >= 1"


def strings(v: Any) -> str | None:
  return None if isinstance(v, list | tuple) and all(isinstance(x, str) for x in v) else (
      "a list of strings")


def names_of(known: Callable[[], Sequence[str]], what: str) -> Callable[[Any], str | None]:
  """A non-empty list of names among known() (read when checked: the registry's own list)."""
  def check(v: Any) -> str | None:
    names = sorted(known())
    if isinstance(v, list | tuple) and v and all(isinstance(x, str) and x in names for x in v):
      return None
    return f"a non-empty list of {what} among {names}"
  return check


def one_among(known: Callable[[], Sequence[str]]) -> Callable[[Any], str | None]:
  """One of known() (read when checked)."""
  return lambda v: None if isinstance(v, str) and v in known() else f"one of {sorted(known())}"


def number_map(v: Any) -> str | None:
  """A mapping of names to finite numbers (the paper's figures)."""
  if isinstance(v, ml_collections.ConfigDict | dict) and all(
      number(-math.inf)(x) is None for x in v.values()):
    return None
  return "a mapping of metric names to finite numbers"


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

# The RAG trainer's fields that the world job takes from its config.rag as they are.
RAG_NUMBERS = [
    *TRAINING, _LABEL_SMOOTHING,
    Rule("n_docs", integer(1)),
    Rule("retrieval", one_of("auto", "device", "host")),
    Rule("device_index_memory_fraction", number(0, 1, low_open=True)),
    Rule("device_index_dtype", one_of("auto", "float32", "bfloat16")),
    Rule("dtype", _DTYPE),
    Rule("retriever_kind", one_of("dense", "bm25")),
    Rule("frozen_groups", lambda v: None if isinstance(v, list | tuple) and all(
        isinstance(x, str) for x in v) else "a list of top-level parameter names"),
    Rule("exclude_bos_score", boolean),
    Rule("prepend_decoder_start", boolean),
]
# Those the world job fills in (paths, kind, seed, the token lengths it measures on the world).
RAG_JOB_FILLED = ("trainer", "model_type", "rag_checkpoint", "question_encoder_checkpoint",
                  "generator_checkpoint", "index_dir", "data_dir", "seed", "max_source_length",
                  "max_target_length", "max_combined_length", "context_encoder_checkpoint",
                  "context_encoder_max_length")
# The RAG trainer on its own also reads the model kind, the token lengths and the paths (which
# rag_jax.training.rag_trainer.check_config_paths checks for their files).
RAG = [*RAG_NUMBERS, Rule("model_type", one_of(*MODEL_TYPES)),
       Rule("max_source_length", integer(1)), Rule("max_target_length", integer(1)),
       Rule("max_combined_length", integer(1)),
       *[Rule(f, text) for f in ("rag_checkpoint", "question_encoder_checkpoint",
                                 "generator_checkpoint", "index_dir", "data_dir")]]
# Training the context encoder: the RAG trainer's (the world job fills the encoder's path and
# passage length with its retriever's); not paper_scale's (its index is random).
_TRAIN_CONTEXT_ENCODER = Rule("train_context_encoder", boolean)
# Refreshing the index with the trained context encoder (rag_jax.retrieval.refresh), and the
# index exported with it.
INDEX_REFRESH = [Rule("index_refresh", one_of(*REFRESH_MODES)), Rule("export_index", boolean),
                 Rule("refresh_rows_per_step", integer(1)), Rule("refresh_schedule", text),
                 Rule("rerank_candidates", integer(2))]
RAG_TRAINER = [*RAG, _TRAIN_CONTEXT_ENCODER, *INDEX_REFRESH,
               Rule("context_encoder_checkpoint", text),
               Rule("context_encoder_max_length", integer(1))]

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
    Rule("world.seed", integer(0)),
    *[Rule(f"world.{f}", integer(1)) for f in ("num_people", "num_cities", "num_companies",
                                                "num_years", "train_templates")],
    Rule("world.first_year", integer()),
    Rule("world.num_meetings", integer(0)),
    Rule("world.swap_fraction", number(0, 1)),
    Rule("world.hard", boolean),
    Rule("tokenizer.kind", one_of("word", "bpe")),
    Rule("tokenizer.vocab_size", integer(1)),
    *[Rule(f"retriever.{f}", integer(1)) for f in ("hidden_size", "layers", "heads", "ffn_dim",
                                                    "batch_size", "num_train_steps")],
    Rule("retriever.warmup_steps", integer(0)),
    Rule("retriever.learning_rate", number(0, low_open=True)),
    Rule("retriever.dropout", number(0, 1, high_open=True)),
    Rule("retriever.question_eda", number(0, 1)),
    Rule("retriever.hard_negatives", boolean),
    *[Rule(f"generator.{f}", integer(1)) for f in ("d_model", "layers", "heads", "ffn_dim")],
    Rule("generator.dropout", number(0, 1, high_open=True)),
    # The evaluation phase's (and evaluate.py's) group: evaluation-only (loop.EVALUATION_ONLY).
    *[Rule(f"eval.{f}", integer(1)) for f in ("batch_size", "num_beams", "max_answer_tokens")],
    Rule("eval.recall_ks", positive_ints),
    *[Rule(f"rag.{r.field}", r.check) for r in (*RAG_NUMBERS, _TRAIN_CONTEXT_ENCODER,
                                                  *INDEX_REFRESH)],
]

# configs/world_paper.py beyond its worlds (each checked with WORLD): Figures 2 and 3, the
# FEVER-like rows.
WORLD_PAPER = [
    Rule("paper.docs", positive_ints),
    Rule("paper.sweep_questions", integer(1)),
    Rule("paper.figure2_questions", integer(0)),
    Rule("fever.worlds", strings),
    Rule("fever.num_train_steps", integer(1)),
    Rule("fever.max_label_tokens", integer(1)),
]

PAPER_SCALE = [
    *RAG, Rule("model.preset", one_of("tiny", "base", "large")), Rule("index_rows", integer(1)),
    Rule("chunk_size", integer(1)),
    *[Rule(f"eval.{f}", integer(1)) for f in ("batch_size", "n_docs", "num_beams", "max_length")],
    Rule("eval.decoding", one_of("thorough", "fast")),
    Rule("eval.rescore_candidates", integer(0)),
    Rule("eval.rescore_positions", integer(0)),
]

# configs/world_shift.py: a world job config (the retriever's world A) and its `shift` group
# (world B's wording and the rows, rag_jax.experiments.world.shift).
SHIFT_ROWS = ("frozen", "every_step", "rolling", "scheduled", "rerank", "stale")
WORLD_SHIFT = [
    *WORLD,
    Rule("shift.co_mentions", integer(1)),
    Rule("shift.rows", strings),
    Rule("shift.world_a_steps", integer(0)),
    Rule("shift.ctx_learning_rate", number(0, low_open=True)),
    Rule("shift.rolling_rows_per_step", integer(1)),
    Rule("shift.refresh_schedule", text),
    Rule("shift.rerank_candidates", integer(2)),
]

RULES: dict[str, list[Rule]] = {"world": WORLD, "reversal": REVERSAL, "rag": RAG_TRAINER,
                                "seq2seq": [*TRAINING], "paper_scale": PAPER_SCALE,
                                "world_paper": WORLD_PAPER, "world_shift": WORLD_SHIFT}


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
      out.append(f"{prefix}.{rule.field} is missing")
      continue
    wanted = rule.check(value)
    if wanted is not None:
      out.append(f"{prefix}.{rule.field} = {value!r}: must be {wanted}")
  return out


def _relations(config: ml_collections.ConfigDict, trainer: str, prefix: str) -> list[str]:
  """Checks between fields (and against the devices), on configs whose fields passed."""
  out = []
  if trainer == "world_paper":
    if unknown := sorted(set(config.fever.worlds) - set(config.worlds)):
      out.append(f"{prefix}.fever.worlds names {unknown}, not worlds of {prefix}.worlds "
                 f"({list(config.worlds)})")
    return out
  if trainer == "world_shift":
    out += _shift_relations(config, prefix)
    trainer = "world"  # the rest: the world job's relations
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
    for group, lr in lrs.items():
      if number(0, low_open=True)(lr) is not None:
        out.append(f"{prefix}.{g}group_learning_rates.{group} = {lr!r}: must be a finite "
                   "number > 0")
  if trainer == "rag" and config.train_context_encoder:
    if config.retriever_kind != "dense":
      out.append(f"{prefix}.train_context_encoder = True: needs {prefix}.retriever_kind = "
                 f"'dense' (not {config.retriever_kind!r}: a fixed retriever has no context "
                 "encoder)")
    if not config.context_encoder_checkpoint:
      out.append(f"{prefix}.train_context_encoder = True: needs "
                 f"{prefix}.context_encoder_checkpoint (the DPRContextEncoder that encoded the "
                 "index, with its tokenizer)")
  if trainer == "rag":
    out += _refresh_relations(config, prefix)
  if trainer == "paper_scale":  # Its index is random, index_rows x dim: a pure config relation.
    out += index_problems(passages_needed(config, trainer), config.index_rows,
                          f"the random index ({prefix}.index_rows)", prefix)
  return out


def _shift_relations(config: ml_collections.ConfigDict, prefix: str) -> list[str]:
  """The shifted-world experiment's rows against the fields they use."""
  shift, out = config.shift, []
  if unknown := [r for r in shift.rows if r not in SHIFT_ROWS]:
    out.append(f"{prefix}.shift.rows names {unknown}: rows are {list(SHIFT_ROWS)}")
  if "frozen" not in shift.rows:
    out.append(f"{prefix}.shift.rows = {tuple(shift.rows)}: needs 'frozen' (the row every step "
               "time is compared with)")
  if config.rag.retrieval == "host":
    out.append(f"{prefix}.rag.retrieval = 'host': the refreshed rows need retrieval on the "
               "devices ('device' or 'auto')")
  try:
    parse_schedule(shift.refresh_schedule)
  except ScheduleError as e:
    out.append(f"{prefix}.shift.refresh_schedule: {e}")
  if shift.rerank_candidates <= config.rag.n_docs:
    out.append(f"{prefix}.shift.rerank_candidates = {shift.rerank_candidates}: must be > "
               f"{prefix}.rag.n_docs ({config.rag.n_docs})")
  return out


def _refresh_relations(config: ml_collections.ConfigDict, prefix: str) -> list[str]:
  """config.index_refresh against the fields it needs (the trainer names a retrieval that
  "auto" put on the host once it is known)."""
  mode, out = config.index_refresh, []
  if mode == "none":
    return out
  field = f"{prefix}.index_refresh = {mode!r}"
  if not config.train_context_encoder:
    out.append(f"{field}: needs {prefix}.train_context_encoder = True (a frozen context encoder "
               "leaves the index as built)")
  if config.retrieval == "host" and mode != "scheduled":
    out.append(f"{field}: needs retrieval on the devices ({prefix}.retrieval = 'device' or "
               "'auto', not 'host'; only 'scheduled' refreshes a host-searched index)")
  if mode == "scheduled":
    try:
      parse_schedule(config.refresh_schedule)
    except ScheduleError as e:
      out.append(f"{prefix}.refresh_schedule: {e}")
  if mode == "rerank" and config.rerank_candidates <= config.n_docs:
    out.append(f"{prefix}.rerank_candidates = {config.rerank_candidates}: must be > "
               f"{prefix}.n_docs ({config.n_docs})")
  return out


def validate(config: ml_collections.ConfigDict, trainer: str | None = None,
             prefix: str = "config", extra_rules: Sequence[Rule] = (),
             extra_relations: Callable[[ml_collections.ConfigDict, str], list[str]] | None = None
             ) -> None:
  """Raises ConfigError listing every field of `config` outside its range for `trainer`
  (default: config.trainer, which must name one of RULES; there is no default trainer).

  extra_rules: rules of a group that a later stage reads, checked with the rest (a paper row's
  `eval` group, rag_jax.evaluation.paper.validate: train.py checks it before training so that a
  bad value is named before hours of training rather than after); extra_relations(config,
  prefix) -> one line per broken relation between that group's fields, checked once every field
  passed."""
  if trainer is None:
    trainer = config.get("trainer")
    known = ["world", "reversal", "rag", "paper_scale", "world_paper", "world_shift"]
    if trainer not in known:
      raise ConfigError(f"{prefix}.trainer = {trainer!r}: must be one of {known} (the config "
                        "file sets it)")
  if trainer not in RULES:
    raise ConfigError(f"no config rules for trainer {trainer!r}; known: {sorted(RULES)}")
  if trainer == "world_paper":  # The paper experiment: one world job config per world.
    found = []
    for world in config.worlds:
      try:
        validate(config.worlds[world], "world", f"{prefix}.worlds.{world}")
      except ConfigError as e:
        found.append(str(e).removesuffix(_NOTHING_RUN))
  else:
    found = []
  found += problems(config, [*RULES[trainer], *extra_rules], prefix)
  if not found:
    found = _relations(config, trainer, prefix)
    found += extra_relations(config, prefix) if extra_relations else []
  if found:
    raise ConfigError("; ".join(found) + _NOTHING_RUN)


_NOTHING_RUN = " (invalid config: nothing was run or written)"


# --------------------------------------------------------------------------- the index's size


def passages_needed(config: ml_collections.ConfigDict, trainer: str, training: bool = True,
                    evaluation: bool = True) -> dict[str, int]:
  """{dotted field: the passages it asks for} of the fields bounded by the number of passages of
  the index they are used with: retrieved passages per question (n_docs, paper.docs) and the
  world's recall@k depths (eval.recall_ks: its evaluation searches max(recall_ks) passages).
  `training` / `evaluation`: only the fields that training / evaluation reads."""
  out: dict[str, int] = {}
  if trainer in ("world", "world_shift"):
    out = {"rag.n_docs": config.rag.n_docs, "eval.recall_ks": max(config.eval.recall_ks)}
    if trainer == "world_shift" and "rerank" in config.shift.rows:
      out["shift.rerank_candidates"] = config.shift.rerank_candidates
  elif trainer == "world_paper":
    for world in config.worlds:
      out[f"worlds.{world}.rag.n_docs"] = config.worlds[world].rag.n_docs
    out["paper.docs"] = max(config.paper.docs)
  elif trainer in ("rag", "paper_scale"):
    if training:
      out["n_docs"] = config.n_docs
      if trainer == "rag" and config.index_refresh == "rerank":
        out["rerank_candidates"] = config.rerank_candidates
    # A paper row's eval.recall_ks may exceed its index: evaluate.py leaves those depths out.
    if evaluation and trainer == "paper_scale":
      out["eval.n_docs"] = config.eval.n_docs
  return out


def index_problems(needed: dict[str, int], passages: int, index: str, prefix: str = "config"
                   ) -> list[str]:
  """One line per field of `needed` asking for more than the `passages` of `index`."""
  return [f"{prefix}.{field} asks for {wanted} passages, more than the {passages} of {index}"
          for field, wanted in needed.items() if wanted > passages]


def check_index_size(config: ml_collections.ConfigDict, trainer: str, passages: int, index: str,
                     prefix: str = "config", training: bool = True,
                     evaluation: bool = True) -> None:
  """Raises ConfigError naming each field (passages_needed) that asks for more passages than
  `index` (a path, or what the index will be built from) holds: called as soon as that number
  is known, before the workdir is touched and before any training or evaluation."""
  found = index_problems(passages_needed(config, trainer, training, evaluation), passages,
                         index, prefix)
  if found:
    raise ConfigError("; ".join(found) + _NOTHING_RUN)
