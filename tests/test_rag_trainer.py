"""The RAG fine-tuning loop end to end on 8 CPU devices: a corpus indexed with the retrieval
pipeline, tiny transformers-built DPR encoders and BART, retrieval with the current question
encoder at every step. The loss falls, a killed run resumes to identical parameters, the export
loads in transformers, and bad data files are named. Started from a transformers RAG checkpoint
of the other kind, the model trained with RAG-Token's (RAG-Sequence's) objective is exported as
RagTokenForGeneration (RagSequenceForGeneration) and answered with that class's decoding."""

import json
import logging

import jax
import numpy as np
import pytest
import torch
import transformers

from configs import rag_finetune
from rag_jax import answer as answer_lib
from rag_jax.checkpoints import load_pretrained
from rag_jax.data import qa
from rag_jax.models import rag
from rag_jax.retrieval.pipeline import build_from_corpus
from rag_jax.training import config_check, rag_trainer
from rag_jax.utils.errors import UserError
from tests import decoding_reference as dref
from tests import torch_reference as ref

PEOPLE = [f"person{i}" for i in range(24)]
CITIES = ["paris", "rome", "oslo", "lima", "cairo", "tokyo"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
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
  assert report["retrieval"] == "device"  # "auto": the test index fits the devices

  # Stopped after the record of step 15, before the checkpoint of step 20 (the last one is at
  # step 10), as a kill there would: the resumed run redoes steps 11-15.
  assert rag_trainer.train_and_evaluate(_config(root, dirs), str(tmp_path / "killed"),
                                        stop_after=15) is None
  resumed = rag_trainer.train_and_evaluate(_config(root, dirs), str(tmp_path / "killed"))
  assert resumed["val_loss"] == report["val_loss"]
  # Its metrics.jsonl holds each step's record once, with the uninterrupted run's figures.
  figures = ("step", "loss", "loss_per_token", "top_doc_prior", "val_loss")
  killed = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text()
            .splitlines() if x]
  assert [r["step"] for r in killed] == [5, 10, 15, 20]
  assert ([{k: r[k] for k in figures if k in r} for r in killed]
          == [{k: r[k] for k in figures if k in r} for r in lines])
  _, a = load_pretrained(tmp_path / "full" / "export")
  _, b = load_pretrained(tmp_path / "killed" / "export")
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # The export is a transformers RagSequenceForGeneration with its tokenizers.
  torch_model = transformers.RagSequenceForGeneration.from_pretrained(tmp_path / "full" /
                                                                      "export")
  assert torch_model.config.n_docs == 2
  tokenizer = transformers.RagTokenizer.from_pretrained(tmp_path / "full" / "export")
  assert tokenizer.generator("paris")["input_ids"][0] == 0


def test_host_retrieval_trains_the_same_model(setup, tmp_path):
  # The host path (q(x) to the host, exact search there, rows joined on the host) and retrieval
  # inside the step train the same model. Equality step by step (ids, rows, losses, parameters)
  # is asserted in tests/test_device_retrieval.py; end to end over 20 steps, q(x) from two
  # differently fused programs differs in the last bits, which can flip a near-tie between two
  # of this corpus's nearly identical passages and steer the runs apart a little.
  root, dirs = setup
  reports, curves = {}, {}
  for mode in ("host", "device"):
    config = _config(root, dirs)
    config.retrieval = mode
    reports[mode] = rag_trainer.train_and_evaluate(config, str(tmp_path / mode))
    assert reports[mode]["retrieval"] == mode
    curves[mode] = [json.loads(x)["loss"] for x in
                    (tmp_path / mode / "metrics.jsonl").read_text().splitlines() if x]
  assert curves["host"][0] == pytest.approx(curves["device"][0], rel=1e-3)  # first 5 steps
  assert curves["device"][-1] < 0.8 * curves["device"][0]
  assert reports["host"]["val_loss"] == pytest.approx(reports["device"]["val_loss"], rel=0.02)


ARCHITECTURES = {"rag_sequence": "RagSequenceForGeneration", "rag_token": "RagTokenForGeneration"}


def test_each_model_type_names_its_transformers_class_and_back():
  for model_type, name in ARCHITECTURES.items():
    assert rag.architecture_of(model_type) == name and rag.model_type_of(name) == model_type
    assert transformers.RagPreTrainedModel in getattr(transformers, name).__mro__
  with pytest.raises(ValueError, match="expected one of"):
    rag.architecture_of("bart")
  with pytest.raises(ValueError, match="cannot tell RAG-Token from RAG-Sequence"):
    rag.model_type_of("RagModel")


@pytest.fixture(scope="module")
def rag_checkpoints(setup, tmp_path_factory):
  """transformers RagSequenceForGeneration and RagTokenForGeneration checkpoints (with their
  tokenizers) joining the fixture's DPR question encoder and BART, saved by transformers."""
  root, dirs = setup
  out = {}
  for kind, name in ARCHITECTURES.items():
    question_encoder = transformers.DPRQuestionEncoder.from_pretrained(dirs["question"])
    generator = transformers.BartForConditionalGeneration.from_pretrained(dirs["generator"])
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        question_encoder.config, generator.config, n_docs=2)
    model = getattr(transformers, name)(config, question_encoder=question_encoder,
                                        generator=generator)
    out[kind] = tmp_path_factory.mktemp("start") / name
    model.save_pretrained(out[kind])
    transformers.RagTokenizer(transformers.AutoTokenizer.from_pretrained(dirs["question"]),
                              transformers.AutoTokenizer.from_pretrained(dirs["generator"])
                              ).save_pretrained(out[kind])
  return out


@pytest.mark.parametrize("start,trained", [("rag_sequence", "rag_token"),
                                           ("rag_token", "rag_sequence")])
def test_the_trained_objective_is_the_exported_and_decoded_kind(setup, rag_checkpoints, tmp_path,
                                                                 caplog, start, trained):
  root, dirs = setup
  config = _config(root, dirs, trained)
  config.rag_checkpoint = str(rag_checkpoints[start])
  config.num_train_steps = config.log_every = config.eval_every = config.checkpoint_every = 3
  with caplog.at_level(logging.INFO, logger="rag_jax.training.rag_trainer"):
    report = rag_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  export = tmp_path / "run" / "export"
  assert json.loads((export / "config.json").read_text())["architectures"] == [
      ARCHITECTURES[trained]]
  assert report["model_type"] == trained and report["architecture"] == ARCHITECTURES[trained]
  # Starting from the other kind is logged, once, naming both.
  notes = [r for r in caplog.records if "config.rag_checkpoint" in r.getMessage()]
  assert len(notes) == 1 and notes[0].levelno == logging.WARNING, notes
  assert ARCHITECTURES[start] in notes[0].getMessage()
  assert ARCHITECTURES[trained] in notes[0].getMessage()
  hf_config = transformers.AutoConfig.from_pretrained(export)
  assert hf_config.architectures == [ARCHITECTURES[trained]]
  torch_model, info = getattr(transformers, hf_config.architectures[0]).from_pretrained(
      export, output_loading_info=True)
  assert type(torch_model).__name__ == ARCHITECTURES[trained]
  assert not info["missing_keys"] and not info["unexpected_keys"], info

  # rag_jax.answer decodes the export with the trained kind's decoder: the answers and their
  # scores are those of the matching transformers class on the same retrieved passages
  # (RAG-Token: beam sequences_scores; RAG-Sequence thorough: -loss of the returned answer).
  answerer = answer_lib.RagAnswerer(export, root / "kb")
  questions = [f"where does {p} live ?" for p in PEOPLE[16:20]]
  options = dref.generation_kwargs(num_beams=2, max_length=6)
  extra = {"mask_beam_contexts": False} if trained == "rag_sequence" else {}  # 5.23's rule
  answers = answerer(questions, **options, **extra)
  assert {(a.decoder.kind, a.decoder.architecture) for a in answers} == {
      (trained, ARCHITECTURES[trained])}
  _, ctx, ctx_mask, doc_scores = answerer.generator_inputs(questions)
  ctx, ctx_mask, doc_scores = ref.to_torch(ctx), ref.to_torch(ctx_mask), ref.to_torch(doc_scores)
  token = trained == "rag_token"  # RagSequenceForGeneration.generate returns sequences only.
  with torch.no_grad():
    out = torch_model.eval().generate(
        context_input_ids=ctx, context_attention_mask=ctx_mask, doc_scores=doc_scores, n_docs=2,
        **dref.torch_kwargs(options), **(dict(return_dict_in_generate=True, output_scores=True)
                                         if token else {}))
    sequences = out.sequences if token else out
    if token:
      scores = out.sequences_scores.numpy()
    else:
      scores = np.array([-torch_model(
          context_input_ids=ctx[2 * q:2 * q + 2], context_attention_mask=ctx_mask[2 * q:2 * q + 2],
          doc_scores=doc_scores[q:q + 1], labels=sequences[q:q + 1], exclude_bos_score=True,
          n_docs=2).loss.item() for q in range(len(questions))])
  texts = answerer.tokenizers.generator.batch_decode(sequences, skip_special_tokens=True)
  assert [a.text for a in answers] == [t.strip() for t in texts]
  np.testing.assert_allclose([a.score for a in answers], scores, atol=1e-4, rtol=0)


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
  config = _config(root, dirs, model_type="rag_tokens")
  with pytest.raises(ValueError, match=r"config\.model_type = 'rag_tokens': must be one of "
                                       r"\['rag_sequence', 'rag_token'\]"):
    rag_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # Refused before the workdir was touched.
  config = _config(root, dirs)
  config.rag_checkpoint = str(dirs["generator"])
  with pytest.raises(ValueError, match=r"config\.rag_checkpoint=.*generator: a "
                                       r"BartForConditionalGeneration checkpoint, not a RAG one"):
    rag_trainer.load_model(config)


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
  config = _config(root, dirs)
  config.retrieval = "host"  # The poisoned batch comes from the host feed.
  with pytest.raises(loop.NonFiniteLossError, match=r"step 20: non-finite loss.*step 10"):
    rag_trainer.train_and_evaluate(config, str(workdir))
  manager = ocp.CheckpointManager((workdir / "checkpoints").absolute())
  assert manager.latest_step() == 10
  restored = manager.restore(10)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["params"]))


def test_rag_finetune_as_given_names_every_path_to_set(tmp_path):
  # configs/rag_finetune.py as shipped, no paths set: one error listing the fields (before: a
  # ValueError traceback naming index_dir only, then the next one on each rerun).
  with pytest.raises(config_check.ConfigError) as e:
    rag_trainer.train_and_evaluate(rag_finetune.get_config(), str(tmp_path / "run"))
  assert isinstance(e.value, UserError)
  assert str(e.value) == (
      "set config.index_dir (a directory written by python -m rag_jax.commands.build_index); "
      "config.rag_checkpoint (a transformers RAG checkpoint directory with its tokenizers (or "
      "set config.question_encoder_checkpoint and config.generator_checkpoint)); config.data_dir "
      "(a directory with train.source, train.target, val.source and val.target, one question "
      "(.source) and one answer (.target) per line), e.g. --config.index_dir=PATH on train.py's "
      "command line (nothing was run or written)")
  config = rag_finetune.get_config()
  config.question_encoder_checkpoint = "/q"
  with pytest.raises(config_check.ConfigError, match=r"^set config.index_dir \(.*; "
                                                     r"config.generator_checkpoint \(a BART "):
    rag_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_n_docs_beyond_the_index_is_refused_before_training(setup, tmp_path):
  # The fixture's index holds one passage per person, 24. Before: n_docs 30 trained without a
  # word (retrieval filled the rows past the 24th).
  root, dirs = setup
  index = root / "kb" / "index"
  config = _config(root, dirs)
  config.n_docs = 30
  with pytest.raises(config_check.ConfigError) as e:
    rag_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert str(e.value) == (f"config.n_docs asks for 30 passages, more than the {len(PEOPLE)} of "
                          f"{index} (invalid config: nothing was run or written)")
  assert not (tmp_path / "run").exists()


def test_lengths_beyond_the_checkpoints_position_tables_are_refused_before_training(setup,
                                                                                   tmp_path):
  # Both fixture models have 64 positions. Before: a source length of 128 failed in the first
  # retrieval with a broadcasting traceback, after the workdir had recorded the config (so the
  # corrected rerun was refused as another config).
  root, dirs = setup
  config = _config(root, dirs)
  config.max_source_length = 128
  config.max_combined_length = 65
  with pytest.raises(config_check.ConfigError) as e:
    rag_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert str(e.value) == (
      f"config.max_source_length = 128: must be <= max_position_embeddings 64 of "
      f"{dirs['question']}/config.json; config.max_combined_length = 65: must be <= "
      f"max_position_embeddings 64 of {dirs['generator']}/config.json (invalid config: nothing "
      "was run or written)")
  assert not (tmp_path / "run").exists()


def test_the_context_encoder_trains_with_the_generator(setup, tmp_path):
  """config.train_context_encoder: the DPRContextEncoder that built the index is trained through
  the retrieved passages' re-encoding (host and device retrieval give the same first losses),
  at its own rate, checkpointed with the rest (a killed run resumes to the same encoder), and
  exported beside the RAG model as a checkpoint transformers loads."""
  root, dirs = setup

  def config_for(mode):
    config = _config(root, dirs)
    config.retrieval = mode
    config.train_context_encoder = True
    config.context_encoder_checkpoint = str(dirs["context"])
    config.context_encoder_max_length = 16
    config.group_learning_rates = {"ctx_encoder": 1e-3}
    config.num_train_steps = config.eval_every = 10
    config.checkpoint_every = 5
    return config

  reports, curves = {}, {}
  for mode in ("device", "host"):
    reports[mode] = rag_trainer.train_and_evaluate(config_for(mode), str(tmp_path / mode))
    assert reports[mode]["retrieval"] == mode and reports[mode]["train_context_encoder"]
    curves[mode] = [json.loads(x)["loss"] for x in
                    (tmp_path / mode / "metrics.jsonl").read_text().splitlines() if x]
  assert curves["host"][0] == pytest.approx(curves["device"][0], rel=1e-3)  # first 5 steps
  assert list((root / "kb" / "passage_tables").glob("encoder-*/table.json"))
  export = tmp_path / "device" / "export" / "ctx_encoder"
  _, trained = load_pretrained(export)
  _, initial = load_pretrained(dirs["context"])
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), trained, initial)
  assert max(jax.tree.leaves(moved)) > 1e-4
  # Killed after step 7 (last checkpoint: step 5), resumed: the same context encoder.
  killed = tmp_path / "killed"
  assert rag_trainer.train_and_evaluate(config_for("device"), str(killed), stop_after=7) is None
  rag_trainer.train_and_evaluate(config_for("device"), str(killed))
  _, resumed = load_pretrained(killed / "export" / "ctx_encoder")
  jax.tree.map(np.testing.assert_array_equal, resumed, trained)
  torch_ctx = transformers.DPRContextEncoder.from_pretrained(export)
  np.testing.assert_allclose(
      torch_ctx.ctx_encoder.bert_model.embeddings.word_embeddings.weight.detach().numpy(),
      trained["bert_model"]["embeddings"]["word_embeddings"]["embedding"], atol=0)


def test_training_the_context_encoder_needs_its_checkpoint_and_a_dense_retriever(setup,
                                                                                 tmp_path):
  root, dirs = setup
  config = _config(root, dirs)
  config.train_context_encoder = True
  with pytest.raises(config_check.ConfigError, match=r"needs config\.context_encoder_checkpoint"):
    rag_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  config.context_encoder_checkpoint = str(dirs["context"])
  config.context_encoder_max_length = 65  # The fixture's encoders have 64 positions.
  with pytest.raises(config_check.ConfigError, match=r"context_encoder_max_length = 65: must be "
                     r"<= max_position_embeddings 64 of .*context/config\.json"):
    rag_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  config.retriever_kind = "bm25"
  with pytest.raises(config_check.ConfigError, match=r"needs config\.retriever_kind = 'dense'"):
    rag_trainer.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()
