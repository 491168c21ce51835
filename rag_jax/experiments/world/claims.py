"""FEVER-like claims about a synthetic world (rag_jax.experiments.world.data), from its seed.

Each claim is one fact sentence of the world (`data.SENTENCES`: "{person} plays the {value}"),
so claims are entity-centric and share most of their words with the passage that decides them,
as FEVER's claims share words with their Wikipedia evidence. Three classes, as FEVER's:

  SUPPORTS         the fact's true value: the claim is the fact's passage, word for word;
  REFUTES          the value replaced by another value of the same attribute (e.g. another city);
  NOT ENOUGH INFO  an attribute the world never states for that person (people have 4-6 of the
                   six attributes), with a random value of that attribute. No passage of either
                   corpus states it: a person's only passages are their facts' sentences and the
                   meeting notes ("A met B in C in Y", which state no attribute), and world 2
                   changes values, never attributes. A held-out person with no passage at all
                   would be answerable from the title alone (no hit = no info), an easier
                   shortcut than FEVER's; a missing relation of a known entity must be read.

The split follows the world's held-out logic: SUPPORTS / REFUTES held-out claims are about the
held-out facts (never in a training question, so their values are only in the passages);
training claims about the training facts. NOT ENOUGH INFO pairs (person, missing attribute) are
split between the two, disjoint. Each split has the three classes in equal numbers.

Labels are written as single words (`LABEL_WORDS`), the targets a generator emits; the paper
trains RAG on FEVER the same way, each class mapped to one output token. The world's tokenizer
is trained on the world's text without them: rag_jax.experiments.world.fever adds them to the
generator's tokenizer as one token each.

Generation draws from its own random stream (`[seed, 2]`), so the world itself (`[seed]`) and
world 2 (`[seed, 1]`) are drawn exactly as without claims.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rag_jax.experiments.world.data import ATTRIBUTES, SENTENCES, World
from rag_jax.utils.atomic import atomic_directory

SUPPORTS, REFUTES, NOT_ENOUGH_INFO = "SUPPORTS", "REFUTES", "NOT ENOUGH INFO"
CLASSES = (SUPPORTS, REFUTES, NOT_ENOUGH_INFO)
# The target word of each class: one token each of the FEVER generator's tokenizer.
LABEL_WORDS = {SUPPORTS: "supports", REFUTES: "refutes", NOT_ENOUGH_INFO: "unverifiable"}


@dataclasses.dataclass(frozen=True)
class Claim:
  claim: str  # The sentence: data.SENTENCES[attribute] with person and value.
  label: str  # One of CLASSES.
  person: str
  attribute: str
  value: str  # The value the claim states.
  fact: int  # The world fact it is about (index into World.facts); -1 for NOT ENOUGH INFO.

  @property
  def target(self) -> str:
    return LABEL_WORDS[self.label]


def _claim(world: World, fact: int, value: str, label: str) -> Claim:
  f = world.facts[fact]
  return Claim(SENTENCES[f.attribute].format(e=f.person, v=value), label, f.person, f.attribute,
               value, fact)


def _other_value(rng: np.random.Generator, values: Sequence[str], value: str) -> str:
  choices = [v for v in values if v != value]
  return choices[rng.integers(len(choices))]


def generate_claims(world: World) -> tuple[list[Claim], list[Claim]]:
  """(training claims, held-out claims) of `world`, each split balanced over CLASSES and
  shuffled (deterministic in world.config.seed)."""
  rng = np.random.default_rng([world.config.seed, 2])
  heldout_facts = sorted({q.fact for q in world.heldout})
  train_facts = sorted({q.fact for q in world.train} - set(heldout_facts))
  stated = {(f.person, f.attribute) for f in world.facts}
  people = list(dict.fromkeys(f.person for f in world.facts))
  unstated = [(p, a) for p in people for a in ATTRIBUTES if (p, a) not in stated]
  unstated = [unstated[i] for i in rng.permutation(len(unstated))]
  n_heldout = min(len(heldout_facts) // 2, len(unstated) // 3)
  n_train = min(len(train_facts) // 2, len(unstated) - n_heldout)

  def split(facts: list[int], n: int, nei: list[tuple[str, str]]) -> list[Claim]:
    picked = [facts[i] for i in rng.choice(len(facts), 2 * n, replace=False)]
    out = [_claim(world, i, world.facts[i].value, SUPPORTS) for i in picked[:n]]
    out += [_claim(world, i, _other_value(rng, world.values[world.facts[i].attribute],
                                          world.facts[i].value), REFUTES) for i in picked[n:]]
    for person, attr in nei:
      vals = world.values[attr]
      value = vals[rng.integers(len(vals))]
      out.append(Claim(SENTENCES[attr].format(e=person, v=value), NOT_ENOUGH_INFO, person, attr,
                       value, -1))
    return [out[i] for i in rng.permutation(len(out))]

  train = split(train_facts, n_train, unstated[n_heldout:n_heldout + n_train])
  heldout = split(heldout_facts, n_heldout, unstated[:n_heldout])
  return train, heldout


def write_claims(world: World, train: Sequence[Claim], heldout: Sequence[Claim],
                 out: str | os.PathLike) -> Path:
  """Writes (atomically) a claims directory in the RAG trainer's data layout:

    {train,val}.{source,target}   claims / label words (val = held-out claims)
    claims.json                   per class counts, labels, and per held-out claim its class and
                                  the DPR id of the passage deciding it ("" for NOT ENOUGH INFO)
  """
  passage_of = {f: pid for pid, _, _, f in world.passages if f >= 0}
  with atomic_directory(Path(out)) as tmp:
    for name, claims in (("train", train), ("val", heldout)):
      (tmp / f"{name}.source").write_text("".join(c.claim + "\n" for c in claims))
      (tmp / f"{name}.target").write_text("".join(c.target + "\n" for c in claims))
    meta = {"label_words": LABEL_WORDS,
            "train_counts": {k: sum(c.label == k for c in train) for k in CLASSES},
            "heldout_counts": {k: sum(c.label == k for c in heldout) for k in CLASSES},
            "heldout_labels": [c.label for c in heldout],
            "heldout_gold_passages": [passage_of[c.fact] if c.fact >= 0 else ""
                                      for c in heldout]}
    (tmp / "claims.json").write_text(json.dumps(meta, indent=1) + "\n")
  return Path(out)
