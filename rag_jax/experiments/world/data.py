"""A synthetic knowledge world, generated from a seed: the default job's corpus and questions.

Invented people (made-up names, so no pretrained knowledge could help) with 4-6 of six
attributes (birthplace, employer, birth year, favourite colour, job, instrument). Every fact is
one titled passage (title = the person, text = one sentence), in the DPR corpus format; the
paper's 100-word chunks scaled down to the world's one-sentence facts (whole-entity passages
keep a from-scratch generator from learning to copy; docs/world.md).
Distractor passages mention the same names, cities and years without stating any asked fact:
one per city, and "meeting" notes pairing two people in a city and a year.

Questions come from 2-3 templates per attribute. The held-out split asks one fact per person
whose other facts appear in training questions, so the held-out answers are only in the
passages: a closed-book model can at best guess the attribute's most common value. A second
world changes a share of the held-out facts (new value, rewritten passage) for index
hot-swapping (paper section 4.5).

The harder variant (`WorldConfig(hard=True)`) gives people two-word names, multi-word values
("port velda", "orvane works"), and asks held-out questions with paraphrase templates never
used in training.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rag_jax.utils.atomic import atomic_directory

ATTRIBUTES = ("birthplace", "employer", "year", "colour", "job", "instrument")

# Sentence of each fact ({e}: the person, {v}: the value) and its question templates. The last
# template of each attribute is a paraphrase used only for held-out questions in a hard world.
SENTENCES = {
    "birthplace": "{e} was born in {v}",
    "employer": "{e} works for {v}",
    "year": "{e} was born in the year {v}",
    "colour": "the favourite colour of {e} is {v}",
    "job": "{e} works as a {v}",
    "instrument": "{e} plays the {v}",
}
TEMPLATES = {
    "birthplace": ("where was {e} born ?", "in which city was {e} born ?",
                   "what is the birthplace of {e} ?", "{e} comes from which town ?"),
    "employer": ("who employs {e} ?", "which company does {e} work for ?",
                 "{e} is employed by which firm ?"),
    "year": ("when was {e} born ?", "in what year was {e} born ?",
             "what is the birth year of {e} ?"),
    "colour": ("what is the favourite colour of {e} ?", "which colour does {e} like best ?",
               "{e} prefers which colour ?"),
    "job": ("what is the job of {e} ?", "what does {e} do for a living ?",
            "{e} earns a living as what ?"),
    "instrument": ("which instrument does {e} play ?", "what does {e} play ?",
                   "{e} performs on which instrument ?"),
}
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey",
           "pink", "brown", "teal")
JOBS = ("baker", "pilot", "farmer", "doctor", "teacher", "lawyer", "painter", "sailor", "miner",
        "tailor", "chemist", "judge", "nurse", "poet", "banker", "carpenter", "dentist", "singer",
        "weaver", "architect")
INSTRUMENTS = ("violin", "piano", "flute", "cello", "guitar", "harp", "drums", "trumpet", "oboe",
               "clarinet", "banjo", "lute", "organ", "tuba", "horn")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr",
           "kr", "tr", "th", "sh", "st")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ou", "ei")
_CODAS = ("", "n", "r", "l", "s", "th", "nd", "x", "k")
_COMPANY_SUFFIXES = ("works", "labs", "group", "holdings", "systems", "trading")
_CITY_PREFIXES = ("port", "north", "new", "upper", "lake", "fort")


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """The world's size and difficulty (configs/default.py holds the default job's)."""

  seed: int = 0  # Everything below is a pure function of the seed.
  num_people: int = 600  # Entities; each has 4-6 of the six attributes.
  num_cities: int = 40  # Birthplace values.
  num_companies: int = 30  # Employer values.
  first_year: int = 1900  # Birth years are first_year .. first_year + num_years - 1.
  num_years: int = 100
  num_meetings: int = 200  # Distractor passages naming two people, a city and a year.
  train_templates: int = 2  # Training questions per training fact (distinct templates).
  swap_fraction: float = 0.3  # Share of held-out facts changed in the second world.
  hard: bool = False  # Two-word names, multi-word values, paraphrased held-out questions.


@dataclasses.dataclass(frozen=True)
class Fact:
  person: str
  attribute: str
  value: str


@dataclasses.dataclass(frozen=True)
class Question:
  question: str
  answer: str
  fact: int  # Index into World.facts.


@dataclasses.dataclass
class World:
  """Facts, passages and question splits. passages: (id, title, text, fact index or -1)."""

  config: WorldConfig
  facts: list[Fact]
  passages: list[tuple[str, str, str, int]]
  train: list[Question]
  heldout: list[Question]
  values: dict[str, tuple[str, ...]]  # Attribute -> its possible values.

  def majority_accuracy(self, questions: Sequence[Question]) -> float:
    """Exact match of always answering the attribute's most common value in `questions`."""
    by_attr: dict[str, list[str]] = {}
    for q in questions:
      by_attr.setdefault(self.facts[q.fact].attribute, []).append(q.answer)
    hits = sum(max(answers.count(a) for a in set(answers)) for answers in by_attr.values())
    return hits / max(len(questions), 1)


def _words(rng: np.random.Generator, count: int, taken: set[str], syllables: tuple[int, int]
           ) -> list[str]:
  """`count` distinct invented words (not in `taken`, which they join)."""
  out = []
  while len(out) < count:
    n = int(rng.integers(syllables[0], syllables[1] + 1))
    word = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                   for _ in range(n)) + _CODAS[rng.integers(len(_CODAS))]
    if word not in taken and len(word) >= 4:
      taken.add(word)
      out.append(word)
  return out


def _values(rng: np.random.Generator, cfg: WorldConfig, taken: set[str]
            ) -> dict[str, tuple[str, ...]]:
  cities = _words(rng, cfg.num_cities, taken, (2, 3))
  companies = _words(rng, cfg.num_companies, taken, (2, 3))
  if cfg.hard:  # Multi-word values: "port velda", "orvane works".
    cities = [f"{_CITY_PREFIXES[rng.integers(len(_CITY_PREFIXES))]} {c}" if i % 2 else c
              for i, c in enumerate(cities)]
    companies = [f"{c} {_COMPANY_SUFFIXES[rng.integers(len(_COMPANY_SUFFIXES))]}"
                 for c in companies]
  years = [str(cfg.first_year + i) for i in range(cfg.num_years)]
  return {"birthplace": tuple(cities), "employer": tuple(companies), "year": tuple(years),
          "colour": COLOURS, "job": JOBS, "instrument": INSTRUMENTS}


def generate_world(cfg: WorldConfig = WorldConfig(), progress: bool = True) -> World:
  """The world of `cfg` (deterministic in cfg.seed); `progress`: a bar over the people."""
  rng = np.random.default_rng(cfg.seed)
  taken: set[str] = set()
  values = _values(rng, cfg, taken)
  names = _words(rng, cfg.num_people, taken, (2, 3))
  if cfg.hard:  # Two-word names: given name + family name (families are shared).
    families = _words(rng, max(cfg.num_people // 6, 2), taken, (2, 2))
    names = [f"{n} {families[rng.integers(len(families))]}" for n in names]
  facts: list[Fact] = []
  heldout_facts: list[int] = []
  for person in tqdm(names, desc="world", unit="person", dynamic_ncols=True,
                     disable=not progress):
    attrs = [ATTRIBUTES[i] for i in
             sorted(rng.choice(len(ATTRIBUTES), int(rng.integers(4, 7)), replace=False))]
    first = len(facts)
    for attr in attrs:
      vals = values[attr]
      facts.append(Fact(person, attr, vals[rng.integers(len(vals))]))
    heldout_facts.append(first + int(rng.integers(len(attrs))))

  passages = [(str(i + 1), f.person, SENTENCES[f.attribute].format(e=f.person, v=f.value), i)
              for i, f in enumerate(facts)]
  for city in values["birthplace"]:
    passages.append((str(len(passages) + 1), city,
                     f"{city} is a city with {int(rng.integers(2, 90)) * 1000} people", -1))
  for _ in range(cfg.num_meetings):
    a, b = rng.choice(len(names), 2, replace=False)
    city = values["birthplace"][rng.integers(len(values["birthplace"]))]
    year = values["year"][rng.integers(len(values["year"]))]
    passages.append((str(len(passages) + 1), f"meeting {len(passages) + 1}",
                     f"{names[a]} met {names[b]} in {city} in {year}", -1))
  order = rng.permutation(len(passages))  # Facts are not in person order in the corpus.
  passages = [(str(i + 1),) + passages[j][1:] for i, j in enumerate(order)]

  held = set(heldout_facts)
  train, heldout = [], []
  for i, fact in enumerate(facts):
    templates = TEMPLATES[fact.attribute]
    seen = templates[:-1] if cfg.hard else templates  # Hard: the last one is held-out only.
    if i in held:
      template = templates[-1] if cfg.hard else seen[rng.integers(len(seen))]
      heldout.append(Question(template.format(e=fact.person), fact.value, i))
    else:
      picks = rng.choice(len(seen), min(cfg.train_templates, len(seen)), replace=False)
      train.extend(Question(seen[t].format(e=fact.person), fact.value, i) for t in picks)
  return World(cfg, facts, passages, train, heldout, values)


def swap_facts(world: World) -> tuple[World, list[int]]:
  """The second world: `swap_fraction` of the held-out facts get another value (passages
  rewritten, questions kept, answers updated). Returns it and the changed fact indices."""
  cfg = world.config
  rng = np.random.default_rng([cfg.seed, 1])
  heldout = [q.fact for q in world.heldout]
  changed = sorted(int(i) for i in
                   rng.choice(heldout, int(round(cfg.swap_fraction * len(heldout))), replace=False))
  facts = list(world.facts)
  for i in changed:
    old = facts[i]
    choices = [v for v in world.values[old.attribute] if v != old.value]
    facts[i] = Fact(old.person, old.attribute, choices[rng.integers(len(choices))])
  passages = [(pid, title, SENTENCES[facts[f].attribute].format(e=facts[f].person,
                                                                 v=facts[f].value), f)
              if f in set(changed) else (pid, title, text, f)
              for pid, title, text, f in world.passages]
  relabel = lambda qs: [dataclasses.replace(q, answer=facts[q.fact].value) for q in qs]  # noqa: E731
  return World(cfg, facts, passages, relabel(world.train), relabel(world.heldout),
               world.values), changed


def _write_lines(path: Path, lines: Sequence[str]) -> None:
  for line in lines:
    if "\n" in line:
      raise ValueError(f"{path}: a line with a newline: {line!r}")
  path.write_text("".join(line + "\n" for line in lines))


def write_dpr_tsv(passages: Sequence[tuple[str, str, str, int]], path: Path) -> None:
  """DPR's psgs_w100.tsv layout: header id/text/title, excel-tab quoting."""
  with path.open("w", newline="") as f:
    writer = csv.writer(f, dialect="excel-tab")
    writer.writerow(["id", "text", "title"])
    for pid, title, text, _ in passages:
      writer.writerow([pid, text, title])


def write_world(world: World, swapped: World, changed: list[int], out: str | os.PathLike) -> Path:
  """Writes (atomically) the world directory:

    passages.tsv, passages_swapped.tsv    the two corpora (DPR format)
    {train,val}.{source,target}           questions / answers (val = held-out questions)
    val_swapped.target                    held-out answers in the second world
    world.json                            config, sizes, changed held-out rows, majority EM
  """
  out = Path(out)
  with atomic_directory(out) as tmp:
    write_dpr_tsv(world.passages, tmp / "passages.tsv")
    write_dpr_tsv(swapped.passages, tmp / "passages_swapped.tsv")
    for split, qs in (("train", world.train), ("val", world.heldout)):
      _write_lines(tmp / f"{split}.source", [q.question for q in qs])
      _write_lines(tmp / f"{split}.target", [q.answer for q in qs])
    _write_lines(tmp / "val_swapped.target", [q.answer for q in swapped.heldout])
    changed_set = set(changed)
    meta = {
        "config": dataclasses.asdict(world.config),
        "people": world.config.num_people, "facts": len(world.facts),
        "passages": len(world.passages),
        "distractor_passages": sum(1 for p in world.passages if p[3] < 0),
        "train_questions": len(world.train), "heldout_questions": len(world.heldout),
        "train_facts": len({q.fact for q in world.train}),
        "changed_heldout_rows": [r for r, q in enumerate(world.heldout) if q.fact in changed_set],
        "heldout_majority_em": world.majority_accuracy(world.heldout),
        # The passage (DPR id) holding each held-out question's fact, for retrieval recall.
        "heldout_gold_passages": _gold_ids(world, world.heldout),
        "train_gold_passages": _gold_ids(world, world.train),
    }
    (tmp / "world.json").write_text(json.dumps(meta, indent=1) + "\n")
  return out


def _gold_ids(world: World, questions: Sequence[Question]) -> list[str]:
  by_fact = {f: pid for pid, _, _, f in world.passages if f >= 0}
  return [by_fact[q.fact] for q in questions]


def build_world(cfg: WorldConfig, out: str | os.PathLike) -> dict:
  """Generates both worlds and writes them to `out`; returns world.json's content."""
  world = generate_world(cfg)
  swapped, changed = swap_facts(world)
  write_world(world, swapped, changed, out)
  return json.loads((Path(out) / "world.json").read_text())
