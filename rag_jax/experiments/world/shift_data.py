"""World B of the shifted-world experiment: world A's facts, ids and questions, passages reworded.

World A (rag_jax.experiments.world.data) writes every fact as a passage titled with its person,
one name per passage: "X was born in V". World B keeps the title and the fact's words and names
the subject beside `co_mentions` other people:

    title "X", text "X , a friend of A , B and C , was born in V"

so that a question about X also matches every passage where X is a co-mention with the same
relation (about 3 per person and relation with 3 co-mentions). A context encoder trained on
world A (one name per passage) embeds these as a bag of names and cannot tell the subject from
the co-mentions; the subject is the title and the first name of the text, which a context
encoder trained on world B can learn. Distractor passages, passage ids, the questions, their
answers and gold passages are world A's: the gold passage of every question is the same DPR id
in both worlds. (A neutral title as well, "record", left the world-A encoder almost nothing:
held-out recall@5 0.02-0.10 with 1-5 co-mentions, too little for RAG's gradient to start from.)
"""

from __future__ import annotations

import dataclasses

import numpy as np

from rag_jax.experiments.world.data import SENTENCES, World

# How a co-mention is tied to the subject, picked per passage.
LINKS = ("a neighbour of", "a cousin of", "a friend of", "a colleague of")


def co_mention_text(names: list[str]) -> str:
  """"A", "A and B", "A , B and C" (the world writes punctuation as separate words)."""
  if len(names) == 1:
    return names[0]
  return " , ".join(names[:-1]) + " and " + names[-1]


def shifted_sentence(attribute: str, subject: str, value: str, link: str,
                     others: list[str]) -> str:
  """World A's sentence of the fact with "<subject> , <link> <others> ," as its subject."""
  subject_part = f"{subject} , {link} {co_mention_text(others)} ,"
  return SENTENCES[attribute].format(e=subject_part, v=value)


def shift_world(world: World, co_mentions: int, seed: int = 0) -> World:
  """World B of `world` (see the module docstring): each fact passage reworded with
  `co_mentions` other people (distinct, never the subject), drawn with `seed`; every other
  field is world A's."""
  if co_mentions < 1:
    raise ValueError(f"co_mentions = {co_mentions}: must be >= 1")
  people = sorted({f.person for f in world.facts})
  if co_mentions >= len(people):
    raise ValueError(f"co_mentions = {co_mentions}: the world has only {len(people)} people")
  rng = np.random.default_rng([world.config.seed, seed, 36])
  passages = []
  for pid, title, text, fact in world.passages:
    if fact < 0:
      passages.append((pid, title, text, fact))
      continue
    f = world.facts[fact]
    others: list[str] = []
    while len(others) < co_mentions:
      name = people[int(rng.integers(len(people)))]
      if name != f.person and name not in others:
        others.append(name)
    link = LINKS[int(rng.integers(len(LINKS)))]
    passages.append((pid, title, shifted_sentence(f.attribute, f.person, f.value, link,
                                                          others), fact))
  return dataclasses.replace(world, passages=passages)
