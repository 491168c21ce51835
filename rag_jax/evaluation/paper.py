"""A paper-row config (configs/paper_*.py) -> the EvalRun that evaluates it.

The config is configs/rag_finetune.py's (train.py trains it) plus an `eval` group
(configs/paper_common.py): the task's file and reader, the test-time settings and the paper's
number for each model_type. The checkpoint evaluated is `eval.checkpoint`, else the export of a
train.py run in the same workdir (<workdir>/export), else `rag_checkpoint` (e.g. the released
facebook/rag-sequence-nq); the index is `eval.index_dir`, else the checkpoint's own index (a
train.py export with a trained context encoder holds every passage re-encoded by it in
export/index/), else `index_dir`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import ml_collections

from rag_jax.data import tasks
from rag_jax.evaluation import scoring
from rag_jax.evaluation.loop import EvalExample
from rag_jax.evaluation.runner import EvalRun, ints
from rag_jax.models.rag import MODEL_TYPES
from rag_jax.training import config_check as cc
from rag_jax.utils.errors import InputError

# eval.reader -> (file, eval config) -> TaskSplit.
READERS = {
    "dpr_qa_csv": lambda path, c: tasks.read_dpr_qa_csv(path),
    "curatedtrec": lambda path, c: tasks.read_curatedtrec(path),
    "msmarco_nlg": lambda path, c: tasks.read_msmarco_nlg(
        path, skip_no_answer=True, answers_fallback=c.msmarco_answers_fallback),
    "searchqa_jeopardy": lambda path, c: tasks.read_searchqa_jeopardy(path),
    "fever": lambda path, c: tasks.read_fever(path, num_classes=c.fever_classes),
    "source_target": lambda path, c: tasks.read_source_target_task(Path(path).parent,
                                                                    Path(path).stem),
    "tfds": lambda path, c: tasks.read_tfds_qa(c.tfds_name, c.tfds_split, path or None),
}


# A paper-row config's `eval` group (configs/paper_common.py), read here.
EVAL_RULES = [
    cc.Rule("eval.task", cc.name),
    cc.Rule("eval.reader", cc.one_among(lambda: list(READERS))),
    cc.Rule("eval.test_file", cc.text), cc.Rule("eval.test_file_hint", cc.text),
    cc.Rule("eval.split", cc.name),
    cc.Rule("eval.tfds_name", cc.text), cc.Rule("eval.tfds_split", cc.text),
    cc.Rule("eval.fever_classes", cc.one_of(2, 3)),
    cc.Rule("eval.limit", cc.integer(0)),
    cc.Rule("eval.checkpoint", cc.text), cc.Rule("eval.index_dir", cc.text),
    cc.Rule("eval.max_length", cc.integer(1)),
    cc.Rule("eval.min_length", cc.integer(0)),
    cc.Rule("eval.batch_size", cc.integer(1)),
    cc.Rule("eval.metrics", cc.names_of(lambda: list(scoring.METRICS), "metric names")),
    cc.Rule("eval.recall_ks", cc.positive_ints),
    cc.Rule("eval.paper_label", cc.text),
    cc.Rule("eval.msmarco_answers_fallback", cc.boolean),
    *[cc.Rule(f"eval.{kind}.{f}", check) for kind in MODEL_TYPES
      for f, check in (("n_docs", cc.integer(1)), ("num_beams", cc.integer(1)),
                       ("decoding", cc.one_of("thorough", "fast")), ("paper", cc.number_map))],
]


def validate(config: ml_collections.ConfigDict) -> None:
  """config_check.validate for any config train.py or evaluate.py takes, with a paper row's
  `eval` group (trainer "rag" with an `eval` group) checked too: evaluate.py reads it, and
  train.py checks it before training so that a bad value is named before hours of training."""
  if config.get("trainer") == "rag" and "eval" in config:  # A paper row.
    cc.validate(config, extra_rules=EVAL_RULES, extra_relations=eval_relations)
  else:
    cc.validate(config)


def eval_relations(config: ml_collections.ConfigDict, prefix: str) -> list[str]:
  """The paper row's `eval` fields against each other (each one passed its rule)."""
  ev = config.eval
  if ev.min_length > ev.max_length:
    return [f"{prefix}.eval.min_length = {ev.min_length}: must be <= eval.max_length "
            f"({ev.max_length})"]
  return []


def read_examples(config: ml_collections.ConfigDict) -> tuple[EvalExample, ...]:
  """The evaluation split named by config.eval (reader, test_file), limited to eval.limit."""
  ev = config.eval
  if ev.reader not in READERS:
    raise InputError(f"config.eval.reader={ev.reader!r}; expected one of {sorted(READERS)}")
  if ev.reader != "tfds" and not ev.test_file:
    raise InputError(f"config.eval.test_file is empty; point it at the {ev.task} file "
                     f"({ev.test_file_hint})")
  split = READERS[ev.reader](ev.test_file, ev)
  examples = tuple(EvalExample(e.source, e.targets, e.id, e.titles) for e in split)
  if not examples:
    raise InputError(f"{ev.test_file}: no examples")
  return examples[:ev.limit] if ev.limit > 0 else examples


def checkpoint_of(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> str:
  """eval.checkpoint, else <workdir>/export (a train.py run of this config), else
  rag_checkpoint."""
  if config.eval.checkpoint:
    return config.eval.checkpoint
  export = Path(workdir) / "export"
  if (export / "config.json").exists():
    return str(export)
  if config.rag_checkpoint:
    return config.rag_checkpoint
  raise InputError("no checkpoint to evaluate: set config.eval.checkpoint (or rag_checkpoint), "
                   "or train one with train.py in this --workdir")


def own_index(checkpoint: str) -> str:
  """<checkpoint>/index when it is an index directory (a context encoder trained with the
  model re-encoded every passage into it: the original index would be stale), else ""."""
  index = Path(checkpoint) / "index"
  return str(index) if (index / "passages" / "store.json").is_file() else ""


def paper_runs(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> list[EvalRun]:
  """The one EvalRun of a paper-row config, with config.model_type's test-time settings."""
  ev = config.eval
  if config.model_type not in ev:
    raise InputError(f"config.model_type={config.model_type!r}; expected one of "
                     "rag_sequence, rag_token")
  row = ev[config.model_type]
  if not (ev.index_dir or config.index_dir):
    raise InputError("config.index_dir (or config.eval.index_dir) is empty; point it at a "
                     "directory written by python -m rag_jax.commands.build_index")
  checkpoint = checkpoint_of(config, workdir)
  index_dir = ev.index_dir or own_index(checkpoint) or config.index_dir
  generate: dict[str, Any] = {"num_beams": row.num_beams, "max_length": ev.max_length}
  if config.model_type == "rag_sequence":
    generate["decoding"] = row.decoding
  if ev.min_length:
    generate["min_length"] = ev.min_length
  return [EvalRun(
      name=f"{ev.task}-{config.model_type}-{ev.split}", examples=read_examples(config),
      checkpoint=checkpoint, index_dir=index_dir,
      model_type=config.model_type, n_docs=row.n_docs, generate=generate,
      metrics=tuple(ev.metrics), batch_size=ev.batch_size,
      recall_ks=ints(ev.recall_ks, "config.eval.recall_ks"),
      reference={k: v / 100 for k, v in row.paper.items()}, reference_label=ev.paper_label,
      regex_answers=ev.reader == "curatedtrec", max_question_length=config.max_source_length,
      dtype=config.dtype, question_encoder=config.question_encoder_checkpoint)]
