"""The synthetic world, its tokenizer and the dual-encoder retriever's pieces, checked against
brute-force recomputation from the generated facts."""

import numpy as np
import pytest

from rag_jax.experiments.world import data as wd
from rag_jax.experiments.world import tokenizer as world_tokenizer
from rag_jax.retrieval.corpus import read_dpr_tsv
from rag_jax.training import retriever_trainer as tr

SMALL = wd.WorldConfig(seed=3, num_people=80, num_cities=10, num_companies=8, num_meetings=20)


def test_heldout_facts_are_only_in_passages():
  w = wd.generate_world(SMALL)
  train_facts = {q.fact for q in w.train}
  held = [q.fact for q in w.heldout]
  assert len(held) == SMALL.num_people and not set(held) & train_facts
  # One held-out fact per person, whose other facts are all asked in training.
  people = [w.facts[f].person for f in held]
  assert len(set(people)) == len(people)
  for f in held:
    person = w.facts[f].person
    others = [i for i, x in enumerate(w.facts) if x.person == person and i != f]
    assert others and all(i in train_facts for i in others)
  # Each fact's value is stated by exactly its passage among the person's fact passages.
  texts = {fact: text for _, _, text, fact in w.passages if fact >= 0}
  for q in w.heldout:
    assert q.answer == w.facts[q.fact].value and texts[q.fact].endswith(" " + q.answer)
    assert w.facts[q.fact].person in q.question
  # No training question mentions a held-out (person, attribute) pair.
  asked = {(w.facts[q.fact].person, w.facts[q.fact].attribute) for q in w.train}
  assert not asked & {(w.facts[f].person, w.facts[f].attribute) for f in held}


def test_majority_baseline_by_brute_force():
  w = wd.generate_world(SMALL)
  best = 0
  for attr in wd.ATTRIBUTES:
    answers = [q.answer for q in w.heldout if w.facts[q.fact].attribute == attr]
    best += max((answers.count(v) for v in set(answers)), default=0)
  assert w.majority_accuracy(w.heldout) == best / len(w.heldout)


def test_swap_changes_the_chosen_share_and_nothing_else():
  w = wd.generate_world(SMALL)
  s, changed = wd.swap_facts(w)
  assert len(changed) == round(SMALL.swap_fraction * SMALL.num_people)
  assert set(changed) <= {q.fact for q in w.heldout}
  for i, (a, b) in enumerate(zip(w.facts, s.facts, strict=True)):
    assert (a.value != b.value) == (i in changed) and a.attribute == b.attribute
  diff = [(p, q) for p, q in zip(w.passages, s.passages, strict=True) if p != q]
  assert sorted(p[3] for p, _ in diff) == changed
  for (_, _, _, fact), (_, _, text, _) in diff:
    assert s.facts[fact].value in text and w.facts[fact].value not in text.split()


def test_files_are_dpr_format_and_deterministic(tmp_path):
  meta = wd.build_world(SMALL, tmp_path / "a")
  wd.build_world(SMALL, tmp_path / "b")
  for name in ("passages.tsv", "train.source", "val.target", "world.json"):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
  passages = list(read_dpr_tsv(tmp_path / "a" / "passages.tsv"))
  assert len(passages) == meta["passages"] == len({p.id for p in passages})
  by_id = {p.id: p for p in passages}
  answers = (tmp_path / "a" / "val.target").read_text().splitlines()
  for pid, answer in zip(meta["heldout_gold_passages"], answers, strict=True):
    assert by_id[pid].text.endswith(answer)
  swapped = (tmp_path / "a" / "val_swapped.target").read_text().splitlines()
  changed = [r for r, (a, b) in enumerate(zip(answers, swapped, strict=True)) if a != b]
  assert changed == meta["changed_heldout_rows"]


def test_hard_world_has_multiword_values_and_unseen_templates():
  w = wd.generate_world(wd.WorldConfig(seed=1, num_people=60, num_meetings=10, hard=True))
  assert all(len(f.person.split()) == 2 for f in w.facts)
  assert any(" " in q.answer for q in w.heldout)
  train_templates = {q.question.replace(w.facts[q.fact].person, "{e}") for q in w.train}
  for q in w.heldout:
    assert q.question.replace(w.facts[q.fact].person, "{e}") not in train_templates


def test_tokenizers_roundtrip(tmp_path):
  wd.build_world(SMALL, tmp_path / "w")
  texts = world_tokenizer.world_texts(tmp_path / "w")
  for kind in world_tokenizer.KINDS:
    tok = world_tokenizer.train_tokenizer(texts, kind, vocab_size=400)
    assert [tok.convert_ids_to_tokens(i) for i in range(4)] == list(world_tokenizer.SPECIAL_TOKENS)
    for text in texts[:200]:
      ids = tok(text)["input_ids"]
      assert ids[0] == 0 and ids[-1] == 2 and tok.unk_token_id not in ids
      assert tok.decode(ids, skip_special_tokens=True) == text.lower()


def test_answer_labels_with_the_decoder_start_prepended(tmp_path):
  """tokenize_qa's labels: the tokenizer's ids, or the start id + those ids, padded/truncated to
  max_target_length (checked per row against the tokenizer's own output)."""
  from rag_jax.data.qa import tokenize_qa
  wd.build_world(SMALL, tmp_path / "w")
  tok = world_tokenizer.train_tokenizer(world_tokenizer.world_texts(tmp_path / "w"), "word")
  answers = ["paris", "the red house", "a b c d e f g"]
  for start, length in ((None, 4), (0, 4), (2, 6)):
    labels = tokenize_qa(tok, tok, ["q"] * 3, answers, 8, length, start).labels
    assert labels.shape == (3, length) and labels.dtype == np.int32
    for row, answer in zip(labels, answers, strict=True):
      ids = tok(answer, add_special_tokens=True)["input_ids"]
      room = length - (start is not None)
      body = ids if len(ids) <= room else ids[:room - 1] + ids[-1:]  # truncation keeps </s>
      want = ([] if start is None else [start]) + body
      want += [tok.pad_token_id] * (length - len(want))
      assert row.tolist() == want, (start, length, answer)
  with pytest.raises(ValueError, match="max_target_length=2 leaves 1 label tokens"):
    tokenize_qa(tok, tok, ["q"], ["paris"], 8, 2, 0)


def test_in_batch_loss_and_recall_match_numpy():
  rng = np.random.default_rng(0)
  q, d = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32)
  ids = np.array([0, 1, 2, 1, 4, 5])  # rows 1 and 3 share a passage: not each other's negative
  scores = q @ d.T
  expected = []
  for i in range(6):
    keep = [j for j in range(6) if j == i or ids[j] != ids[i]]
    s = scores[i, keep]
    expected.append(np.log(np.exp(s - s.max()).sum()) + s.max() - scores[i, i])
  np.testing.assert_allclose(tr.in_batch_loss(q, d, ids), np.mean(expected), rtol=1e-5)

  passages = rng.normal(size=(50, 4))
  queries = rng.normal(size=(20, 4))
  gold = rng.integers(0, 50, 20)
  got = tr.recall_at_k(queries, passages, gold, ks=(1, 3, 10))
  ranks = [(queries[i] @ passages.T > queries[i] @ passages[gold[i]]).sum() for i in range(20)]
  for k in (1, 3, 10):
    assert got[f"recall@{k}"] == np.mean([r < k for r in ranks])
