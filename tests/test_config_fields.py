"""Every field a run reads is checked before its first phase (rag_jax/training/config_check.py,
rag_jax/evaluation/paper.py for a paper row's `eval` group):
each shipped config's every leaf has a rule; the `eval` groups (the world's, a paper row's,
paper_scale's) are checked with the rest; fields bounded by the number of passages are checked
against the world's before any phase. A change to a field only evaluation reads never locks a
finished training out: the workdir keeps its trained models and redoes its evaluation."""

import importlib
import json
import re
from pathlib import Path

import pytest

from configs import default as default_config
from configs import paper_nq, paper_scale, reversal, world_paper
from rag_jax.evaluation import paper as paper_eval
from rag_jax.evaluation import scoring
from rag_jax.experiments.world import job as world_job
from rag_jax.experiments.world import report as world_report
from rag_jax.experiments.world.data import WorldConfig, build_world
from rag_jax.training import config_check, loop

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py")
                 if p.stem not in ("__init__", "paper_common"))
NOTHING_RUN = " (invalid config: nothing was run or written)"
# Leaves no rule checks on purpose: the dispatch field (validate's own check), groups of learning
# rates (checked one by one, _relations), paper_scale's preset overrides (any preset field).
UNCHECKED = ("trainer", "group_learning_rates", "model.question_encoder", "model.generator")


def _leaves(config) -> set[str]:
  tree = json.loads(config.to_json_best_effort())
  return {k.removeprefix("config.") for k in loop.config_leaves(tree)}


def _covered(leaf: str, fields: set[str]) -> bool:
  """A rule on the leaf itself or on a group above it (a mapping checked whole)."""
  parts = leaf.split(".")
  return any(".".join(parts[:i]) in fields for i in range(1, len(parts) + 1))


def _rule_fields(config, trainer: str) -> set[str]:
  rules = config_check.RULES[trainer] + (paper_eval.EVAL_RULES
                                         if trainer == "rag" and "eval" in config else [])
  fields = {r.field for r in rules} | set(UNCHECKED)
  if trainer in ("world", "world_shift"):  # a world job config: the job fills these
    fields |= {f"rag.{f}" for f in (*config_check.RAG_JOB_FILLED, "group_learning_rates")}
  return fields


@pytest.mark.parametrize("name", [*CONFIGS, "world_paper:tiny"])
def test_every_field_of_every_config_has_a_rule(name):
  # Before: the `eval` groups had no rule (config.eval.recall_ks = (1, 5000) ran every phase,
  # then failed in the evaluation), nor several training fields.
  module, _, size = name.partition(":")
  config = importlib.import_module(f"configs.{module}").get_config(*([size] if size else []))
  paper_eval.validate(config)
  if config.trainer == "world_paper":
    fields = _rule_fields(config, "world_paper")
    for world in config.worlds:
      fields |= {f"worlds.{world}.{f}" for f in _rule_fields(config.worlds[world], "world")}
  else:
    fields = _rule_fields(config, config.trainer)
  assert sorted(leaf for leaf in _leaves(config) if not _covered(leaf, fields)) == []


def _ruled_fields(config) -> list[str]:
  """The fields a rule of `config`'s trainer names (a paper row's `eval` rules included)."""
  def of(c, trainer: str) -> set[str]:
    extra = paper_eval.EVAL_RULES if trainer == "rag" and "eval" in c else []
    return {r.field for r in config_check.RULES[trainer] + extra}
  fields = of(config, config.trainer)
  if config.trainer == "world_paper":
    fields |= {f"worlds.{w}.{f}" for w in config.worlds for f in of(config.worlds[w], "world")}
  return sorted(fields)


@pytest.mark.parametrize("name", ["rag_finetune", "paper_msmarco", "paper_scale",
                                  "world_paper:tiny"])
def test_every_ruled_field_is_required(name):
  # A field's default lives in configs/ and the library reads it plainly: a config without it is
  # refused by name before any work. Before, six rules were optional (device_index_dtype,
  # retriever_kind, ..., retriever.question_eda, fever.*) and their readers invented defaults.
  module, _, size = name.partition(":")
  config = importlib.import_module(f"configs.{module}").get_config(*([size] if size else []))
  fields = _ruled_fields(config)
  assert len(fields) > 20
  for field in fields:
    config_without = config.copy_and_resolve_references()
    *parents, leaf = field.split(".")
    group = config_without
    for part in parents:
      group = group[part]
    del group[leaf]
    with pytest.raises(config_check.ConfigError, match=rf"config\.{re.escape(field)} is missing"):
      paper_eval.validate(config_without)


def test_the_rules_know_the_registries_names():
  config = paper_nq.get_config()
  config.eval.reader = "csv"
  config.eval.metrics = ("exact_match", "bleu_4")
  with pytest.raises(config_check.ConfigError) as e:
    paper_eval.validate(config)
  assert str(e.value) == (
      f"config.eval.reader = 'csv': must be one of {sorted(paper_eval.READERS)}; "
      f"config.eval.metrics = ('exact_match', 'bleu_4'): must be a non-empty list of metric "
      f"names among {sorted(scoring.METRICS)}" + NOTHING_RUN)


def test_eval_groups_are_checked_with_the_rest():
  config = default_config.get_config()
  config.eval.recall_ks = (1, 0)
  config.eval.num_beams = 0
  with pytest.raises(config_check.ConfigError) as e:
    paper_eval.validate(config)
  assert str(e.value) == ("config.eval.num_beams = 0: must be an integer >= 1; "
                          "config.eval.recall_ks = (1, 0): must be a non-empty list of integers "
                          ">= 1" + NOTHING_RUN)
  config = paper_nq.get_config()
  config.eval.rag_token.decoding = "slow"
  config.eval.fever_classes = 4
  config.eval.split = "test/2"
  with pytest.raises(config_check.ConfigError) as e:
    paper_eval.validate(config)
  assert str(e.value) == (
      "config.eval.split = 'test/2': must be a non-empty name without '/'; "
      "config.eval.fever_classes = 4: must be one of [2, 3]; "
      "config.eval.rag_token.decoding = 'slow': must be one of ['thorough', 'fast']" + NOTHING_RUN)
  config = paper_nq.get_config()
  config.eval.min_length = 60
  with pytest.raises(config_check.ConfigError, match=r"^config.eval.min_length = 60: must be <= "
                                                     r"eval.max_length \(50\)"):
    paper_eval.validate(config)
  config = paper_scale.get_config()
  config.update_from_flattened_dict({"index_rows": 40, "eval.n_docs": 50})
  with pytest.raises(config_check.ConfigError) as e:
    paper_eval.validate(config)
  assert str(e.value) == ("config.eval.n_docs asks for 50 passages, more than the 40 of the "
                          "random index (config.index_rows)" + NOTHING_RUN)
  config = world_paper.get_config("tiny")
  config.paper.sweep_questions = 0
  config.worlds.default.eval.batch_size = -1
  with pytest.raises(config_check.ConfigError) as e:
    paper_eval.validate(config)
  assert str(e.value) == ("config.worlds.default.eval.batch_size = -1: must be an integer >= 1; "
                          "config.paper.sweep_questions = 0: must be an integer >= 1"
                          + NOTHING_RUN)


def _tiny_world():
  return world_paper.get_config("tiny").worlds.default


def test_passage_bounds_are_checked_against_the_world_before_any_phase(tmp_path):
  # The world's passages, counted in the corpus file the world phase writes.
  config = _tiny_world()
  build_world(WorldConfig(**config.world.to_dict()), tmp_path / "world")
  passages = len((tmp_path / "world" / "passages.tsv").read_text().splitlines()) - 1  # header
  config.eval.recall_ks = (1, 5, passages + 1)
  config.rag.n_docs = passages + 2
  # Before: no check; every phase ran, then the evaluation failed (here: the world phase runs
  # and the call returns without an error).
  with pytest.raises(config_check.ConfigError) as e:
    world_job.train_and_evaluate(config, str(tmp_path / "run"), stop_after_phase="world")
  assert str(e.value) == (
      f"config.rag.n_docs asks for {passages + 2} passages, more than the {passages} of the "
      f"world of config.world; config.eval.recall_ks asks for {passages + 1} passages, more than "
      f"the {passages} of the world of config.world" + NOTHING_RUN)
  assert not (tmp_path / "run").exists()
  paper = world_paper.get_config("tiny")
  paper.paper.docs = (1, passages + 1)
  with pytest.raises(config_check.ConfigError, match=rf"^config.paper.docs asks for "
                                                     rf"{passages + 1} passages, more than the "
                                                     rf"{passages} of the default world"):
    from rag_jax.experiments.world import paper as paper_job
    paper_job.train_and_evaluate(paper, str(tmp_path / "paper"))
  assert not (tmp_path / "paper").exists()


def test_an_evaluation_field_change_keeps_the_training(tmp_path):
  # Before: any difference refused the workdir ("holds a run with another config"), so a run
  # whose evaluation failed on a bad eval field could not be finished with the corrected field.
  config = default_config.get_config()
  config.eval.recall_ks = (1, 5000)
  loop.check_workdir(config, tmp_path)
  calls = []
  fixed = default_config.get_config()
  loop.check_workdir(fixed, tmp_path, on_evaluation_change=calls.append)
  assert calls == [["config.eval.recall_ks: [1, 5000] in the workdir, [1, 5, 20] now"]]
  assert json.loads((tmp_path / "config.json").read_text())["eval"]["recall_ks"] == [1, 5, 20]
  both = default_config.get_config()
  both.eval.batch_size = 7
  both.rag.num_train_steps = 301
  with pytest.raises(loop.WorkdirConfigError) as e:  # a training field still refuses, alone
    loop.check_workdir(both, tmp_path)
  assert str(e.value).startswith(f"{tmp_path} holds a run with another config "
                                 "(config.rag.num_train_steps: 300 in the workdir, 301 now); ")
  # The paper rows' and the paper experiment's evaluation-only fields; not the reversal's.
  for make, change in ((paper_nq.get_config, {"eval.recall_ks": (1, 5)}),
                       (lambda: world_paper.get_config("tiny"),
                        {"paper.docs": (1, 2), "worlds.default.eval.num_beams": 4,
                         "fever.max_label_tokens": 5})):
    workdir = tmp_path / make().trainer
    workdir.mkdir()
    loop.check_workdir(make(), workdir)
    changed = make()
    changed.update_from_flattened_dict(change)
    loop.check_workdir(changed, workdir)
  workdir = tmp_path / "reversal"
  workdir.mkdir()
  loop.check_workdir(reversal.get_config(), workdir)
  changed = reversal.get_config()
  changed.eval_batches = 9
  with pytest.raises(loop.WorkdirConfigError, match=r"config.eval_batches: 8 in the workdir"):
    loop.check_workdir(changed, workdir)


def test_a_finished_world_job_redoes_only_its_evaluation(tmp_path, monkeypatch):
  # The job's phases and report replaced by stand-ins that record what ran.
  ran = []

  def phase(name):
    def run(job):
      ran.append(name)
      if name == "evaluation":
        for model in ("rag_sequence", "rag_token"):  # predictions a rerun would resume
          (job.workdir / model).mkdir(exist_ok=True)
          (job.workdir / model / "heldout_predictions.jsonl").write_text(
              json.dumps({"recall_ks": list(job.config.eval.recall_ks)}) + "\n")
      return {"recall_ks": list(job.config.eval.recall_ks)}
    return run

  monkeypatch.setattr(world_job, "PHASE_FUNCTIONS", {p: phase(p) for p in world_job.PHASES})
  monkeypatch.setattr(world_job, "PHASE_SUMMARIES", {p: str for p in world_job.PHASES})
  monkeypatch.setattr(world_report, "build_report",
                      lambda config, phases: {"evaluated": phases["evaluation"]["result"]})
  monkeypatch.setattr(world_report, "markdown", lambda report: json.dumps(report))
  workdir = tmp_path / "run"
  config = _tiny_world()
  assert world_job.train_and_evaluate(config, str(workdir)) == {
      "evaluated": {"recall_ks": [1, 5, 20]}}
  assert ran == list(world_job.PHASES)

  ran.clear()
  config.eval.recall_ks = (1, 3)
  assert world_job.train_and_evaluate(config, str(workdir)) == {
      "evaluated": {"recall_ks": [1, 3]}}
  assert ran == ["evaluation"]
  assert (workdir / "rag_token" / "heldout_predictions.jsonl").read_text() == (
      '{"recall_ks": [1, 3]}\n')  # made again, not resumed from the old settings' file
  assert json.loads((workdir / "report.json").read_text()) == {"evaluated": {"recall_ks": [1, 3]}}
  ran.clear()
  assert world_job.train_and_evaluate(config, str(workdir))  # finished: nothing runs
  assert ran == []
