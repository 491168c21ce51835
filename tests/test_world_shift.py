"""The shifted-world experiment (configs/world_shift.py, rag_jax.experiments.world.shift).

Default run: world B's passages against world A's, parsed back here (every passage names its
subject first, then distinct other people; with the co-mention clause cut out it is world A's
passage; ids, titles, distractors unchanged); the tokenizer trained on both worlds knows every
world-B word and pads to world B's longest passage; the config's row relations are refused.

Slow: the tiny experiment (frozen and rolling rows) end to end, its figures recomputed from
what the rows wrote: EM from <row>/heldout_predictions.jsonl against the world's answers; the
rolling row's evaluation index equal to world B encoded by transformers' PyTorch
DPRContextEncoder from the row's exported context encoder; recall@k by brute-force dot products
of transformers' question encoder (the row's RAG export) against those embeddings.
"""

import json
import math
import re

import numpy as np
import pytest

from configs import world_shift
from rag_jax.experiments.world import job as world_job
from rag_jax.experiments.world import shift
from rag_jax.experiments.world.data import WorldConfig, generate_world
from rag_jax.experiments.world.phases import PhaseLog
from rag_jax.experiments.world.shift_data import shift_world
from rag_jax.retrieval.corpus import read_dpr_tsv
from rag_jax.training import config_check

LINK_WORDS = ("a neighbour of", "a cousin of", "a friend of", "a colleague of")
SMALL = WorldConfig(num_people=40, num_cities=6, num_companies=5, num_years=10, num_meetings=10)


def _parse(text: str, subject: str) -> tuple[str, list[str]]:
  """(world A's text, the co-mentioned names) of a world-B text about `subject`."""
  links = "|".join(LINK_WORDS)
  found = re.fullmatch(rf"(.*?){subject} , (?:{links}) (.+) ,(.*)", text)
  assert found, text
  prefix, names, suffix = found.groups()
  *firsts, last = names.split(" and ")
  others = [n for part in firsts for n in part.split(" , ")] + [last]
  return f"{prefix}{subject}{suffix}", others


@pytest.mark.parametrize("co_mentions", [1, 3])
def test_world_b_names_subject_first_and_keeps_world_a_facts(co_mentions):
  world = generate_world(SMALL, progress=False)
  b = shift_world(world, co_mentions)
  people = {f.person for f in world.facts}
  assert len(b.passages) == len(world.passages)
  assert b.facts == world.facts and b.train == world.train and b.heldout == world.heldout
  fact_passages = 0
  for (pid_a, title_a, text_a, fact_a), (pid_b, title_b, text_b, fact_b) in zip(
      world.passages, b.passages, strict=True):
    assert (pid_a, title_a, fact_a) == (pid_b, title_b, fact_b)
    if fact_a < 0:
      assert text_b == text_a  # distractors are world A's
      continue
    fact_passages += 1
    subject = world.facts[fact_a].person
    assert title_b == subject
    named = [w for w in text_b.split() if w in people]
    assert named[0] == subject and len(named) == 1 + co_mentions
    assert len(set(named)) == len(named)  # distinct, the subject never a co-mention
    text, others = _parse(text_b, subject)
    assert others == named[1:]
    assert text == text_a  # the same fact in the same words
    assert world.facts[fact_a].value in text_b.split()
  assert fact_passages == len(world.facts)
  assert shift_world(world, co_mentions).passages == b.passages  # a function of the seed


def test_world_b_refuses_impossible_co_mentions():
  world = generate_world(SMALL, progress=False)
  with pytest.raises(ValueError, match="co_mentions"):
    shift_world(world, 0)
  with pytest.raises(ValueError, match="only 40 people"):
    shift_world(world, 40)


def test_tokenizer_knows_every_world_b_word(tmp_path):
  config = world_shift.get_config("tiny")
  job = world_job.Job(config, tmp_path, PhaseLog(tmp_path))
  job.phases.finish("world", 0.0, shift.phase_world(job))
  job.phases.finish("tokenizer", 0.0, shift.phase_tokenizer(job))
  tok = job.tokenizer()
  passages = list(read_dpr_tsv(tmp_path / "world_b" / "passages.tsv"))
  ids = tok([p.title for p in passages], [p.text for p in passages])["input_ids"]
  assert tok.unk_token_id not in {i for row in ids for i in row}
  assert job.lengths()["passage"] >= max(len(row) for row in ids)
  # world B is the shifted world A: same questions and answers, longer passages
  for name in ("train.source", "train.target", "val.source", "val.target"):
    assert ((tmp_path / "world" / name).read_text()
            == (tmp_path / "world_b" / name).read_text())
  a = {p.id: p for p in read_dpr_tsv(tmp_path / "world" / "passages.tsv")}
  assert all(len(p.text.split()) >= len(a[p.id].text.split()) for p in passages)
  assert sum(p.text != a[p.id].text for p in passages) == len(generate_world(
      WorldConfig(**config.world.to_dict()), progress=False).facts)


@pytest.mark.parametrize("field,value,message", [
    ("shift.rows", ("rolling",), "needs 'frozen'"),
    ("shift.rows", ("frozen", "hourly"), "names ['hourly']"),
    ("shift.rerank_candidates", 5, "must be > config.rag.n_docs"),
    ("shift.refresh_schedule", "often", "refresh_schedule"),
    ("rag.retrieval", "host", "retrieval on the devices"),
])
def test_config_relations_refused(field, value, message):
  config = world_shift.get_config()
  config_check.validate(config)  # the shipped config passes
  group, name = field.split(".")
  config[group][name] = value
  with pytest.raises(config_check.ConfigError, match=re.escape(message)):
    config_check.validate(config)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("shift")
  config = world_shift.get_config("tiny")
  config.shift.rows = ("frozen", "rolling")
  report = shift.train_and_evaluate(config, str(workdir))
  return config, workdir, report


def _lines(path):
  return path.read_text().splitlines()


@pytest.mark.slow
def test_tiny_run_em_from_predictions(tiny_run):
  config, workdir, report = tiny_run
  questions, answers = _lines(workdir / "world" / "val.source"), _lines(workdir / "world" /
                                                                         "val.target")
  assert set(report["rows"]) == {"frozen", "rolling"}
  for row, scores in report["rows"].items():
    records = [json.loads(x) for x in _lines(workdir / row / "heldout_predictions.jsonl")]
    assert [r["question"] for r in records] == questions
    em = np.mean([r["prediction"].strip().lower() == a for r, a in zip(records, answers,
                                                                        strict=True)])
    assert scores["heldout_em"] == pytest.approx(em)
    assert scores["step_time_ratio"] == pytest.approx(
        report["rows"]["frozen"]["steps_per_s"] / scores["steps_per_s"])
  assert report["rows"]["frozen"]["evaluated_index"] == "index_b"
  assert report["rows"]["rolling"]["evaluated_index"] == "index_rolling"
  # rolling: every retrieved row at most ceil(N / R) - 1 steps old, and never older than the run
  stale = report["rows"]["rolling"]["staleness"]
  bound = math.ceil(report["passages"] / config.shift.rolling_rows_per_step) - 1
  assert 0 < stale["max"] <= min(bound, config.rag.num_train_steps - 1)
  assert report["rows"]["frozen"]["staleness"] is None


@pytest.mark.slow
def test_tiny_run_rolling_row_index_and_recall_by_brute_force(tiny_run):
  import torch
  from transformers import AutoTokenizer, DPRContextEncoder, RagSequenceForGeneration

  config, workdir, report = tiny_run
  export = workdir / "rolling" / "export"
  passages = list(read_dpr_tsv(workdir / "world_b" / "passages.tsv"))
  ctx_tok = AutoTokenizer.from_pretrained(str(export / "ctx_encoder"))
  ctx = DPRContextEncoder.from_pretrained(str(export / "ctx_encoder")).eval()
  enc = ctx_tok([p.title for p in passages], [p.text for p in passages], padding=True,
                return_tensors="pt")
  with torch.no_grad():
    fresh = ctx(**enc).pooler_output.numpy()
  emb = np.load(workdir / "index_rolling" / "embeddings" / "shard-00000.npy")
  np.testing.assert_allclose(emb, fresh, atol=1e-4)
  frozen = np.load(workdir / "index_b" / "embeddings" / "shard-00000.npy")
  assert np.abs(emb - frozen).max() > 1e-6  # the row's encoder moved: another index

  q_tok = AutoTokenizer.from_pretrained(str(export / "question_encoder_tokenizer"))
  rag = RagSequenceForGeneration.from_pretrained(str(export)).eval()
  questions = _lines(workdir / "world" / "val.source")
  q = q_tok(questions, padding=True, return_tensors="pt")
  with torch.no_grad():
    queries = rag.question_encoder(q["input_ids"], attention_mask=q["attention_mask"])[0].numpy()
  scores = queries @ emb.T  # [Q, N]
  row_of = {p.id: r for r, p in enumerate(passages)}
  gold = json.loads((workdir / "world" / "world.json").read_text())["heldout_gold_passages"]
  gold_scores = scores[np.arange(len(gold)), [row_of[g] for g in gold]]
  for k in config.eval.recall_ks:
    # ties within 1e-4 may go either way: the reported recall lies between the strict count
    # and the lenient one
    strict = np.mean((scores > gold_scores[:, None] - 1e-4).sum(1) <= k)
    lenient = np.mean((scores > gold_scores[:, None] + 1e-4).sum(1) < k)
    assert strict <= report["rows"]["rolling"]["recall"][f"recall@{k}"] + 1e-9
    assert report["rows"]["rolling"]["recall"][f"recall@{k}"] <= lenient + 1e-9
