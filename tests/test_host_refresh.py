"""config.index_refresh = "scheduled" over a host-searched index (rag_jax.training.host_refresh):
the refreshed index equals the context encoder's forward with the parameters of the step that
refreshed; a host-searched run trains as the device-refreshed one does (same passages, losses to
float32 rounding); a ScaNN run killed and resumed equals the uninterrupted one; the index on
disk is never written. tests/test_rag_trainer.py's corpus and models, 8 CPU devices."""

import json
import logging

import numpy as np
import pytest
import torch
import transformers

from rag_jax.answer import RagAnswerer
from rag_jax.checkpoints import load_pretrained
from rag_jax.evaluation.paper import own_index
from rag_jax.retrieval.backends import load_index
from rag_jax.retrieval.pipeline import build_from_corpus
from rag_jax.retrieval.refresh import parse_schedule, refresh_due
from rag_jax.retrieval.store import PassageStore
from rag_jax.training import config_check, rag_trainer
from rag_jax.training.host_refresh import last_refresh_before
from tests.test_index_refresh_training import (
  MAX_LENGTH,
  checkpoint,
  config_for,
  disk_digest,
  host_index,
)
from tests.test_rag_trainer import PEOPLE, setup  # noqa: F401  (setup: the module fixture)

SCHEDULE = "0-10:4"  # refreshes before steps 0, 4 and 8


def records(workdir):
  return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("spec", ["0-10:4", "3", "2-7:2,9-30:5", "-1"])
def test_last_refresh_before_is_the_schedule_replayed(spec):
  schedule = parse_schedule(spec)
  for step in range(40):
    due = [s for s in range(step) if refresh_due(schedule, s)]
    assert last_refresh_before(schedule, step) == (due[-1] if due else None)


def test_the_host_index_refreshed_holds_the_encoder_of_its_step(setup, tmp_path):  # noqa: F811
  """The index refreshed before step 8 holds the context encoder of step 8's checkpoint,
  encoded by its full forward on the host (not the refresher's [CLS]-only bucketed one)."""
  root, dirs = setup
  before = disk_digest(root)
  report = rag_trainer.train_and_evaluate(
      config_for(root, dirs, "scheduled", refresh_schedule=SCHEDULE, retrieval="host",
                 checkpoint_every=4), str(tmp_path / "run"))
  assert report["retrieval"] == "host"
  assert report["refreshed_index"] == str(tmp_path / "run" / "refreshed_index" / "step-8")
  got = load_index(report["refreshed_index"]).embeddings(np.arange(len(PEOPLE)))
  expected = host_index(root, dirs, checkpoint(tmp_path / "run", 8)["params"]["ctx_encoder"])
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
  initial = host_index(root, dirs, load_pretrained(dirs["context"])[1])
  assert np.abs(expected - initial).max() > 1e-3  # the encoder moved: a stale index shows
  assert disk_digest(root) == before
  check_exported_index(tmp_path / "run" / "export", root / "kb")


def check_exported_index(export, kb):
  """export/index: every passage encoded by transformers' DPRContextEncoder loaded from
  export/ctx_encoder, the store's passages, an index of the original's kind, and what
  evaluate.py searches for that checkpoint."""
  store = PassageStore(kb / "passages")
  titles, texts = store.titles_and_texts(0, len(store))
  tokenizer = transformers.AutoTokenizer.from_pretrained(export / "ctx_encoder")
  encoder = transformers.DPRContextEncoder.from_pretrained(export / "ctx_encoder").eval()
  inputs = tokenizer(titles, texts, max_length=MAX_LENGTH, truncation=True, padding=True,
                     return_tensors="pt")
  with torch.no_grad():  # token types left out, as use_own_knowledge_dataset.py embeds
    expected = encoder(input_ids=inputs["input_ids"],
                       attention_mask=inputs["attention_mask"]).pooler_output.numpy()
  index = load_index(export / "index" / "index")
  assert index.kind == load_index(kb / "index").kind
  np.testing.assert_allclose(index.embeddings(np.arange(len(store))), expected, atol=1e-5,
                             rtol=0)
  exported = PassageStore(export / "index" / "passages")
  assert exported.titles_and_texts(0, len(store)) == (titles, texts)
  assert own_index(str(export)) == str(export / "index")


@pytest.mark.slow  # the host run's refreshed rows are checked above; this adds the device twin
def test_host_refresh_trains_as_the_device_refresh(setup, tmp_path):  # noqa: F811
  root, dirs = setup
  reports = {mode: rag_trainer.train_and_evaluate(
      config_for(root, dirs, "scheduled", refresh_schedule=SCHEDULE, retrieval=mode,
                 checkpoint_every=4), str(tmp_path / mode)) for mode in ("device", "host")}
  got = load_index(reports["host"]["refreshed_index"]).embeddings(np.arange(len(PEOPLE)))
  device_rows = checkpoint(tmp_path / "device", 10)["index"]["embeddings"][:len(PEOPLE)]
  np.testing.assert_allclose(got, device_rows, atol=1e-5, rtol=0)
  for a, b in zip(records(tmp_path / "device"), records(tmp_path / "host"), strict=True):
    assert a["step"] == b["step"]
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
  np.testing.assert_allclose(reports["host"]["val_loss"], reports["device"]["val_loss"],
                             rtol=1e-5)


def test_a_killed_scann_run_resumes_with_its_refreshed_index(setup, tmp_path,  # noqa: F811
                                                             caplog):
  """Killed after step 6 (checkpoint 5, refreshes before 0 and 4 done): the rerun loads the
  index refreshed before step 4, refreshes before step 8 as the uninterrupted run does, and ends
  with the same figures; refreshed indexes no checkpoint needs are deleted."""
  root, dirs = setup
  build_from_corpus(root / "corpus.tsv", tmp_path / "kb", encoder=str(dirs["context"]),
                    fmt="tsv", split_words=None, index_type="scann", progress=False)
  config = config_for(root, dirs, "scheduled", refresh_schedule=SCHEDULE, retrieval="host",
                      index_dir=str(tmp_path / "kb"), keep_checkpoints=1)
  full = rag_trainer.train_and_evaluate(config, str(tmp_path / "full"))
  killed = tmp_path / "killed"
  assert rag_trainer.train_and_evaluate(config, str(killed), stop_after=6) is None
  assert sorted(p.name for p in (killed / "refreshed_index").iterdir()) == ["step-0", "step-4"]
  resumed = rag_trainer.train_and_evaluate(config, str(killed))
  assert resumed["val_loss"] == full["val_loss"]
  figures = ("step", "loss", "top_doc_prior", "val_loss")
  assert ([{k: r[k] for k in figures if k in r} for r in records(tmp_path / "full")]
          == [{k: r[k] for k in figures if k in r} for r in records(killed)])
  # At the refresh before step 8 the kept checkpoint was step 5's, resuming with step 4's index.
  assert sorted(p.name for p in (killed / "refreshed_index").iterdir()) == ["step-4", "step-8"]
  a, b = (load_index(run / "refreshed_index" / "step-8") for run in (tmp_path / "full", killed))
  assert a.kind == "scann"
  check_exported_index(killed / "export", tmp_path / "kb")
  with caplog.at_level(logging.WARNING, logger="rag_jax.answer"):
    RagAnswerer(killed / "export", killed / "export" / "index")
    assert not caplog.records
    RagAnswerer(killed / "export", tmp_path / "kb")
  assert "stale for this question encoder" in caplog.text
  np.testing.assert_array_equal(a.embeddings(np.arange(len(PEOPLE))),
                                b.embeddings(np.arange(len(PEOPLE))))


def test_rolling_refresh_of_a_host_index_is_refused(setup, tmp_path):  # noqa: F811
  root, dirs = setup
  config = config_for(root, dirs, "rolling", retrieval="host")
  with pytest.raises(config_check.ConfigError, match=r"only 'scheduled' refreshes a "
                     r"host-searched index"):
    rag_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
