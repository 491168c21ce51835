"""Every passage's generator part, pre-tokenized into one fixed-width array, and the generator
rows assembled from it with static shapes (on the device, inside a jitted step).

The generator input of (question, passage) is built by `contexts.ContextAssembler` as

    head + (passage part + question part)[:room] + tail, padded with pad to max_combined_length

(head/tail: the tokenizer's specials, e.g. <s> and </s>; room = max_combined_length - |head| -
|tail|). A passage part longer than `room` never contributes more than `room` tokens, so a
table of width `room` holds every passage exactly: tokens [N, room] (uint16 when the vocabulary
fits, else int32) and lengths [N] int32 (min(len(part), room)). `assemble_rows` then joins the
gathered parts with the question parts using only gathers and selects: the same ids as
ContextAssembler.assemble for every row, including passages that fill the room and questions
truncated to nothing.

On disk (a directory written atomically, beside the index): tokens.npy, lengths.npy and
table.json (the format, the shapes, head / tail / pad ids, the context format and the
tokenizer's vocabulary size, checked against the generator tokenizer before training).

Training the context encoder needs a second table: every passage as the context encoder reads it
(`EncoderTable`, `[CLS] title [SEP] text [SEP]` from the context tokenizer, as the index was
encoded), so the step re-encodes its retrieved passages from rows gathered on the devices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from rag_jax.data.contexts import ContextAssembler
from rag_jax.utils.atomic import atomic_directory
from rag_jax.utils.errors import UserError

TABLE_FORMAT = "rag_jax.passage_table/1"
ENCODER_TABLE_FORMAT = "rag_jax.encoder_table/1"


def tokenizer_sha(tokenizer: Any) -> str:
  """Fingerprint of a tokenizer's class and vocabulary (token -> id)."""
  vocab = sorted(tokenizer.get_vocab().items())
  text = json.dumps([type(tokenizer).__name__, vocab], ensure_ascii=False)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


class PassageTableMismatch(UserError, ValueError):
  """A passage table built for another tokenizer or context format than the model's."""


def read_table_files(path: Path, table_format: str, mmap: bool
                     ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
  """A table directory's table.json (of `table_format`), tokens.npy and lengths.npy. A file
  missing, not JSON or cut short is a PassageTableMismatch naming it: the directory is a cache
  of the corpus, so deleting it makes the next run build it again."""
  remedy = f"delete {path} and it is built again from the passage store"
  meta_file = path / "table.json"
  try:
    meta = json.loads(meta_file.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise PassageTableMismatch(f"{meta_file}: unreadable ({e}); {remedy}") from e
  if not isinstance(meta, dict) or meta.get("format") != table_format:
    found = meta.get("format") if isinstance(meta, dict) else None
    raise PassageTableMismatch(f"{meta_file}: format {found!r}, expected {table_format!r}")
  arrays = []
  for name in ("tokens.npy", "lengths.npy"):
    try:
      arrays.append(np.load(path / name, mmap_mode="r" if mmap else None))
    except (OSError, ValueError, EOFError) as e:
      raise PassageTableMismatch(f"{path / name}: unreadable or cut short ({e}); {remedy}") from e
  return meta, arrays[0], arrays[1]


@dataclasses.dataclass(frozen=True)
class TableSpec:
  """What a table was built for; two specs must be equal for a table to serve a model."""

  vocab_size: int  # The generator tokenizer's vocabulary (len(tokenizer)).
  width: int  # room = max_combined_length - len(head) - len(tail).
  max_combined_length: int
  head: tuple[int, ...]  # Special ids before the content, e.g. (<s>,).
  tail: tuple[int, ...]  # Special ids after it, e.g. (</s>,).
  pad_id: int
  title_sep: str
  doc_sep: str
  prefix: str | None
  tokenizer_sha: str  # Of the tokenizer's class and vocabulary: another tokenizer, other ids.

  @classmethod
  def of(cls, assembler: ContextAssembler) -> TableSpec:
    fmt = assembler.fmt
    width = fmt.max_combined_length - len(assembler.head) - len(assembler.tail)
    if width <= 0:
      raise ValueError(f"max_combined_length {fmt.max_combined_length} leaves no room for "
                       f"content after the special tokens {assembler.head + assembler.tail}")
    return cls(len(assembler.tokenizer), width, fmt.max_combined_length,
               tuple(assembler.head), tuple(assembler.tail), int(assembler.pad_id),
               fmt.title_sep, fmt.doc_sep, fmt.prefix, tokenizer_sha(assembler.tokenizer))

  def key(self) -> str:
    """A short name for this spec (tables of several models can sit beside one index)."""
    text = json.dumps(dataclasses.asdict(self), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(np.uint16) if self.vocab_size <= 1 << 16 else np.dtype(np.int32)


@dataclasses.dataclass
class PassageTable:
  """tokens [N, width] (uint16 or int32), lengths [N] int32, and the spec they follow."""

  tokens: np.ndarray
  lengths: np.ndarray
  spec: TableSpec

  def __len__(self) -> int:
    return len(self.lengths)

  def check(self, assembler: ContextAssembler, count: int | None = None) -> None:
    """Raises PassageTableMismatch (naming the field) unless this table serves `assembler`'s
    tokenizer and format, and, if given, an index of `count` passages."""
    want = TableSpec.of(assembler)
    for field in dataclasses.fields(TableSpec):
      got, expected = getattr(self.spec, field.name), getattr(want, field.name)
      if got != expected:
        raise PassageTableMismatch(
            f"passage table {field.name}={got!r} but the generator tokenizer / RAG config give "
            f"{expected!r}; rebuild the table for this model (build_passage_table)")
    if self.tokens.shape != (len(self), self.spec.width):
      raise PassageTableMismatch(f"passage table tokens have shape {self.tokens.shape}, "
                                 f"expected ({len(self)}, {self.spec.width})")
    if count is not None and len(self) != count:
      raise PassageTableMismatch(f"passage table has {len(self)} passages but the index has "
                                 f"{count}")

  def save(self, path: str | os.PathLike, overwrite: bool = True) -> None:
    with atomic_directory(path, overwrite=overwrite) as tmp:
      np.save(tmp / "tokens.npy", self.tokens)
      np.save(tmp / "lengths.npy", self.lengths)
      meta = {"format": TABLE_FORMAT, "count": len(self), **dataclasses.asdict(self.spec)}
      (tmp / "table.json").write_text(json.dumps(meta, indent=2) + "\n")

  @classmethod
  def load(cls, path: str | os.PathLike, mmap: bool = True) -> PassageTable:
    path = Path(path)
    meta_file = path / "table.json"
    if not meta_file.is_file():
      raise FileNotFoundError(f"{meta_file} not found: no passage table at {path} (build one "
                              "with rag_jax.data.passage_table.build_passage_table)")
    meta, tokens, lengths = read_table_files(path, TABLE_FORMAT, mmap)
    fields = {f.name for f in dataclasses.fields(TableSpec)}
    spec = TableSpec(**{k: (tuple(v) if k in ("head", "tail") else v)
                        for k, v in meta.items() if k in fields})
    if len(lengths) != meta["count"] or tokens.shape != (meta["count"], spec.width):
      raise PassageTableMismatch(f"{path}: tokens {tokens.shape} / lengths {lengths.shape} do "
                                 f"not match table.json (count {meta['count']}, width "
                                 f"{spec.width})")
    return cls(tokens, lengths, spec)


def build_passage_table(titles_and_texts: Any, count: int, assembler: ContextAssembler,
                        block: int = 4096, progress: bool = True) -> PassageTable:
  """Tokenizes every passage's part once.

  Args:
    titles_and_texts: f(start, stop) -> (titles, texts) lists for rows [start, stop) (e.g.
      rag_jax.retrieval.store.PassageStore.titles_and_texts).
    count: number of passages.
    assembler: the generator tokenizer and context format of the model the table serves.
  """
  spec = TableSpec.of(assembler)
  tokens = np.zeros((count, spec.width), spec.dtype)
  lengths = np.zeros((count,), np.int32)
  with tqdm(total=count, desc="passage table", unit="passage", disable=not progress) as bar:
    for start in range(0, count, block):
      stop = min(count, start + block)
      titles, texts = titles_and_texts(start, stop)
      for row, (title, text) in enumerate(zip(titles, texts, strict=True), start):
        ids = assembler.passage_ids(title, text)[:spec.width]
        tokens[row, :len(ids)] = ids
        lengths[row] = len(ids)
      bar.update(stop - start)
  return PassageTable(tokens, lengths, spec)


def load_or_build(directory: str | os.PathLike, titles_and_texts: Any, count: int,
                  assembler: ContextAssembler, progress: bool = True) -> PassageTable:
  """The table for `assembler` under directory/<spec key>, built and saved there first if it
  does not exist (atomically: an interrupted build leaves nothing behind). Tables for other
  tokenizers or formats in the same directory are left alone."""
  spec = TableSpec.of(assembler)
  path = Path(directory) / spec.key()
  if (path / "table.json").is_file():
    table = PassageTable.load(path)
  else:
    table = build_passage_table(titles_and_texts, count, assembler, progress=progress)
    table.save(path, overwrite=False)
  table.check(assembler, count=count)
  return table


def question_parts(assembler: ContextAssembler, questions: Sequence[str]
                   ) -> tuple[np.ndarray, np.ndarray]:
  """The questions' parts (doc_sep's trailing space + question), padded: ids [B, width] int32
  and lengths [B] int32; width = the table width (a longer part never fits a row)."""
  width = TableSpec.of(assembler).width
  parts = [assembler.question_ids(q)[:width] for q in questions]
  ids = np.zeros((len(parts), width), np.int32)
  for i, part in enumerate(parts):
    ids[i, :len(part)] = part
  return ids, np.asarray([len(p) for p in parts], np.int32)


def assemble_rows(passage_tokens: jax.Array, passage_lengths: jax.Array,
                  question_tokens: jax.Array, question_lengths: jax.Array,
                  spec: TableSpec) -> tuple[jax.Array, jax.Array]:
  """Generator rows from gathered passage parts, as ContextAssembler.assemble builds them.

  Args:
    passage_tokens: [B, n, W] ids of each question's n passages' parts (W = spec.width).
    passage_lengths: [B, n].
    question_tokens: [B, Wq] the questions' parts; question_lengths: [B].
  Returns:
    (ids, mask): [B, n, max_combined_length] int32, batch-major like the host path.
  """
  b, n, width = passage_tokens.shape
  head, tail = jnp.asarray(spec.head, jnp.int32), jnp.asarray(spec.tail, jnp.int32)
  nh, nt, length = len(spec.head), len(spec.tail), spec.max_combined_length
  p_len = passage_lengths.astype(jnp.int32)[..., None]  # [B, n, 1]
  q_len = question_lengths.astype(jnp.int32)[:, None, None]  # [B, 1, 1]
  content = jnp.minimum(p_len + q_len, width)  # [B, n, 1] tokens between head and tail
  t = jnp.arange(length, dtype=jnp.int32)[None, None, :]  # [1, 1, L]
  r = t - nh  # position inside the content
  from_passage = jnp.take_along_axis(passage_tokens.astype(jnp.int32),
                                     jnp.clip(r, 0, width - 1) * jnp.ones_like(p_len), axis=2)
  q_pos = jnp.clip(r - p_len, 0, question_tokens.shape[1] - 1)  # [B, n, L]
  from_question = jnp.take_along_axis(question_tokens.astype(jnp.int32)[:, None, :]
                                      * jnp.ones((1, n, 1), jnp.int32), q_pos, axis=2)
  token = jnp.where(r < p_len, from_passage, from_question)
  tail_pos = jnp.clip(r - content, 0, max(nt - 1, 0))
  tail_tok = tail[tail_pos] if nt else jnp.zeros_like(r)
  head_tok = head[jnp.clip(t, 0, max(nh - 1, 0))] if nh else jnp.zeros_like(t)
  ids = jnp.where(t < nh, head_tok,
                  jnp.where(r < content, token,
                            jnp.where(r < content + nt, tail_tok, spec.pad_id)))
  mask = (r < content + nt).astype(jnp.int32)
  return ids.astype(jnp.int32), mask


@dataclasses.dataclass
class EncoderTable:
  """Every passage tokenized for the context encoder: tokens [N, Lc] (uint16 when the vocabulary
  fits, else int32; padded with pad_id), lengths [N] int32 (real tokens, specials included);
  Lc = the longest passage after truncation to max_length."""

  tokens: np.ndarray
  lengths: np.ndarray
  pad_id: int
  tokenizer_sha: str
  max_length: int

  def __len__(self) -> int:
    return len(self.lengths)

  @property
  def width(self) -> int:
    return self.tokens.shape[1]

  def save(self, path: str | os.PathLike, overwrite: bool = True) -> None:
    with atomic_directory(path, overwrite=overwrite) as tmp:
      np.save(tmp / "tokens.npy", self.tokens)
      np.save(tmp / "lengths.npy", self.lengths)
      meta = {"format": ENCODER_TABLE_FORMAT, "count": len(self), "width": self.width,
              "pad_id": self.pad_id, "tokenizer_sha": self.tokenizer_sha,
              "max_length": self.max_length}
      (tmp / "table.json").write_text(json.dumps(meta, indent=2) + "\n")

  @classmethod
  def load(cls, path: str | os.PathLike, mmap: bool = True) -> EncoderTable:
    path = Path(path)
    meta, tokens, lengths = read_table_files(path, ENCODER_TABLE_FORMAT, mmap)
    if tokens.shape != (meta["count"], meta["width"]) or len(lengths) != meta["count"]:
      raise PassageTableMismatch(f"{path}: tokens {tokens.shape} / lengths {lengths.shape} do "
                                 f"not match table.json")
    return cls(tokens, lengths, meta["pad_id"], meta["tokenizer_sha"], meta["max_length"])


def build_encoder_table(titles_and_texts: Any, count: int, tokenizer: Any, max_length: int,
                        block: int = 4096, progress: bool = True) -> EncoderTable:
  """Tokenizes every passage once as the context encoder reads it: the tokenizer's pair encoding
  of (title, text), truncated longest-first to max_length (as transformers' RagRetriever
  tokenizes its retrieved docs for the context encoder, and as the index was encoded).

  titles_and_texts: f(start, stop) -> (titles, texts) for rows [start, stop).
  """
  dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.int32
  pad_id = int(tokenizer.pad_token_id)
  tokens = np.full((count, max_length), pad_id, dtype)
  lengths = np.zeros((count,), np.int32)
  with tqdm(total=count, desc="encoder table", unit="passage", disable=not progress) as bar:
    for start in range(0, count, block):
      stop = min(count, start + block)
      titles, texts = titles_and_texts(start, stop)
      enc = tokenizer(list(titles), list(texts), truncation=True, max_length=max_length,
                      return_attention_mask=False, return_token_type_ids=False)
      for row, ids in enumerate(enc["input_ids"], start):
        tokens[row, :len(ids)] = ids
        lengths[row] = len(ids)
      bar.update(stop - start)
  width = max(1, int(lengths.max(initial=0)))
  return EncoderTable(np.ascontiguousarray(tokens[:, :width]), lengths, pad_id,
                      tokenizer_sha(tokenizer), max_length)


def load_or_build_encoder_table(directory: str | os.PathLike, titles_and_texts: Any,
                                count: int, tokenizer: Any, max_length: int,
                                progress: bool = True) -> EncoderTable:
  """The encoder table for (`tokenizer`, `max_length`) under directory/encoder-<key>, built and
  saved there first if it does not exist (atomically), as load_or_build does for passage
  tables."""
  sha = tokenizer_sha(tokenizer)
  key = hashlib.sha256(f"{sha}/{max_length}".encode()).hexdigest()[:16]
  path = Path(directory) / f"encoder-{key}"
  if (path / "table.json").is_file():
    table = EncoderTable.load(path)
  else:
    table = build_encoder_table(titles_and_texts, count, tokenizer, max_length,
                                progress=progress)
    table.save(path, overwrite=False)
  if (table.tokenizer_sha, table.max_length, len(table)) != (sha, max_length, count):
    raise PassageTableMismatch(f"{path}: an encoder table for another tokenizer, length or "
                               f"corpus ({len(table)} passages, max_length {table.max_length})")
  return table


def encoder_rows(tokens: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Gathered EncoderTable rows -> the context encoder's inputs.

  tokens: [..., Lc]; lengths: [...]. Returns (input_ids, attention_mask), both [..., Lc] int32
  (right padded, as the context tokenizer pads).
  """
  positions = jnp.arange(tokens.shape[-1], dtype=jnp.int32)  # [Lc]
  mask = (positions < lengths.astype(jnp.int32)[..., None]).astype(jnp.int32)
  return tokens.astype(jnp.int32), mask
