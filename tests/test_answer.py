"""End-to-end answering (rag_jax.answer) against a pipeline assembled from transformers' PyTorch
classes: torch DPR question/context encoders, a numpy brute-force top-k, the reference's context
strings, and `RagTokenForGeneration.generate` / `RagSequenceForGeneration.generate`."""

import contextlib
import csv
import functools
import io
import re
import shutil

import jax
import numpy as np
import pytest
import torch
import transformers

from rag_jax import answer as answer_lib
from rag_jax.commands import answer as answer_command
from rag_jax.commands import search as search_command
from rag_jax.decoding import generate
from rag_jax.retrieval.index import IndexDimensionError
from rag_jax.retrieval.pipeline import build_from_corpus
from rag_jax.utils.errors import InputError, NonFiniteError
from tests import decoding_reference as dref
from tests import pipeline_reference as pref
from tests import torch_reference as ref

N_DOCS, MAX_COMBINED = 3, 32
TITLES = ["Alba", "Brio", '"Cora"', "Dune", "Elm", "Fig", "Gale", "Hub"]
RIVERS = ["north", "south", "east", "west"] * 2
GOODS = ["iron", "silk", "salt", "wool", "tin", "oil", "rice", "wine"]
TEXTS = [f"{t.strip(chr(34)).lower()} is near the {w} river and makes {c}  goods ."
         for t, w, c in zip(TITLES, RIVERS, GOODS, strict=True)]
QUESTIONS = ["what does alba make ?", "which river is gale near ?", "what does fig make ?"]
# The passages cut to their goods: their generator contexts end in padding (max_combined_length
# 32), where RAG-Sequence's masked and unmasked per-passage beams part.
SHORT_TEXTS = GOODS


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A corpus indexed by the retrieval pipeline, and RAG-Token / RAG-Sequence checkpoints (torch
  models with their tokenizers) whose question encoder shares the context encoder's weights."""
  return pref.build_world(tmp_path_factory.mktemp("answer"), TITLES, TEXTS, QUESTIONS, N_DOCS,
                          MAX_COMBINED)


def _torch_pipeline(world, kind, **generate_kwargs):
  """(rows [Q, n], doc_scores [Q, n], answer strings) with transformers and numpy only."""
  return pref.torch_pipeline(world, kind, TITLES, TEXTS, QUESTIONS, N_DOCS, **generate_kwargs)


@pytest.mark.parametrize("kind,options", [
    ("token", dict(num_beams=1)),
    ("token", dict(num_beams=3)),
    ("sequence", dict(num_beams=2)),
])
def test_answers_equal_a_transformers_pipeline(world, kind, options):
  root, *_, models = world
  rows, doc_scores, expected = _torch_pipeline(world, kind, **options)
  answerer = answer_lib.RagAnswerer(models[kind][1], root / "kb")
  # These contexts fill max_combined_length: no padding, where RAG-Sequence's masked beams
  # (the default) equal transformers 5.23's unmasked ones (see the next test).
  assert answerer.generator_inputs(QUESTIONS)[2].all()
  got = answerer(QUESTIONS, **dref.generation_kwargs(**options))
  assert [a.text for a in got] == expected
  assert {a.decoder.architecture for a in got} == {type(models[kind][0]).__name__}
  for i, a in enumerate(got):
    assert [h.row for h in a.passages] == list(rows[i])
    assert [h.title for h in a.passages] == [TITLES[r] for r in rows[i]]
    np.testing.assert_allclose([h.score for h in a.passages], doc_scores[i], rtol=1e-5, atol=1e-5)
    prior = np.exp(doc_scores[i] - doc_scores[i].max())
    np.testing.assert_allclose(a.passage_probs, prior / prior.sum(), rtol=1e-5, atol=1e-6)


def test_rag_sequence_over_padded_contexts_equals_transformers_with_masked_beams(world,
                                                                                tmp_path):
  """What evaluate.py and the answer command decode (RAG-Sequence beams over the contexts'
  mask, the default) equals transformers' RagSequenceForGeneration.generate run with the mask
  given to its per-passage beam search. transformers 5.23 runs that search unmasked, and where
  contexts end in padding, as they do over these short passages, its answers differ
  (docs/decoding.md; tests/test_decoding_rag.py reproduces its rule with
  mask_beam_contexts=False)."""
  root, *_, models = world
  with open(tmp_path / "short.tsv", "w", newline="") as f:
    csv.writer(f, delimiter="\t", lineterminator="\n").writerows(
        zip(TITLES, SHORT_TEXTS, strict=True))
  build_from_corpus(tmp_path / "short.tsv", tmp_path / "kb", encoder=str(root / "ctx"),
                    fmt="tsv", split_words=None, index_type="exact", progress=False)
  options = dict(num_beams=2)  # the shapes of the first test's RAG-Sequence case: no compile
  answer = functools.partial(pref.torch_pipeline, world, "sequence", TITLES, SHORT_TEXTS,
                             QUESTIONS, N_DOCS, **options)
  rows, _, masked = answer(mask_beam_contexts=True)
  answerer = answer_lib.RagAnswerer(models["sequence"][1], tmp_path / "kb")
  hits, _, context_mask, _ = answerer.generator_inputs(QUESTIONS)
  assert [[h.row for h in row] for row in hits] == rows.tolist()
  assert (context_mask == 0).any(axis=1).all()  # every context ends in padding
  got = [a.text for a in answerer(QUESTIONS, **dref.generation_kwargs(**options))]
  assert got == masked
  assert answer()[2] != got  # transformers 5.23's unmasked beams


def test_command_prints_answers_with_passages(world):
  root, *_, models = world
  expected = _torch_pipeline(world, "token", num_beams=2, max_length=10)[2]
  out = io.StringIO()
  assert answer_command.main(["--checkpoint", str(models["token"][1]), "--index_dir",
                          str(root / "kb"), "--num_beams", "2", "--max_length", "10"],
                         stdin=io.StringIO("\n".join(QUESTIONS[:2]) + "\n"), stdout=out) == 0
  text = out.getvalue()
  for question, answer in zip(QUESTIONS[:2], expected[:2], strict=True):
    assert f"Q: {question}\nA: {answer}   (score" in text
  assert text.count(f"; RAG-Token, 2 beams, {N_DOCS} docs, max_length 10)") == 2
  assert text.count("p=") == 2 * N_DOCS


def test_bad_inputs_are_named(world, tmp_path):
  root, q_tok, g_tok, ctx, models = world
  with pytest.raises(FileNotFoundError, match=r"nowhere.*store\.json"):
    answer_lib.RagAnswerer(models["token"][1], tmp_path / "nowhere")
  bart_path = dref.bart(tmp_path)[1]
  with pytest.raises(ValueError, match=r"BartForConditionalGeneration checkpoint; answering "
                                       r"needs a RAG checkpoint"):
    answer_lib.RagAnswerer(bart_path, root / "kb")
  # An index of 16-d vectors against a 32-d question encoder.
  wide = transformers.DPRConfig(**{**ref.DPR_CONFIG, "projection_dim": 16})
  transformers.DPRContextEncoder(wide).save_pretrained(tmp_path / "ctx16")
  q_tok.save_pretrained(tmp_path / "ctx16")
  build_from_corpus(root / "corpus.tsv", tmp_path / "kb16", encoder=str(tmp_path / "ctx16"),
                    fmt="tsv", split_words=None, index_type="exact", progress=False)
  with pytest.raises(IndexDimensionError, match=r"16-d passage embeddings .* 32-d"):
    answer_lib.RagAnswerer(models["token"][1], tmp_path / "kb16")


# ------------------------------------------------------------------ inputs checked at the door
# The question encoder of these checkpoints has 40 positions (ref.DPR_CONFIG) while the command's
# question budget is 128 tokens.

LONG = "what does " + "alba " * 60 + "make ?"  # 66 tokens with [CLS] and [SEP]


def _ask(models, root, *questions, extra=()):
  """(exit code, stdout, stderr) of the answer command on `questions`."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stderr(err):
    code = answer_command.main(["--checkpoint", str(models["token"][1]), "--index_dir",
                                str(root / "kb"), "--num_beams", "1", "--max_length", "8",
                                *extra, *questions], stdin=io.StringIO(""), stdout=out)
  return code, out.getvalue(), err.getvalue()


def test_command_truncates_a_long_question_to_the_encoders_positions(world):
  root, q_tok, *_, models = world
  assert len(q_tok(LONG)["input_ids"]) > ref.DPR_CONFIG["max_position_embeddings"]
  code, out, err = _ask(models, root, QUESTIONS[0], LONG)
  assert code == 0, err
  assert "nan" not in out.lower()
  # The other question of the call is answered exactly as when asked alone.
  alone = _ask(models, root, QUESTIONS[0])[1]
  assert out.split("Q: ")[1] == alone.split("Q: ")[1]
  # The long one is retrieved with its first 40 tokens: the same rows and scores as the torch
  # pipeline's question encoder on the truncated ids.
  torch_rag = models["token"][0]
  q = q_tok([LONG], truncation=True, max_length=ref.DPR_CONFIG["max_position_embeddings"],
            return_tensors="pt")
  _, _, _, ctx, _ = world
  enc = q_tok(TITLES, TEXTS, padding=True, truncation=True, return_tensors="pt",
              max_length=ref.DPR_CONFIG["max_position_embeddings"])
  with torch.no_grad():
    question = torch_rag.question_encoder(q["input_ids"], q["attention_mask"])[0].numpy()
    passages = ctx(enc["input_ids"], enc["attention_mask"],
                   torch.zeros_like(enc["input_ids"])).pooler_output.numpy()
  scores = (question @ passages.T)[0]
  top = np.argsort(-scores, kind="stable")[:N_DOCS]
  got = re.findall(r"p=[\d.]+ \[ *(-?[\d.]+)\] (.*) \(id", out.split("Q: ")[2])
  assert [t for _, t in got] == [TITLES[r] for r in top]
  np.testing.assert_allclose([float(s) for s, _ in got], scores[top], atol=1e-3)
  n_tokens = len(q_tok(LONG)["input_ids"])
  assert err.count("warning: 1 of 2 questions exceed the question encoder's 40 tokens and were "
                   f"truncated to them (question(s) 2: {n_tokens} tokens)") == 1


def test_commands_refuse_more_passages_than_the_index_holds_and_more_answers_than_beams(world):
  """search --k, answer --n_docs (and a checkpoint's n_docs) above the index's 8 passages, and
  --num_return_sequences above --num_beams: one `error:` line naming the flag, before anything
  is loaded."""
  root, *_, models = world
  kb = root / "kb"
  code, out, err = _ask(models, root, QUESTIONS[0], extra=("--n_docs", "9"))
  assert (code, out) == (1, "")
  assert err == f"error: --n_docs=9: the index {kb} holds 8 passages; ask for at most 8\n"
  code, out, err = _ask(models, root, QUESTIONS[0], extra=("--num_return_sequences", "2"))
  assert (code, out) == (2, "")  # a usage error
  assert err == ("error: --num_return_sequences=2 is more than --num_beams=1: beam search "
                 "returns at most num_beams answers per question\n")
  stdout, stderr = io.StringIO(), io.StringIO()
  with contextlib.redirect_stderr(stderr):
    code = search_command.main(["--dir", str(kb), "--question_encoder", str(root / "ctx"),
                                "--k", "9", QUESTIONS[0]], stdout=stdout)
  assert (code, stdout.getvalue()) == (1, "")
  assert stderr.getvalue() == f"error: --k=9: the index {kb} holds 8 passages; ask for at most 8\n"
  with pytest.raises(InputError, match=rf"^n_docs=9: the index {kb} holds 8 passages"):
    answer_lib.RagAnswerer(models["token"][1], kb, n_docs=9)


def test_command_refuses_an_empty_question_in_one_line(world):
  root, *_, models = world
  code, out, err = _ask(models, root, QUESTIONS[0], "  ")
  assert (code, out) == (1, "")
  assert err == ("error: question(s) [2] of 2 are empty or blank; ask something (no question "
                 "was answered)\n")


def test_command_reports_unknown_tokens(world):
  root, q_tok, *_, models = world
  question = "what does Ωmega make ?"
  assert q_tok(question)["input_ids"].count(q_tok.unk_token_id) == 1
  code, out, err = _ask(models, root, QUESTIONS[0], question)
  assert code == 0
  assert err == ("warning: question 2: 1 unknown token(s) for the question encoder's tokenizer "
                 "('Ωmega'); retrieval cannot use them (a word glued to punctuation? separate it "
                 "with a space)\n")


def test_non_finite_scores_are_a_named_error(world):
  root, *_, models = world
  answerer = answer_lib.RagAnswerer(models["token"][1], root / "kb")
  broken = jax.tree.map(lambda x: x, answerer.params)
  broken["question_encoder"] = jax.tree.map(lambda x: x * np.nan, broken["question_encoder"])
  answerer.params = answerer.retriever.params = broken
  with pytest.raises(NonFiniteError, match=r"^doc scores q\(x\) \. d\(z\) of the retrieved "
                                           r"passages \(one row per question\): nan in 3 of 3 "):
    answerer(QUESTIONS)
  with pytest.raises(NonFiniteError, match=r"^doc_scores given to RAG generation: inf in 1 of 3"):
    generate(answerer.model, answerer.params, context_input_ids=np.ones((3 * N_DOCS, 4), int),
             doc_scores=np.array([[0, 1, np.inf], [0, 1, 2], [0, 1, 2]], np.float32),
             n_docs=N_DOCS)
  generator = {**answerer.params, "generator": jax.tree.map(lambda x: x * np.nan,
                                                              answerer.params["generator"])}
  with pytest.raises(NonFiniteError, match=r"^sequence scores of RAG-Token.* nan in 3 of 3"):
    generate(answerer.model, generator, context_input_ids=np.ones((3 * N_DOCS, 4), int),
             doc_scores=np.zeros((3, N_DOCS), np.float32), n_docs=N_DOCS, max_length=4)


def test_command_names_a_missing_checkpoint_or_tokenizer_in_one_line(world, tmp_path, capsys):
  root, *_, models = world
  code = answer_command.main(["--checkpoint", str(tmp_path / "nowhere"), "--index_dir",
                              str(root / "kb"), QUESTIONS[0]], stdout=io.StringIO())
  err = capsys.readouterr().err
  assert code == 1
  assert err == (f"error: {tmp_path / 'nowhere' / 'config.json'}: no such file (a checkpoint "
                 "directory needs config.json)\n")
  # A RAG checkpoint saved without its tokenizers.
  bare = tmp_path / "bare"
  shutil.copytree(models["token"][1], bare, ignore=shutil.ignore_patterns("*_tokenizer"))
  code = answer_command.main(["--checkpoint", str(bare), "--index_dir", str(root / "kb"),
                              QUESTIONS[0]], stdout=io.StringIO())
  err = capsys.readouterr().err
  assert code == 1 and err.startswith(f"error: {bare}: no question_encoder_tokenizer/")
  assert err.count("\n") == 1
