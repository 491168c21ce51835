"""config.index_refresh in the RAG trainer (tests/test_rag_trainer.py's corpus and models, 8 CPU
devices): a rolling-refresh run killed and resumed equals the uninterrupted one, index state
included (read back from the orbax checkpoints); a scheduled run's last checkpoint holds the
index encoded on the host by the context encoder of the step that refreshed it; the index on
disk is never written; refresh fields that do not fit are named before the workdir is touched."""

import hashlib
import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import rag_finetune
from rag_jax.checkpoints import load_pretrained, load_tokenizer
from rag_jax.data.passage_table import load_or_build_encoder_table
from rag_jax.training import config_check, rag_trainer
from tests.test_rag_trainer import PEOPLE, setup  # noqa: F401  (setup: the module fixture)

MAX_LENGTH = 16


def config_for(root, dirs, mode, **fields):
  """test_rag_trainer's small run, training the context encoder, refreshed by `mode`."""
  config = rag_finetune.get_config()
  config.question_encoder_checkpoint = str(dirs["question"])
  config.generator_checkpoint = str(dirs["generator"])
  config.index_dir = str(root / "kb")
  config.data_dir = str(root / "data")
  config.n_docs = 2
  config.max_source_length, config.max_target_length, config.max_combined_length = 12, 5, 24
  config.batch_size = 8
  config.learning_rate = 5e-3
  config.warmup_steps = 2
  config.max_grad_norm = 1.0
  config.log_every = 5
  config.retrieval = "device"
  config.train_context_encoder = True
  config.context_encoder_checkpoint = str(dirs["context"])
  config.context_encoder_max_length = MAX_LENGTH
  config.group_learning_rates = {"ctx_encoder": 1e-2}
  config.num_train_steps = config.eval_every = 10
  config.checkpoint_every = 5
  config.index_refresh = mode
  for k, v in fields.items():
    config[k] = v
  return config


def checkpoint(workdir, step):
  """The saved train state of `step`, read back as numpy trees."""
  return ocp.StandardCheckpointer().restore((workdir / "checkpoints" / str(step) / "default")
                                            .absolute())


def disk_digest(root):
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted((root / "kb" / "index").rglob("*")) if p.is_file()}


def host_index(root, dirs, ctx_params):
  """Every passage encoded on the host by the context encoder's forward with `ctx_params`."""
  ctx_model, _ = load_pretrained(dirs["context"])
  table = load_or_build_encoder_table(root / "kb" / "passage_tables", None, len(PEOPLE),
                                      load_tokenizer(dirs["context"]), MAX_LENGTH)
  mask = (np.arange(table.width) < table.lengths[:, None]).astype(np.int32)
  return np.asarray(ctx_model.apply({"params": ctx_params}, table.tokens.astype(np.int32), mask)
                    .pooler_output)


def test_rolling_refresh_resumes_to_the_uninterrupted_index(setup, tmp_path):  # noqa: F811
  root, dirs = setup
  before = disk_digest(root)
  config = config_for(root, dirs, "rolling", refresh_rows_per_step=1)
  report = rag_trainer.train_and_evaluate(config, str(tmp_path / "full"))
  assert report["index_refresh"] == "rolling" and report["retrieval"] == "device"
  killed = tmp_path / "killed"
  assert rag_trainer.train_and_evaluate(config, str(killed), stop_after=7) is None
  resumed = rag_trainer.train_and_evaluate(config, str(killed))
  assert resumed["val_loss"] == report["val_loss"]
  records = [[json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
             for run in ("full", "killed")]
  figures = ("step", "loss", "staleness", "staleness_max", "val_loss")
  assert ([{k: r[k] for k in figures if k in r} for r in records[0]]
          == [{k: r[k] for k in figures if k in r} for r in records[1]])
  # 24 passages on 8 devices: 3 rows per shard, one refreshed per step: at most 2 steps old.
  assert 0 < records[0][-1]["staleness"] <= records[0][-1]["staleness_max"] <= 2
  full, again = checkpoint(tmp_path / "full", 10), checkpoint(killed, 10)
  jax.tree.map(np.testing.assert_array_equal, full["index"], again["index"])
  np.testing.assert_array_equal(full["index"]["encoded_at"], np.tile([9, 7, 8], 8))
  assert disk_digest(root) == before


@pytest.mark.slow  # the step-level tests in test_index_refresh.py cover it in CI
def test_scheduled_refresh_checkpoints_the_index_of_its_last_refresh(setup, tmp_path):  # noqa: F811
  """Schedule 0-10:4: refreshes before steps 0, 4 and 8; the checkpoint of step 8 holds the
  parameters that refreshed, the one of step 10 the index they encoded."""
  root, dirs = setup
  config = config_for(root, dirs, "scheduled", refresh_schedule="0-10:4", checkpoint_every=4)
  rag_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  last = checkpoint(tmp_path / "run", 10)["index"]
  np.testing.assert_array_equal(last["encoded_at"], [8] * len(PEOPLE))
  expected = host_index(root, dirs, checkpoint(tmp_path / "run", 8)["params"]["ctx_encoder"])
  np.testing.assert_allclose(last["embeddings"][:len(PEOPLE)], expected, atol=1e-5, rtol=0)
  initial = host_index(root, dirs, load_pretrained(dirs["context"])[1])
  assert np.abs(expected - initial).max() > 1e-3  # The encoder moved: a stale row shows.


def test_refresh_fields_that_do_not_fit_are_named(setup, tmp_path):  # noqa: F811
  root, dirs = setup
  config = config_for(root, dirs, "rerank", rerank_candidates=2)
  with pytest.raises(config_check.ConfigError, match=r"rerank_candidates = 2: must be > "
                     r"config\.n_docs \(2\)"):
    rag_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  config = config_for(root, dirs, "rerank", rerank_candidates=25)
  with pytest.raises(config_check.ConfigError, match=r"rerank_candidates asks for 25 passages, "
                     r"more than the 24"):
    rag_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  config = config_for(root, dirs, "scheduled", refresh_schedule="0-10:4,x")
  with pytest.raises(config_check.ConfigError, match=r"part 'x' is not START-END:EVERY"):
    rag_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  config = config_for(root, dirs, "rolling", train_context_encoder=False, retrieval="host")
  with pytest.raises(config_check.ConfigError, match=r"needs config\.train_context_encoder = "
                     r"True.*needs retrieval on the devices"):
    rag_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.slow  # the step-level tests in test_index_refresh.py cover it in CI
def test_rerank_leaves_the_index_as_built_and_logs_its_age(setup, tmp_path):  # noqa: F811
  """Rerank reads the built index (never rewritten: its rows' age is the step number, mean 2 and
  max 4 over steps 0-4) and keeps it as built in the checkpoint."""
  root, dirs = setup
  config = config_for(root, dirs, "rerank", rerank_candidates=6, num_train_steps=5,
                      eval_every=5)
  rag_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
  assert (record["staleness"], record["staleness_max"]) == (2.0, 4.0)
  last = checkpoint(tmp_path / "run", 5)["index"]
  assert not last["encoded_at"].any()
  built = host_index(root, dirs, load_pretrained(dirs["context"])[1])
  np.testing.assert_allclose(last["embeddings"][:len(PEOPLE)], built, atol=1e-5, rtol=0)
