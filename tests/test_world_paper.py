"""The paper experiment (configs/world_paper.py) end to end on its tiny override, through
train.py's trainer table: every phase of one tiny world runs, and report.json / report.md hold
every table (Table 1, Table 6, the FEVER-like column, the hot-swap 2x2, Figure 3) with every
row, each figure a percentage. A wiring check: at a few steps the figures mean nothing, so they
are checked against the run's own files (the claims' labels) and ranges, not against findings."""

import json

import numpy as np

import train
from configs import world_paper
from rag_jax.experiments.world import claims as world_claims
from rag_jax.experiments.world import fever, rows


def _in_unit(x) -> bool:
  return isinstance(x, float) and 0.0 <= x <= 1.0


def test_tiny_paper_experiment_writes_every_table_and_the_fever_column(tmp_path):
  config = world_paper.get_config("tiny")
  assert list(config.worlds) == ["default"] and config.fever.worlds == ("default",)
  train.TRAINERS[config.trainer](config, str(tmp_path))

  report = json.loads((tmp_path / "report.json").read_text())
  (world,) = report["worlds"].values()
  ev, fv = world["evaluation"], world["fever"]
  names = [rows.row_name(r, m) for r in rows.RETRIEVERS for m in rows.MODELS]
  assert sorted(ev["rows"]) == sorted(fv["rows"]) == sorted(names)
  assert _in_unit(ev["closed_book_em"]) and all(map(_in_unit, ev["figure3"]["rag_token_em"]))
  for name in names:
    qa, fe = ev["rows"][name], fv["rows"][name]
    assert qa["row"] == fe["row"]
    assert _in_unit(qa["em"]) and all(map(_in_unit, qa["recall"].values()))
    assert all(_in_unit(x) for side in qa["hot_swap"].values() for x in side.values())
    assert _in_unit(fe["accuracy"]) and all(map(_in_unit, fe["per_class"].values()))
    assert all(map(_in_unit, fe["recall"].values()))
    predicted = fe["predicted_labels"]
    assert set(predicted) == set(world_claims.LABEL_WORDS.values())
    assert sum(predicted.values()) <= fv["heldout_claims"]
    # Per-class accuracies recombine to the overall one (balanced classes).
    assert np.isclose(np.mean(list(fe["per_class"].values())), fe["accuracy"])

  # The claims the rows were scored on: balanced, labels one token of the FEVER tokenizer.
  data = tmp_path / "default" / "fever" / "data"
  labels = (data / "val.target").read_text().splitlines()
  assert len(labels) == fv["heldout_claims"] and fv["heldout_claims"] % 3 == 0
  assert {w: labels.count(w) for w in set(labels)} == {
      w: fv["heldout_claims"] // 3 for w in world_claims.LABEL_WORDS.values()}
  phases = json.loads((tmp_path / "default" / "phases.json").read_text())
  claims_result = phases["fever_claims"]["result"]
  assert claims_result["lengths"]["label"] == 3  # <s> label </s>
  assert sorted(claims_result["label_token_ids"].values()) == list(
      range(claims_result["vocab_size"] - 3, claims_result["vocab_size"]))
  for name in names:
    assert phases[f"fever_{name}"]["result"]["steps"] == config.fever.num_train_steps
    assert phases[name]["result"]["steps"] == config.worlds.default.rag.num_train_steps

  markdown = (tmp_path / "report.md").read_text()
  for title in ("Table 1", "Table 6", "FEVER-like", "Hot-swap 2x2", "Figure 3"):
    assert title in markdown, title
  for name in names:
    fe = fv["rows"][name]
    paper = fever.PAPER_TABLE6_FEVER3[fe["retriever"]]
    assert f"| {fe['row']} | {100 * fe['accuracy']:.1f} | " in markdown
    assert markdown.count(f"| {paper} |") >= 2  # RAG-Sequence and RAG-Token share it.
