"""ScaNN's search width tuned to a target recall: checked against numpy brute force."""

import json

import numpy as np
import pytest
import torch
from transformers import DPRConfig, DPRQuestionEncoder

from rag_jax.commands import build_index, tune_index
from rag_jax.retrieval.backends import load_index
from rag_jax.retrieval.calibrate import (
  CalibrationError,
  CalibrationSpec,
  calibrate_built_index,
  exact_topk,
  load_queries,
)
from rag_jax.retrieval.corpus import Passage
from rag_jax.retrieval.embeddings import save_embeddings
from rag_jax.retrieval.index import IndexDimensionError
from rag_jax.retrieval.pipeline import build_from_corpus
from rag_jax.retrieval.retriever import Retriever
from rag_jax.retrieval.scann_index import ScannConfig, ScannIndex
from rag_jax.retrieval.synthetic import clustered_embeddings
from rag_jax.utils.errors import InputError, InputNotFoundError, NonFiniteError, UserError
from tests.test_retrieval_embeddings import write_dpr_pickles
from tests.test_retrieval_encode import save_tokenizer
from tests.test_retrieval_scann import recall_at


def brute_force_ids(queries, db, k):
  """The oracle: a full argsort of every inner product (equal scores in row order)."""
  return np.argsort(-(queries @ db.T), axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def data():
  db, queries = clustered_embeddings(30_000, 64, 300, 400, seed=1)
  return db, queries, brute_force_ids(queries, db, 100)


@pytest.fixture(scope="module")
def index(data):
  return ScannIndex.build(data[0], ScannConfig(training_threads=2), progress=False)


def recall_with(index, queries, truth, width, reorder=None):
  found = index.search(queries, 100, leaves_to_search=width, reorder=reorder)[1]
  return recall_at(found, truth, 100)


@pytest.mark.parametrize("rows_per_block", [1_000, 7_777, 50_000])
def test_exact_topk_equals_a_full_sort_for_arrays_and_stores(data, tmp_path, rows_per_block):
  db, queries, truth = data
  scores, ids = exact_topk(queries[:50], db, 100, rows_per_block=rows_per_block)
  np.testing.assert_array_equal(ids, truth[:50])
  np.testing.assert_allclose(scores, np.take_along_axis(queries[:50] @ db.T, truth[:50], 1),
                             rtol=1e-6)
  # Shards of 4,096 rows: blocks and shards both cut the rows at other places.
  store = save_embeddings(db, tmp_path / f"emb{rows_per_block}", shard_size=4_096)
  _, from_store = exact_topk(queries[:50], store, 100, rows_per_block=rows_per_block)
  np.testing.assert_array_equal(from_store, truth[:50])


@pytest.mark.parametrize("target", [0.9, 0.98])
def test_the_setting_found_reaches_the_target_with_the_fewest_leaves(data, index, target):
  _, queries, truth = data
  sample, sample_truth = queries[:200], truth[:200]
  found = index.calibrate(sample, target, 100)
  width, reorder = found.leaves_to_search, found.reorder
  assert (index.config.leaves_to_search, index.config.reorder) == (width, reorder)
  # Independently: numpy's truth and the plain recall@100 of ScaNN's own results.
  assert recall_with(index, sample, sample_truth, width, reorder) >= target
  assert width == 1 or recall_with(index, sample, sample_truth, width - 1, reorder) < target
  assert found.recall == pytest.approx(recall_with(index, sample, sample_truth, width, reorder))
  # Every timed candidate (one per reorder size kept) reaches the target with its fewest leaves;
  # the fastest of them is chosen. Sizes are 1.5, 2, 3, 4 x k and the index's 400.
  assert {r for _, r, _ in found.timed} <= {150, 200, 300, 400} and len(found.timed) >= 1
  for w, r, _ in found.timed:
    assert recall_with(index, sample, sample_truth, w, r) >= target
    assert w == 1 or recall_with(index, sample, sample_truth, w - 1, r) < target
  assert found.queries_per_s == max(qps for _, _, qps in found.timed)
  # The default search now uses it; held-out queries land close to the target.
  assert recall_at(index.search(queries[200:], 100)[1], truth[200:], 100) >= target - 0.02


def test_a_fixed_reorder_needs_more_leaves_for_a_higher_target(data, index):
  _, queries, truth = data
  low = index.calibrate(queries[:200], 0.9, 100, truth=truth[:200], reorders=(400,))
  high = index.calibrate(queries[:200], 0.99, 100, truth=truth[:200], reorders=(400,))
  assert low.reorder == high.reorder == 400 and len(low.timed) == 1
  assert 1 <= low.leaves_to_search < high.leaves_to_search <= index.config.num_leaves
  with pytest.raises(ValueError, match=r"truth has shape \(200, 10\); expected \(200, 100\)"):
    index.calibrate(queries[:200], 0.9, 100, truth=truth[:200, :10])
  with pytest.raises(ValueError, match=r"reorder sizes \(400, 50\) must be >= k=100"):
    index.calibrate(queries[:200], 0.9, 100, reorders=(50, 400))


def test_an_unreachable_target_names_the_recall_and_the_remedy(data, index):
  _, queries, truth = data
  best = recall_with(index, queries[:100], truth[:100], index.config.num_leaves, 100)
  assert best < 1.0  # approximate scoring loses some true neighbours before the reorder
  with pytest.raises(CalibrationError, match=r"with all 346 leaves searched, below the target "
                     r"1.0: raise the reorder \(now at most 100\)"):
    index.calibrate(queries[:100], 1.0, 100, reorders=(100,))
  with pytest.raises(ValueError, match=r"target_recall must lie in \(0, 1\]"):
    index.calibrate(queries[:100], 1.5, 100)


def test_brute_force_indexes_have_nothing_to_tune(data):
  db, queries, _ = data
  small = ScannIndex.build(db[:5_000], progress=False)
  with pytest.raises(ValueError, match="no search width to tune"):
    small.calibrate(queries[:10], 0.9, 10)
  assert calibrate_built_index(small, CalibrationSpec(0.9, k=10)) is None


def test_the_calibration_is_saved_and_loaded_with_the_index(data, index, tmp_path):
  _, queries, truth = data
  found = index.calibrate(queries[:200], 0.95, 100)
  index.save(tmp_path / "ix")
  meta = json.loads((tmp_path / "ix" / "index.json").read_text())
  assert meta["config"]["leaves_to_search"] == found.leaves_to_search
  assert meta["calibration"]["target_recall"] == 0.95
  loaded = load_index(tmp_path / "ix")
  assert loaded.calibration == found
  assert (loaded.config.leaves_to_search, loaded.config.reorder) == (found.leaves_to_search,
                                                                     found.reorder)
  np.testing.assert_array_equal(
      loaded.search(queries[:50], 100)[1],
      index.search(queries[:50], 100, leaves_to_search=found.leaves_to_search,
                   reorder=found.reorder)[1])


def test_query_files_are_checked_and_named(data, index, tmp_path):
  _, queries, _ = data
  with pytest.raises(InputNotFoundError, match="missing.npy: no such query file"):
    load_queries(str(tmp_path / "missing.npy"))
  np.save(tmp_path / "objects.npy", np.array([{"q": 1}], dtype=object))
  with pytest.raises(InputError, match="objects.npy: not a numeric .npy array"):
    load_queries(str(tmp_path / "objects.npy"))
  np.save(tmp_path / "flat.npy", np.ones(64, np.float32))
  with pytest.raises(InputError, match=r"flat.npy: expected a \(num_queries, dim\) float array"):
    load_queries(str(tmp_path / "flat.npy"))
  bad = queries[:5].copy()
  bad[3, 7] = np.nan
  np.save(tmp_path / "nan.npy", bad)
  with pytest.raises(NonFiniteError, match="nan.npy: row 3 holds NaN or inf"):
    load_queries(str(tmp_path / "nan.npy"))
  np.save(tmp_path / "wide.npy", np.ones((4, 32), np.float32))
  spec = CalibrationSpec(0.9, queries=load_queries(str(tmp_path / "wide.npy")),
                         source=str(tmp_path / "wide.npy"))
  with pytest.raises(IndexDimensionError, match="wide.npy: queries have dim 32"):
    calibrate_built_index(index, spec)


@pytest.fixture(scope="module")
def dpr_files(data, tmp_path_factory):
  """DPR's published formats (psgs_w100.tsv, wikipedia_passages_*.pkl) of the 30k passages."""
  db, queries, _ = data
  root = tmp_path_factory.mktemp("dpr")
  with open(root / "psgs_w100.tsv", "w", encoding="utf-8") as f:
    f.write("id\ttext\ttitle\n")
    f.writelines(f"{i + 1}\tpassage number {i + 1}\tTitle {i % 97}\n" for i in range(len(db)))
  pickles = write_dpr_pickles(root, db, [str(i + 1) for i in range(len(db))], [12_000, 18_000])
  np.save(root / "questions.npy", queries[:200])
  return root, pickles


def test_build_index_command_calibrates_on_given_questions(data, dpr_files, tmp_path, capsys):
  """build_index --target_recall on a question file: the saved width is the smallest reaching
  the target for those questions."""
  _, queries, truth = data
  root, pickles = dpr_files
  argv = [f"--corpus={root / 'psgs_w100.tsv'}", f"--out={tmp_path / 'built'}",
          f"--dpr_embeddings={','.join(map(str, pickles))}", "--allow_pickle", "--quiet",
          "--target_recall=0.97", f"--calibration_queries={root / 'questions.npy'}"]
  assert build_index.main(argv) == 0
  printed = capsys.readouterr().out
  index = load_index(tmp_path / "built" / "index")
  width = index.config.leaves_to_search
  reorder = index.config.reorder
  assert (f"leaves_to_search: {width} of 346 leaves" in printed and f"reorder {reorder} reach"
          in printed and "(target 0.97) on 200 queries" in printed), printed
  assert recall_with(index, queries[:200], truth[:200], width, reorder) >= 0.97
  assert recall_with(index, queries[:200], truth[:200], width - 1, reorder) < 0.97

  assert build_index.main([*argv[:-2], f"--calibration_queries={root / 'questions.npy'}"]) == 2
  assert "--calibration_queries needs --target_recall" in capsys.readouterr().err
  assert build_index.main([*argv, "--index=exact"]) == 2
  assert "--target_recall tunes a ScaNN index's search width" in capsys.readouterr().err
  # Refused before any stage runs: the index built above is untouched.
  assert load_index(tmp_path / "built" / "index").config.leaves_to_search == width


def test_tune_index_command_on_questions_through_the_question_encoder(data, dpr_files, tmp_path,
                                                                      capsys):
  """tune_index on a built directory: questions embedded by a DPR question encoder (checked
  against transformers'), only index.json rewritten, the width minimal for those questions."""
  db, _, _ = data
  root, pickles = dpr_files
  out = tmp_path / "built"
  build_from_corpus(root / "psgs_w100.tsv", out, dpr_embeddings=[str(p) for p in pickles],
                    allow_pickle=True, progress=False)
  questions = [f"where is title {i} and passage {3 * i + 1}" for i in range(150)]
  (tmp_path / "q.qa.csv").write_text("".join(f"{q}\t['x']\n" for q in questions))
  tokenizer = save_tokenizer(tmp_path / "qenc", [Passage("1", "t", " ".join(questions))])
  torch.manual_seed(0)
  encoder = DPRQuestionEncoder(DPRConfig(
      vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=128, max_position_embeddings=64)).eval()
  encoder.save_pretrained(tmp_path / "qenc")
  scann_files = {p: p.stat().st_mtime_ns for p in (out / "index" / "scann").iterdir()}
  before = load_index(out / "index").config.leaves_to_search

  assert tune_index.main([f"--dir={out}", f"--question_encoder={tmp_path / 'qenc'}",
                          f"--questions={tmp_path / 'q.qa.csv'}", "--target_recall=0.9",
                          "--reorders=400,300", "--quiet"]) == 0
  printed = capsys.readouterr().out
  index = load_index(out / "index")
  width = index.config.leaves_to_search
  assert index.config.reorder in (300, 400)
  assert (f"leaves_to_search: {width} of 346 leaves" in printed
          and f"was {before} leaves, reorder 400" in printed), printed
  assert index.calibration.queries == 150 and index.calibration.target_recall == 0.9
  assert {p: p.stat().st_mtime_ns for p in (out / "index" / "scann").iterdir()} == scann_files

  retriever = Retriever.load(out, tmp_path / "qenc")
  queries = retriever.embed(*retriever.tokenize(questions))
  with torch.no_grad():
    t = tokenizer(questions, padding=True, return_tensors="pt")
    ref = encoder(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                  token_type_ids=torch.zeros_like(t["input_ids"])).pooler_output.numpy()
  np.testing.assert_allclose(queries, ref, atol=1e-4)
  truth = brute_force_ids(queries, db, 100)
  assert recall_with(index, queries, truth, width) >= 0.9
  assert width == 1 or recall_with(index, queries, truth, width - 1) < 0.9

  assert tune_index.main([f"--dir={out}", f"--question_encoder={tmp_path / 'qenc'}",
                          f"--questions={tmp_path / 'none.txt'}"]) == 1
  assert "none.txt: no such questions file" in capsys.readouterr().err
  assert tune_index.main([f"--dir={out}", f"--question_encoder={tmp_path / 'qenc'}",
                          f"--questions={tmp_path / 'q.qa.csv'}", "--reorders=200,lots"]) == 2
  assert "--reorders: expected whole numbers, got 200,lots" in capsys.readouterr().err
  # Refused before anything is read (here a missing questions file is not even looked at).
  assert tune_index.main([f"--dir={out}", f"--question_encoder={tmp_path / 'qenc'}",
                          f"--questions={tmp_path / 'none.txt'}", "--reorders=lots"]) == 2
  assert "--reorders: expected whole numbers, got lots" in capsys.readouterr().err
  assert tune_index.main([f"--dir={out}", f"--question_encoder={tmp_path / 'qenc'}",
                          f"--questions={tmp_path / 'q.qa.csv'}", "--k=30001"]) == 1
  assert capsys.readouterr().err == (f"error: --k=30001: more than the 30000 passages of "
                                     f"{out / 'index'}\n")
  build_from_corpus(root / "psgs_w100.tsv", out, dpr_embeddings=[str(p) for p in pickles],
                    allow_pickle=True, index_type="exact", progress=False)
  assert tune_index.main([f"--dir={out}", f"--question_encoder={tmp_path / 'qenc'}",
                          f"--questions={tmp_path / 'q.qa.csv'}"]) == 1
  assert "index is an exact index; only a ScaNN index" in capsys.readouterr().err

  # An index under ScaNN's partitioning size (20,000 rows) is scored exactly, every row: there is
  # nothing to tune, and it is said in one line, before any question is embedded (the old
  # command embedded them, then failed with a ValueError traceback in calibrate_search).
  small = tmp_path / "small"
  (small / "pickles").mkdir(parents=True)
  (small / "psgs_w100.tsv").write_text(
      "id\ttext\ttitle\n" + "".join(f"{i + 1}\tpassage {i + 1}\tTitle\n" for i in range(50)))
  small_pickles = write_dpr_pickles(small / "pickles", db[:50], [str(i + 1) for i in range(50)],
                                    [50])
  build_from_corpus(small / "psgs_w100.tsv", small / "kb", allow_pickle=True,
                    dpr_embeddings=[str(p) for p in small_pickles], progress=False)
  assert tune_index.main([f"--dir={small / 'kb'}", f"--question_encoder={tmp_path / 'qenc'}",
                          f"--questions={tmp_path / 'q.qa.csv'}", "--k=10"]) == 1
  assert capsys.readouterr().err == (
      f"error: {small / 'kb' / 'index'} holds 50 passages, under the 20000 from which ScaNN "
      "partitions an index: it scores every passage exactly (recall 1.0 against exact search), "
      "so it has no search width to tune; nothing was changed\n")


def test_question_files_plain_or_dpr_csv(tmp_path):
  (tmp_path / "q.txt").write_text("who wrote hamlet\n\n  where is rome  \n")
  assert tune_index.read_questions(str(tmp_path / "q.txt")) == ["who wrote hamlet", "where is rome"]
  # DPR's format as its files are written: csv quoting, the answers a Python list.
  (tmp_path / "dev.qa.csv").write_text('"say ""hi"" in french"\t[\'salut\']\nriver\t[\'nile\']\n')
  assert tune_index.read_questions(str(tmp_path / "dev.qa.csv")) == ['say "hi" in french', "river"]
  (tmp_path / "bad.qa.csv").write_text("river\t['nile']\nno answers here\n")
  with pytest.raises(UserError, match=r"bad.qa.csv.*2.*expected 2 tab-separated fields"):
    tune_index.read_questions(str(tmp_path / "bad.qa.csv"))
  for name in ("none.qa.csv", "none.txt"):
    with pytest.raises(InputNotFoundError, match=f"{name}: no such questions file"):
      tune_index.read_questions(str(tmp_path / name))
  (tmp_path / "blank.txt").write_text("\n \n")
  with pytest.raises(InputError, match="blank.txt: no questions in the file"):
    tune_index.read_questions(str(tmp_path / "blank.txt"))
