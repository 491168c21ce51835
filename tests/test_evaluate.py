"""evaluate.py and rag_jax.evaluation on tiny models and a tiny corpus.

The reference for the answers is a pipeline of transformers' PyTorch classes (DPR encoders,
numpy brute-force top-k, the reference's context strings, RagTokenForGeneration /
RagSequenceForGeneration `generate`) on checkpoint directories saved by transformers; the
reference for every metric is a recomputation in this file from the written predictions.jsonl.
"""

import csv
import json
import os
import shutil
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from configs import paper_nq
from rag_jax import answer as answer_lib
from rag_jax.evaluation import loop, paper, runner
from rag_jax.training import rag_trainer
from rag_jax.utils.errors import InputError
from tests import pipeline_reference as pref

ROOT = Path(__file__).resolve().parents[1]
N_DOCS, MAX_COMBINED, MAX_LENGTH = 3, 32, 10
TITLES = ["Alba", "Brio", '"Cora"', "Dune", "Elm", "Fig", "Gale", "Hub"]
TEXTS = [f"{t.strip(chr(34)).lower()} is near the {w} river and makes {c} goods ."
         for t, w, c in zip(TITLES, ["north", "south", "east", "west"] * 2,
                            ["iron", "silk", "salt", "wool", "tin", "oil", "rice", "wine"],
                            strict=True)]
QUESTIONS = ["what does alba make ?", "which river is gale near ?", "what does fig make ?",
             "where is dune ?", "what does hub make ?"]
GOLD = [["iron"], ["west"], ["oil", "fig oil"], ["west river"], ["wine"]]


# --------------------------------------------------------------------------- the loop alone


def test_loop_pads_batches_resumes_after_a_kill_and_refuses_another_file(tmp_path):
  examples = [loop.EvalExample(f"q{i}", (f"a{i}",)) for i in range(7)]
  calls = []

  def predict(batch):
    calls.append([e.question for e in batch])
    return [{"prediction": e.question.replace("q", "a") if e.question != "q4" else "x"}
            for e in batch]

  def correct(p, e):
    return p in e.answers

  whole = loop.run_loop(examples, predict, tmp_path / "whole.jsonl", 3, correct=correct,
                        progress=False)
  assert [len(c) for c in calls] == [3, 3, 3]  # fixed shape: the last batch is padded
  assert calls[-1] == ["q6", "q6", "q6"]
  assert [r["correct"] for r in whole] == [i != 4 for i in range(7)]

  # A kill after the first batch, in the middle of writing the second one.
  calls.clear()
  path = tmp_path / "killed.jsonl"
  lines = (tmp_path / "whole.jsonl").read_text().splitlines(keepends=True)
  path.write_text("".join(lines[:3]) + lines[3][:10])
  resumed = loop.run_loop(examples, predict, path, 3, correct=correct, progress=False)
  assert calls == [["q3", "q4", "q5"], ["q6", "q6", "q6"]]
  assert path.read_text() == (tmp_path / "whole.jsonl").read_text()
  assert resumed == whole

  with pytest.raises(ValueError, match=r"killed\.jsonl:1: written for question 'q0', not 'z'"):
    loop.run_loop([loop.EvalExample("z", ("a",))] * 7, predict, path, 3, progress=False)


@pytest.mark.parametrize("garbled", [b'{"index": 1, "quest\n', b"\xff\xfe\n", b"[1, 2]\n",
                                     b'{"index": 1, "answers": "Obama"}\n'])
def test_a_garbled_prediction_line_is_named_and_kept(tmp_path, garbled):
  """A complete line that is not a record (a damaged file, not a kill: the loop writes whole
  lines) is refused by file:line, and the file is left as it was."""
  path = tmp_path / "predictions.jsonl"
  good = b'{"index": 0, "question": "q0", "prediction": "a0"}\n'
  path.write_bytes(good + garbled + good.replace(b"0", b"2"))
  with pytest.raises(ValueError, match=rf"^{path}:2: (not a prediction record \(|answers )"):
    loop.run_loop([loop.EvalExample(f"q{i}", ("a",)) for i in range(4)],
                  lambda batch: [{"prediction": "x"}] * len(batch), path, 2, progress=False)
  assert path.read_bytes() == good + garbled + good.replace(b"0", b"2")


# --------------------------------------------------------------------------- tiny RAG world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A corpus indexed by the retrieval pipeline; RAG-Token / RAG-Sequence checkpoints saved by
  transformers (question encoder = the passage encoder's weights); the DPR passage encoder."""
  return pref.build_world(tmp_path_factory.mktemp("evaluate"), TITLES, TEXTS, QUESTIONS, N_DOCS,
                          MAX_COMBINED)


def torch_pipeline(world, kind, n_docs=N_DOCS, **generate_kwargs):
  """(top rows [Q, n], doc scores [Q, n], answers) from transformers and numpy only."""
  return pref.torch_pipeline(world, kind, TITLES, TEXTS, QUESTIONS, n_docs, **generate_kwargs)


def squad_normalize(text):
  """SQuAD v1.1's normalization, written out again for the recomputation."""
  text = "".join(c for c in text.lower() if c not in set(string.punctuation))
  return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def nq_config(world, kind, test_file, **overrides):
  """configs/paper_nq.py pointed at the tiny checkpoint, index and a DPR qa.csv."""
  root, *_, models = world
  config = paper_nq.get_config()
  config.model_type = f"rag_{kind}"
  config.rag_checkpoint = str(models[kind][1])
  config.index_dir = str(root / "kb")
  config.eval.test_file = str(test_file)
  config.eval.max_length = MAX_LENGTH
  config.eval.batch_size = 2  # 5 questions: the last batch is padded
  config.eval.recall_ks = (1, 2, 5, 100)
  config.eval[config.model_type].n_docs = N_DOCS
  for key, value in overrides.items():
    config.eval[key] = value
  return config


def write_qa_csv(path, answers):
  with open(path, "w", newline="") as f:
    csv.writer(f, delimiter="\t", lineterminator="\n").writerows(
        (q, repr(a)) for q, a in zip(QUESTIONS, answers, strict=True))
  return path


@pytest.mark.parametrize("kind", ["token", "sequence"])
def test_paper_config_answers_equal_transformers_and_metrics_recompute(world, tmp_path, kind):
  """evaluate.py's answers are transformers' generate answers here: these generator contexts
  fill max_combined_length, with no padding (where contexts have some, RAG-Sequence's answers
  are those of transformers' loop given the mask in its beam search: tests/test_answer.py)."""
  rows, doc_scores, expected = torch_pipeline(world, kind, max_length=MAX_LENGTH)
  # Gold answers: transformers' own answers (in another case, with an article and punctuation)
  # for questions 0 and 2, words the tiny model does not say for the others.
  gold = [[f"The {expected[0].upper()}."], [f"zzz {expected[1]}".strip()], ["qqq", expected[2]],
          ["west river"], ["wine"]]
  config = nq_config(world, kind, write_qa_csv(tmp_path / "nq-test.qa.csv", gold))
  (run,) = paper.paper_runs(config, tmp_path)
  (result,) = runner.evaluate([run], tmp_path, progress=False)
  folder = tmp_path / "eval" / f"nq-rag_{kind}-test"
  records = [json.loads(x) for x in (folder / "predictions.jsonl").read_text().splitlines()]
  assert [r["prediction"] for r in records] == expected
  assert runner.load_answerer(run).generator_inputs(QUESTIONS)[2].all()  # no padding
  assert [r["question"] for r in records] == QUESTIONS
  assert [r["answers"] for r in records] == gold
  for i, r in enumerate(records):
    assert r["titles"] == [TITLES[j] for j in rows[i]]
    np.testing.assert_allclose(r["doc_scores"], doc_scores[i], rtol=1e-5, atol=1e-5)
    assert r["decoder"]["architecture"] == type(world[4][kind][0]).__name__
  em = [max(squad_normalize(p) == squad_normalize(g) for g in golds)
        for p, golds in zip(expected, gold, strict=True)]
  assert [r["correct"] for r in records] == em
  assert em[0] and em[2] or expected[0] == ""  # the test holds right answers
  written = json.loads((folder / "metrics.json").read_text())
  assert written == result
  assert written["metrics"]["exact_match"] == pytest.approx(np.mean(em))

  def f1(p, g):
    p, g = squad_normalize(p).split(), squad_normalize(g).split()
    same = sum(min(p.count(w), g.count(w)) for w in set(p))
    return 0.0 if same == 0 else 2 * same / (len(p) + len(g))

  f1s = [max(f1(p, g) for g in golds) for p, golds in zip(expected, gold, strict=True)]
  assert 0 < f1s[1] < 1 or expected[1] == ""  # a partial answer
  assert written["metrics"]["token_f1"] == pytest.approx(np.mean(f1s))
  assert written["reference"]["exact_match"] == {"token": 0.441, "sequence": 0.445}[kind]
  table = (folder / "table.md").read_text()
  paper_em = 100 * written["reference"]["exact_match"]
  assert f"| exact_match | {100 * np.mean(em):.2f} | {paper_em:.2f} |" in table


def test_evaluate_py_retrieval_only_docs_sweep_and_resume(world, tmp_path, monkeypatch):
  """evaluate.py itself (a subprocess) in the retrieval-only mode; the Figure-3 sweep in the
  same workdir, then extended (its finished point read, not answered again); the other order
  in another workdir (the docs sweep's retrieval deepened by --retrieval_only, a kill in the
  middle resumed); a killed evaluation resumed to the same file; other settings refused."""
  root, *_, models = world
  test_file = write_qa_csv(tmp_path / "nq-test.qa.csv", GOLD)
  flags = [f"--config.{k}={v}" for k, v in {
      "model_type": "rag_token", "rag_checkpoint": models["token"][1],
      "index_dir": root / "kb", "eval.test_file": test_file, "eval.batch_size": 2,
      "eval.max_length": MAX_LENGTH, "eval.rag_token.n_docs": N_DOCS,
      "eval.recall_ks": "(1,2,5,100)"}.items()]
  proc = subprocess.run([sys.executable, "evaluate.py", "--config=configs/paper_nq.py",
                         f"--workdir={tmp_path}", "--retrieval_only", *flags], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  folder = tmp_path / "eval" / "nq-rag_token-test"
  retrieval = {f: (folder / "retrieval" / f).read_bytes()
               for f in ("predictions.jsonl", "metrics.json", "settings.json")}
  written = json.loads(retrieval["metrics.json"])["metrics"]
  rows, _, _ = torch_pipeline(world, "token", n_docs=len(TITLES), max_length=MAX_LENGTH)
  has = [[any(contains(TEXTS[j], g) for g in gold) for j in row]
         for gold, row in zip(GOLD, rows, strict=True)]
  # recall@100 is left out: the index holds 8 passages.
  assert written == {f"recall@{k}": pytest.approx(np.mean([any(h[:k]) for h in has]))
                     for k in (1, 2, 5)}
  assert "| recall@5 |" in proc.stdout

  # Figure 3 in the same workdir, at 1 doc, then extended to 1 and 3 docs: docs_1 is read, not
  # answered again; recall@K comes from the retrieval folder, which is left as it was.
  loaded = []

  def load_answerer(run):
    loaded.append(run.n_docs)
    return answer_lib.RagAnswerer(run.checkpoint, run.index_dir, n_docs=run.n_docs)

  monkeypatch.setattr(runner, "load_answerer", load_answerer)
  config = nq_config(world, "token", test_file)
  run = paper.paper_runs(config, tmp_path)
  runner.evaluate(run, tmp_path, docs=(1,), progress=False)
  docs_1 = (folder / "docs_1" / "predictions.jsonl").read_bytes()
  (sweep,) = runner.evaluate(run, tmp_path, docs=(3, 1), progress=False)
  assert loaded == [1, 3]
  assert (folder / "docs_1" / "predictions.jsonl").read_bytes() == docs_1
  assert {f: (folder / "retrieval" / f).read_bytes() for f in retrieval} == retrieval
  assert (folder / "figure3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  for row in json.loads((folder / "figure3.json").read_text()):
    k = row["docs"]
    records = loop.read_predictions(folder / f"docs_{k}" / "predictions.jsonl")
    assert {len(r["titles"]) for r in records} == {k}
    assert row["exact_match"] == pytest.approx(np.mean(
        [max(squad_normalize(r["prediction"]) == squad_normalize(g) for g in r["answers"])
         for r in records]))
    assert row["recall"] == pytest.approx(np.mean([any(h[:k]) for h in has]))
  assert [r["docs"] for r in sweep["rows"]] == [1, 3]
  assert json.loads((folder / "docs_1" / "metrics.json").read_text())["decoder"] == [
      f"RAG-Token, greedy, 1 doc, max_length {MAX_LENGTH}"]

  # The other order, in another workdir holding the same finished docs points: the sweep
  # retrieves the top 3, then --retrieval_only deepens that folder to the index's 8 passages
  # (cut by a kill after 2 questions, then resumed) and gives the same file and figures.
  other = tmp_path / "other" / "eval" / "nq-rag_token-test"
  for k in (1, 3):
    shutil.copytree(folder / f"docs_{k}", other / f"docs_{k}")
  runner.evaluate(run, tmp_path / "other", docs=(1, 3), progress=False)
  assert loaded == [1, 3]
  assert {len(r["titles"]) for r in loop.read_predictions(
      other / "retrieval" / "predictions.jsonl")} == {3}
  lines = retrieval["predictions.jsonl"].splitlines(keepends=True)
  (other / "retrieval" / "predictions.deeper.jsonl").write_bytes(b"".join(lines[:2])
                                                                + lines[2][:9])
  (again,) = runner.evaluate(run, tmp_path / "other", retrieval_only=True, progress=False)
  assert again["metrics"] == written
  deepened = loop.read_predictions(other / "retrieval" / "predictions.jsonl")
  first = [json.loads(line) for line in lines]
  assert [r["passage_ids"] for r in deepened] == [r["passage_ids"] for r in first]
  assert [r["has_answer"] for r in deepened] == [r["has_answer"] for r in first]
  assert not (other / "retrieval" / "predictions.deeper.jsonl").exists()

  # A kill in the middle of the 3-docs run: the next start resumes and writes the same file.
  path = folder / "docs_3" / "predictions.jsonl"
  full = path.read_text()
  path.write_text("".join(full.splitlines(keepends=True)[:2]) + full.splitlines()[2][:7])
  runner.evaluate(run, tmp_path, docs=(3, 1), progress=False)
  assert path.read_text() == full
  # Another checkpoint in the same folders is refused, in each mode.
  config.rag_checkpoint = str(models["sequence"][1])
  for mode in (dict(retrieval_only=True), dict(docs=(1,))):
    with pytest.raises(ValueError, match=r"other settings \(\['checkpoint'\] differ"):
      runner.evaluate(paper.paper_runs(config, tmp_path), tmp_path, progress=False, **mode)


def test_a_resumed_evaluation_keeps_its_search(world, tmp_path):
  """A folder begun on the host (exact float32 search) resumes on the devices with the same
  exact search and writes the same answers; a search that gives other passages and scores (bf16
  embeddings on the devices; on a real corpus, ScaNN on the host) is refused by name."""
  run, = paper.paper_runs(nq_config(world, "token", write_qa_csv(tmp_path / "qa.csv", GOLD)),
                          tmp_path)
  folder = tmp_path / "eval" / run.name
  host = runner.load_answerer(run)
  runner.answers_mode(run, folder, host, progress=False)
  path = folder / "predictions.jsonl"
  full = path.read_text()
  assert json.loads((folder / "settings.json").read_text())["search"] == "exact float32"

  path.write_text("".join(full.splitlines(keepends=True)[:2]))  # killed after 2 questions
  bf16 = answer_lib.RagAnswerer(run.checkpoint, run.index_dir, n_docs=run.n_docs,
                                retrieval="device", device_index_dtype="bfloat16")
  with pytest.raises(ValueError, match=r"\['search'\] differ; search: 'exact float32' there, "
                     r"'exact bfloat16' now"):
    runner.answers_mode(run, folder, bf16, progress=False)
  device = answer_lib.RagAnswerer(run.checkpoint, run.index_dir, n_docs=run.n_docs,
                                  retrieval="device")
  runner.answers_mode(run, folder, device, progress=False)
  got, want = loop.read_predictions(path), [json.loads(x) for x in full.splitlines()]
  assert got[:2] == want[:2]
  for g, w in zip(got, want, strict=True):  # the same answers; scores to float32 rounding
    assert {k: v for k, v in g.items() if "score" not in k} == {
        k: v for k, v in w.items() if "score" not in k}
    np.testing.assert_allclose(g["doc_scores"], w["doc_scores"], rtol=1e-5)
    np.testing.assert_allclose(g["score"], w["score"], rtol=1e-5, atol=1e-5)


def contains(text, answer):
  """DPR's has_answer on these lower-case, space-separated words: the answer's words in a row."""
  words, wanted = text.split(), answer.split()
  return any(words[i:i + len(wanted)] == wanted for i in range(len(words)))


def test_retrieval_only_scores_each_row_against_its_own_answers(world, tmp_path):
  """One question twice in a qa.csv, with other answers: each row's passages are scored
  against that row's answers, not the answers of another row with the same text."""
  rows = [(QUESTIONS[0], ["iron"]), (QUESTIONS[0], ["zzz"])]
  test_file = tmp_path / "nq-test.qa.csv"
  with open(test_file, "w", newline="") as f:
    csv.writer(f, delimiter="\t", lineterminator="\n").writerows((q, repr(a)) for q, a in rows)
  config = nq_config(world, "token", test_file, recall_ks=(1, len(TITLES)))
  (result,) = runner.evaluate(paper.paper_runs(config, tmp_path), tmp_path, retrieval_only=True,
                              progress=False)
  records = loop.read_predictions(
      tmp_path / "eval" / "nq-rag_token-test" / "retrieval" / "predictions.jsonl")
  for record, (_, answers) in zip(records, rows, strict=True):
    assert record["answers"] == answers
    assert record["has_answer"] == [any(contains(TEXTS[TITLES.index(t)], a) for a in answers)
                                    for t in record["titles"]]
  assert sum(records[0]["has_answer"]) == 1 and not any(records[1]["has_answer"])
  assert result["metrics"][f"recall@{len(TITLES)}"] == 0.5


def test_one_paper_config_trains_with_train_py_code_and_evaluates_its_export(world, tmp_path):
  """configs/paper_nq.py is a RAG trainer config: a few steps of rag_trainer in a workdir, then
  the evaluation of the same config in the same workdir evaluates that run's export."""
  root, *_, models = world
  data = tmp_path / "data"
  data.mkdir()
  for split in ("train", "val"):
    (data / f"{split}.source").write_text("\n".join(QUESTIONS * 2) + "\n")
    (data / f"{split}.target").write_text("\n".join(g[0] for g in GOLD * 2) + "\n")
  config = nq_config(world, "token", write_qa_csv(tmp_path / "nq-test.qa.csv", GOLD))
  config.data_dir = str(data)
  config.n_docs, config.max_combined_length = N_DOCS, MAX_COMBINED
  config.max_source_length, config.max_target_length = 16, 6
  config.batch_size, config.num_train_steps, config.warmup_steps = 8, 2, 1
  config.log_every = config.eval_every = config.checkpoint_every = 2
  config.retrieval = "host"
  workdir = tmp_path / "run"
  rag_trainer.train_and_evaluate(config, str(workdir))
  (run,) = paper.paper_runs(config, workdir)
  assert run.checkpoint == str(workdir / "export")
  (result,) = runner.evaluate([run], workdir, progress=False)
  assert result["decoder"] == [f"RAG-Token, greedy, {N_DOCS} docs, max_length {MAX_LENGTH}"]
  assert len(loop.read_predictions(workdir / "eval" / "nq-rag_token-test" / "predictions.jsonl")
             ) == len(QUESTIONS)


def test_evaluate_py_names_missing_inputs_in_one_line(tmp_path):
  """No finished run in the workdir, and a paper config without an index: one `error:` line
  each, exit 1, nothing written."""
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  cases = [(["--workdir", str(tmp_path / "no_run")],
            f"error: {tmp_path / 'no_run'}: no report.json; "),
           (["--config=configs/paper_nq.py", "--workdir", str(tmp_path / "nq")],
            "error: config.index_dir (or config.eval.index_dir) is empty; ")]
  for args, message in cases:
    proc = subprocess.run([sys.executable, "evaluate.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.startswith(message) and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
  assert not any(tmp_path.iterdir())


def test_bad_docs_flags_and_more_docs_than_the_index_holds_are_refused_before_any_work(
    world, tmp_path):
  """--docs that is not numbers, --docs with --retrieval_only, and a number of docs above the
  index's 8 passages: one named error each, before anything is loaded or written."""
  root, *_, models = world
  kb = root / "kb"
  with pytest.raises(InputError, match=r"^--docs=abc: expected positive whole numbers "):
    runner.ints("abc", "--docs")
  with pytest.raises(InputError, match=r"^--docs=5,0: expected positive whole numbers "):
    runner.ints("5,0", "--docs")
  config = nq_config(world, "token", write_qa_csv(tmp_path / "nq-test.qa.csv", GOLD))
  runs = paper.paper_runs(config, tmp_path)
  workdir = tmp_path / "work"
  with pytest.raises(InputError, match=r"^--docs and --retrieval_only: give one of them"):
    runner.evaluate(runs, workdir, retrieval_only=True, docs=(1,), progress=False)
  with pytest.raises(InputError, match=rf"^--docs=9: the index {kb} holds 8 passages; ask for "
                     "at most 8$"):
    runner.evaluate(runs, workdir, docs=(9, 1), progress=False)
  config.eval.rag_token.n_docs = 1000
  with pytest.raises(InputError, match=rf"^nq-rag_token-test: n_docs=1000: the index {kb} holds "
                     "8 passages"):
    runner.evaluate(paper.paper_runs(config, tmp_path), workdir, progress=False)
  assert not workdir.exists()


def test_a_damaged_settings_file_is_named_and_kept(tmp_path):
  """A settings.json cut by a crash: an error naming the file; nothing is overwritten."""
  (tmp_path / "settings.json").write_text('{"checkpoint": "ck')
  with pytest.raises(ValueError, match=r"settings.json: not a settings file"):
    runner.check_settings(tmp_path, {"checkpoint": "ck"})
  assert (tmp_path / "settings.json").read_text() == '{"checkpoint": "ck'
