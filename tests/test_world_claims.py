"""FEVER-like claims (rag_jax.experiments.world.claims) against a brute-force reading of the
generated world's passages: what each claim says is checked by scanning the corpora's text for
the fact sentences of every value, not through the generator's own bookkeeping."""

import dataclasses
import json

import numpy as np
import pytest

from rag_jax.experiments.world import claims as world_claims
from rag_jax.experiments.world import data, fever
from rag_jax.experiments.world.tokenizer import train_tokenizer, world_texts

CONFIGS = {"default": data.WorldConfig(num_people=150, num_meetings=40),
           "hard": data.WorldConfig(num_people=150, num_meetings=40, hard=True)}


def _stated_values(passages, person: str, attribute: str, values) -> set[str]:
  """Values v such that some passage's text contains the sentence "<person> ... <v>" of
  `attribute` as whole words (a scan of the text, both corpora passed in)."""
  needles = {v: f" {data.SENTENCES[attribute].format(e=person, v=v)} " for v in values}
  texts = [f" {text} " for _, _, text, _ in passages if f" {person} " in f" {text} "]
  return {v for v, needle in needles.items() if any(needle in t for t in texts)}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def world_and_claims(request):
  world = data.generate_world(CONFIGS[request.param])
  swapped, _ = data.swap_facts(world)
  return world, swapped, world_claims.generate_claims(world)


def test_every_claim_says_what_its_label_says_by_scanning_the_passages(world_and_claims):
  world, swapped, (train, heldout) = world_and_claims
  corpora = world.passages + swapped.passages
  for c in train + heldout:
    values = world.values[c.attribute]
    assert c.claim == data.SENTENCES[c.attribute].format(e=c.person, v=c.value)
    assert c.value in values
    stated = _stated_values(world.passages, c.person, c.attribute, values)
    if c.label == world_claims.SUPPORTS:
      assert stated == {c.value}, c
      assert world.facts[c.fact] == data.Fact(c.person, c.attribute, c.value)
    elif c.label == world_claims.REFUTES:
      assert len(stated) == 1 and c.value not in stated, c
      assert world.facts[c.fact].value in stated and world.facts[c.fact].person == c.person
    else:
      assert c.label == world_claims.NOT_ENOUGH_INFO and c.fact == -1
      assert not _stated_values(corpora, c.person, c.attribute, values), c
      assert any(f.person == c.person for f in world.facts)  # A known person, unstated relation.


def test_balanced_classes_and_the_worlds_heldout_split(world_and_claims):
  world, _, (train, heldout) = world_and_claims
  for split in (train, heldout):
    counts = {k: sum(c.label == k for c in split) for k in world_claims.CLASSES}
    assert len(set(counts.values())) == 1 and counts[world_claims.SUPPORTS] > 0, counts
  heldout_facts = {q.fact for q in world.heldout}
  assert {c.fact for c in heldout if c.fact >= 0} <= heldout_facts
  assert not {c.fact for c in train if c.fact >= 0} & heldout_facts
  nei = lambda cs: {(c.person, c.attribute) for c in cs if c.fact < 0}  # noqa: E731
  assert not nei(train) & nei(heldout)
  unstated = sum(len(data.ATTRIBUTES) - n for n in
                 np.unique([f.person for f in world.facts], return_counts=True)[1])
  assert len(heldout) == 3 * min(len(heldout_facts) // 2, unstated // 3)


def test_claims_are_a_function_of_the_seed_and_leave_the_world_unchanged():
  cfg = CONFIGS["default"]
  world = data.generate_world(cfg)
  first = world_claims.generate_claims(world)
  assert world_claims.generate_claims(data.generate_world(cfg)) == first
  assert data.generate_world(cfg) == world  # Claims draw from their own stream.
  other = world_claims.generate_claims(data.generate_world(dataclasses.replace(cfg, seed=1)))
  assert other != first


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_labels_are_single_tokens_and_world_token_ids_are_kept(tmp_path, kind):
  cfg = dataclasses.replace(CONFIGS["hard" if kind == "bpe" else "default"], num_people=60)
  world = data.generate_world(cfg)
  swapped, changed = data.swap_facts(world)
  data.write_world(world, swapped, changed, tmp_path / "world")
  texts = world_texts(tmp_path / "world")
  base = train_tokenizer(texts, kind, vocab_size=1000)
  labelled = fever.add_label_tokens(train_tokenizer(texts, kind, vocab_size=1000))
  assert len(labelled) == len(base) + 3
  for word in world_claims.LABEL_WORDS.values():
    ids = labelled(word)["input_ids"]
    assert len(ids) == 3 and ids[1] >= len(base), (word, ids)  # <s> label </s>
    assert labelled.decode(ids, skip_special_tokens=True).strip() == word
  train, heldout = world_claims.generate_claims(world)
  sample = texts[:200] + [c.claim for c in train + heldout]
  assert labelled(sample)["input_ids"] == base(sample)["input_ids"]


def test_written_claims_directory(tmp_path):
  world = data.generate_world(CONFIGS["default"])
  train, heldout = world_claims.generate_claims(world)
  world_claims.write_claims(world, train, heldout, tmp_path / "claims")
  lines = lambda name: (tmp_path / "claims" / name).read_text().splitlines()  # noqa: E731
  assert lines("val.source") == [c.claim for c in heldout]
  assert set(lines("train.target")) == set(world_claims.LABEL_WORDS.values())
  meta = json.loads((tmp_path / "claims" / "claims.json").read_text())
  texts = {pid: text for pid, _, text, _ in world.passages}
  for c, pid in zip(heldout, meta["heldout_gold_passages"], strict=True):
    if c.label == world_claims.NOT_ENOUGH_INFO:
      assert pid == ""
    else:  # The deciding passage states the claim's person and attribute.
      assert _stated_values([(pid, "", texts[pid], 0)], c.person, c.attribute,
                            world.values[c.attribute]), (c, texts[pid])
  assert np.all(np.asarray(list(meta["heldout_counts"].values())) == len(heldout) // 3)
