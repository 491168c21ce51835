"""The RAG fine-tuning loop end to end on 8 CPU devices: a corpus indexed with the retrieval
pipeline, tiny transformers-built DPR encoders and BART, retrieval with the current question
encoder at every step. The loss falls, a killed run resumes to identical parameters, the export
loads in transformers, and bad data files are named."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from configs import rag_finetune
from rag_jax.checkpoints import load_pretrained
from rag_jax.data import qa
from rag_jax.training import rag_trainer
from tests import torch_reference as ref

PEOPLE = [f"person{i}" for i in range(24)]
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "tokyo"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from rag_jax.retrieval.pipeline import build_from_corpus

  root = tmp_path_factory.mktemp("rag")
  rng = np.random.default_rng(0)
  homes = {p: CITIES[rng.integers(len(CITIES))] for p in PEOPLE}
  corpus = [f"{p}\t{p} lives in {c} ." for p, c in homes.items()]
  (root / "corpus.tsv").write_text("\n".join(corpus) + "\n")
  questions = [f"where does {p} live ?" for p in PEOPLE]
  q_tok, g_tok = ref.train_tokenizers(corpus + questions, question_vocab=120,
                                      generator_vocab=160)
  dirs = {}
  for kind in ("question", "context"):
    torch.manual_seed(1)  # Same weights for both encoders: a question matches its passage.
    cfg = transformers.DPRConfig(vocab_size=len(q_tok), hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=48,
                                 max_position_embeddings=64)
    cls = {"question": transformers.DPRQuestionEncoder,
           "context": transformers.DPRContextEncoder}[kind]
    dirs[kind] = root / kind
    cls(cfg).save_pretrained(dirs[kind])
    q_tok.save_pretrained(dirs[kind])
  torch.manual_seed(2)
  bart = transformers.BartConfig(vocab_size=len(g_tok), d_model=32, encoder_layers=1,
                                 decoder_layers=1, encoder_attention_heads=2,
                                 decoder_attention_heads=2, encoder_ffn_dim=48,
                                 decoder_ffn_dim=48, max_position_embeddings=64, dropout=0.0)
  dirs["generator"] = root / "generator"
  transformers.BartForConditionalGeneration(bart).save_pretrained(dirs["generator"])
  g_tok.save_pretrained(dirs["generator"])
  build_from_corpus(root / "corpus.tsv", root / "kb", encoder=str(dirs["context"]), fmt="tsv",
                    split_words=None, index_type="exact", progress=False)
  data = root / "data"
  data.mkdir()
  for split, people in (("train", PEOPLE[:16]), ("val", PEOPLE[16:])):
    (data / f"{split}.source").write_text("".join(f"where does {p} live ?\n" for p in people))
    (data / f"{split}.target").write_text("".join(f"{homes[p]}\n" for p in people))
  return root, dirs


def _config(root, dirs, model_type="rag_sequence"):
  config = rag_finetune.get_config()
  config.model_type = model_type
  config.question_encoder_checkpoint = str(dirs["question"])
  config.generator_checkpoint = str(dirs["generator"])
  config.index_dir = str(root / "kb")
  config.data_dir = str(root / "data")
  config.n_docs = 2
  config.max_source_length = 12
  config.max_target_length = 5
  config.max_combined_length = 24
  config.batch_size = 8
  config.num_train_steps = 20
  config.learning_rate = 5e-3
  config.warmup_steps = 2
  config.max_grad_norm = 1.0
  config.log_every = 5
  config.eval_every = 20
  config.checkpoint_every = 10
  return config


def test_trains_resumes_and_exports(setup, tmp_path):
  root, dirs = setup
  report = rag_trainer.train_and_evaluate(_config(root, dirs), str(tmp_path / "full"))
  lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
           if x]
  assert lines[-1]["loss"] < 0.8 * lines[0]["loss"]
  assert report["devices"] == 8 and 0 <= report["val_answer_recall_at_2"] <= 1

  assert rag_trainer.train_and_evaluate(_config(root, dirs), str(tmp_path / "killed"),
                                        stop_after=10) is None
  resumed = rag_trainer.train_and_evaluate(_config(root, dirs), str(tmp_path / "killed"))
  assert resumed["val_loss"] == report["val_loss"]
  _, a = load_pretrained(tmp_path / "full" / "export")
  _, b = load_pretrained(tmp_path / "killed" / "export")
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # The export is a transformers RagSequenceForGeneration with its tokenizers.
  torch_model = transformers.RagSequenceForGeneration.from_pretrained(tmp_path / "full" /
                                                                      "export")
  assert torch_model.config.n_docs == 2
  tokenizer = transformers.RagTokenizer.from_pretrained(tmp_path / "full" / "export")
  assert tokenizer.generator("paris")["input_ids"][0] == 0


def test_bad_data_files_are_named(tmp_path):
  (tmp_path / "train.source").write_text("q1\n\nq3\n")
  (tmp_path / "train.target").write_text("a1\na2\na3\n")
  with pytest.raises(qa.QAFormatError, match=r"train\.source:2: empty line"):
    qa.read_source_target(tmp_path, "train")
  (tmp_path / "train.source").write_text("q1\nq2\n")
  with pytest.raises(qa.QAFormatError, match=r"has 2 lines but .*train\.target has 3"):
    qa.read_source_target(tmp_path, "train")
  with pytest.raises(FileNotFoundError, match=r"val\.source"):
    qa.read_source_target(tmp_path, "val")


def test_config_naming_a_missing_index_or_checkpoint(setup, tmp_path):
  root, dirs = setup
  config = _config(root, dirs)
  config.index_dir = str(tmp_path / "no_index")
  with pytest.raises(FileNotFoundError, match=r"config\.index_dir=.*no_index.*index\.json"):
    rag_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  config = _config(root, dirs)
  config.generator_checkpoint = str(tmp_path / "no_bart")
  with pytest.raises(FileNotFoundError, match=r"config\.generator_checkpoint=.*no_bart.*config"):
    rag_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # Refused before the workdir was touched.


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path, monkeypatch):
  import orbax.checkpoint as ocp

  from rag_jax.training import loop
  from rag_jax.training.retrieval_feed import RetrievalFeed

  root, dirs = setup
  original, calls = RetrievalFeed.batch, []

  def poisoned(self, *args, **kwargs):
    batch, rows = original(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == 20:  # The batch of step 20, a checkpoint step (checkpoint_every 10).
      batch["doc_embeds"] = np.full_like(batch["doc_embeds"], np.nan)
    return batch, rows

  monkeypatch.setattr(RetrievalFeed, "batch", poisoned)
  workdir = tmp_path / "nan"
  with pytest.raises(loop.NonFiniteLossError, match=r"step 20: non-finite loss.*step 10"):
    rag_trainer.train_and_evaluate(_config(root, dirs), str(workdir))
  manager = ocp.CheckpointManager((workdir / "checkpoints").absolute())
  assert manager.latest_step() == 10
  restored = manager.restore(10)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["params"]))
