"""The paper experiment (configs/world_paper.py) end to end on its tiny override, through
train.py's trainer table. At a few steps per row the figures are no finding, so the test checks
what holds by construction and what the tables claim to report:
- every figure of report.json / report.md equals the per-row metric recomputed from the answers
  the rows wrote (<row>/heldout_predictions.jsonl, fever/<row>/...) and the world's files (EM,
  the hot-swap's world-1 column, FEVER accuracy per class and the predicted labels);
- retrieval: recall@k grows with k; the BM25 rows of both models retrieve alike (BM25 is not
  trained); the frozen rows' recall is that of the DPR question encoder they froze, recomputed
  here with the retriever's own checkpoint over the index;
- a rerun on the finished workdir runs no phase and writes the same report (the typed results
  read back from phases.json), and discarding the evaluation (an evaluation-only config change)
  drops the rows' predictions files with it, so that they are answered again."""

import json
import shutil

import numpy as np
import pytest

import train
from configs import world_paper
from rag_jax.experiments.world import claims as world_claims
from rag_jax.experiments.world import fever, paper, rows
from rag_jax.experiments.world.evaluation import QUESTION_TOKENS
from rag_jax.experiments.world.paper_report import RECALL_KS
from rag_jax.retrieval.retriever import Retriever

NAMES = [rows.row_name(r, m) for r in rows.RETRIEVERS for m in rows.MODELS]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(config, workdir, report.json, console output) of the tiny experiment."""
  workdir = tmp_path_factory.mktemp("paper")
  config = world_paper.get_config("tiny")
  assert list(config.worlds) == ["default"] and config.fever.worlds == ("default",)
  train.TRAINERS[config.trainer](config, str(workdir))
  return config, workdir, json.loads((workdir / "report.json").read_text())


def _lines(path):
  return path.read_text().splitlines()


def _records(path):
  return [json.loads(x) for x in _lines(path)]


def _same(a, b):
  return " ".join(a.lower().split()) == " ".join(b.lower().split())


def _pct(x):
  return f"{100 * x:.1f}"


def test_tables_equal_the_metrics_recomputed_from_the_written_answers(run):
  config, workdir, report = run
  world = report["worlds"]["default"]
  ev, sub = world["evaluation"], workdir / "default"
  answers = _lines(sub / "world" / "val.target")
  swapped = _lines(sub / "world" / "val_swapped.target")
  changed = json.loads((sub / "world" / "world.json").read_text())["changed_heldout_rows"]
  markdown = (workdir / "report.md").read_text()
  assert sorted(ev["rows"]) == sorted(NAMES) and ev["changed_facts"] == len(changed) > 0
  for name in NAMES:
    predicted = [r["prediction"] for r in _records(sub / name / "heldout_predictions.jsonl")]
    assert len(predicted) == len(answers) == ev["heldout_questions"]
    row, scores = ev["rows"][name]["row"], ev["rows"][name]["scores"]
    em = np.mean([_same(p, a) for p, a in zip(predicted, answers, strict=True)])
    assert scores["em"] == pytest.approx(em), name
    swap = scores["hot_swap"]
    assert swap["changed"] == len(changed)
    for key, truth in (("old_index_gave_old_answer", answers),
                       ("old_index_gave_new_answer", swapped)):
      assert swap[key] == sum(_same(predicted[r], truth[r]) for r in changed), (name, key)
    rec = scores["recall"]
    assert f"| {row} | {_pct(em)} | {_pct(rec['recall@1'])} | " in markdown
    assert (f"| {row} | world-1 | {_pct(swap['old_index_gave_old_answer'] / len(changed))} | "
            f"{_pct(swap['old_index_gave_new_answer'] / len(changed))} | 70 / 4 |") in markdown

  fv, data = world["fever"], sub / "fever" / "data"
  labels = _lines(data / "val.target")
  classes = json.loads((data / "claims.json").read_text())["heldout_labels"]
  assert sorted(fv["rows"]) == sorted(NAMES) and fv["heldout_claims"] == len(labels)
  assert {c: classes.count(c) for c in world_claims.CLASSES} == fv["counts"]  # balanced
  assert len(set(fv["counts"].values())) == 1
  for name in NAMES:
    fe = fv["rows"][name]
    path = sub / "fever" / name / "heldout_predictions.jsonl"
    predicted = [r["prediction"] for r in _records(path)]
    hit = np.asarray([_same(p, g) for p, g in zip(predicted, labels, strict=True)])
    assert fe["accuracy"] == pytest.approx(hit.mean())
    for c in world_claims.CLASSES:
      assert fe["per_class"][c] == pytest.approx(hit[np.asarray(classes) == c].mean())
    assert fe["predicted_labels"] == {w: sum(_same(p, w) for p in predicted)
                                      for w in world_claims.LABEL_WORDS.values()}
    paper_figure = fever.PAPER_TABLE6_FEVER3[fe["retriever"]]
    assert (f"| {fe['row']} | {_pct(hit.mean())} | "
            + " | ".join(_pct(fe["per_class"][c]) for c in world_claims.CLASSES)) in markdown
    assert f" | {paper_figure} |" in markdown
  phases = json.loads((sub / "phases.json").read_text())
  for name in NAMES:  # every row trained with the steps the tables name
    assert phases[f"fever_{name}"]["result"]["steps"] == config.fever.num_train_steps
    assert phases[name]["result"]["steps"] == world["steps"]
  claims = phases["fever_claims"]["result"]
  assert claims["lengths"]["label"] == 3  # <s> label </s>
  assert sorted(claims["label_token_ids"].values()) == list(
      range(claims["vocab_size"] - 3, claims["vocab_size"]))


def test_retrieval_figures_hold_what_the_rows_are_built_to_hold(run):
  config, workdir, report = run
  world = report["worlds"]["default"]
  sub = workdir / "default"
  qa, fv = world["evaluation"]["rows"], world["fever"]["rows"]
  for recall in ({n: qa[n]["scores"]["recall"] for n in NAMES},
                 {n: fv[n]["recall"] for n in NAMES}):
    for name, rec in recall.items():
      values = list(rec.values())
      assert values == sorted(values), (name, rec)  # recall@k grows with k
    for retriever in ("bm25", "frozen"):  # untrained retrieval: both models' rows alike
      assert recall[f"rag_sequence_{retriever}"] == recall[f"rag_token_{retriever}"], retriever
  f3 = world["evaluation"]["figure3"]
  for model in rows.MODELS:
    assert f3["recall"][model] == sorted(f3["recall"][model])

  # The frozen rows' recall is the DPR question encoder's, recomputed from its own checkpoint.
  retriever = Retriever.load(sub / "index", sub / "retriever" / "question_encoder",
                             max_length=QUESTION_TOKENS)
  questions = _lines(sub / "world" / "val.source")
  gold = json.loads((sub / "world" / "world.json").read_text())["heldout_gold_passages"]
  found = retriever.retrieve(questions, k=20)
  frozen = world["evaluation"]["rows"]["rag_sequence_frozen"]["scores"]["recall"]
  for k in RECALL_KS:
    expected = np.mean([g in [h.id for h in hits[:k]] for g, hits in zip(gold, found, strict=True)])
    assert frozen[f"recall@{k}"] == pytest.approx(expected), k


def test_a_rerun_runs_nothing_and_an_evaluation_change_drops_the_answers(run, capsys, tmp_path):
  config, finished, report = run
  workdir = tmp_path / "copy"  # the other tests read the finished workdir
  shutil.copytree(finished, workdir)
  capsys.readouterr()
  train.TRAINERS[config.trainer](config, str(workdir))
  output = capsys.readouterr()
  phases = json.loads((workdir / "default" / "phases.json").read_text())
  for i, name in enumerate(phases, 1):
    assert f"[default {i}/{len(phases)}] {name}: done in an earlier run" in output.err + output.out
  assert json.loads((workdir / "report.json").read_text()) == report

  paper.forget_evaluations(config, workdir)
  left = json.loads((workdir / "default" / "phases.json").read_text())
  assert sorted(set(phases) - set(left)) == ["evaluation", "fever_evaluation"]
  assert not list((workdir / "default").glob("**/heldout_predictions.jsonl"))
  assert not (workdir / "report.json").exists()
