"""build_index never destroys what it did not write, refuses bad corpora before writing anything,
and survives SIGKILL at any of its stages: a rerun ends with the index an uninterrupted build
makes, and no partial directory is ever visible under the output's name."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rag_jax.commands import build_index
from rag_jax.retrieval.backends import load_index
from rag_jax.retrieval.embeddings import EmbeddingFormatError
from rag_jax.retrieval.pipeline import MANIFEST
from rag_jax.retrieval.store import PassageStore, StoreFormatError
from rag_jax.utils import lock
from rag_jax.utils.faults import KILL_ENV
from tests.test_retrieval_pipeline import world  # noqa: F401 (the fixture: corpus + encoders)

ROOT = Path(__file__).resolve().parents[1]


def _flags(root: Path, corpus: Path, out: Path, index: str = "exact") -> list[str]:
  return ["--corpus", str(corpus), "--encoder", str(root / "ctx"), "--out", str(out), "--index",
          index, "--batch_size", "8", "--max_length", "64", "--shard_size", "8", "--quiet"]


def _tree(path: Path) -> dict[str, bytes]:
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
          if p.is_file()}


def test_a_foreign_file_in_the_output_is_never_deleted(world, tmp_path, capsys):  # noqa: F811
  root, corpus, *_ = world
  out = tmp_path / "kb"
  assert build_index.main(_flags(root, corpus, out)) == 0
  mine = out / "index" / "my_notes.txt"
  mine.write_text("keep me")
  capsys.readouterr()
  assert build_index.main(_flags(root, corpus, out, "scann")) == 1
  assert mine.read_text() == "keep me"
  assert capsys.readouterr().err == (
      f"error: {mine} was not written by build_index (1 such file(s) under {out / 'index'}); "
      "refusing to replace it. Move it away and rerun\n")
  mine.unlink()
  assert build_index.main(_flags(root, corpus, out, "scann")) == 0  # ours alone: replaced

  # A directory holding build_index's names but no manifest was not written by it.
  other = tmp_path / "theirs"
  (other / "index").mkdir(parents=True)
  (other / "index" / "data.bin").write_bytes(b"x")
  assert build_index.main(_flags(root, corpus, other)) == 1
  assert capsys.readouterr().err == (
      f"error: {other} holds ['index'] but no {MANIFEST}: build_index did not write them (or an "
      "older version did); refusing to replace them. Choose a new --out, or move them away\n")
  assert _tree(other) == {"index/data.bin": b"x"}


def test_bad_corpora_are_refused_before_anything_is_written(world, tmp_path, capsys):  # noqa: F811
  root, corpus, *_ = world
  out = tmp_path / "kb"
  empty = tmp_path / "empty.tsv"
  empty.write_text("")
  binary = tmp_path / "binary.tsv"
  binary.write_bytes(b"Title\ttext\n\x89PNG\r\n\x1a\n\x00\xff")
  missing = tmp_path / "missing.tsv"
  expected = {
      empty: f"error: {empty}:1: empty file: no passages (nothing was written)\n",
      binary: f"error: {binary}:2: not valid UTF-8 at byte offset 11 (invalid start byte); is it "
              "a binary file? (nothing was written)\n",
      missing: f"error: {missing}: no such corpus file\n",
  }
  for bad, message in expected.items():
    capsys.readouterr()
    assert build_index.main(_flags(root, bad, out)) == 1
    assert capsys.readouterr().err == message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["binary.tsv", "empty.tsv"]
  # Blank lines only: read through, no passage, nothing committed.
  blank = tmp_path / "blank.jsonl"
  blank.write_text("\n")
  assert build_index.main(_flags(root, blank, out)) == 1
  assert capsys.readouterr().err == f"error: {blank}:1: empty file: no passages (nothing was " \
                                    "written)\n"
  # Filled, the same file and --out build (no record of the failed tries blocks the retry).
  empty.write_text(corpus.read_text())
  assert build_index.main(_flags(root, empty, out)) == 0
  assert (out / "build.json").exists()


KILL_POINTS = ["atomic_directory:passages", "encode:shard_written", "atomic_directory:index",
               "build_index:before_publish"]


def test_sigkill_at_each_stage_then_rerun_equals_an_uninterrupted_build(world, tmp_path):  # noqa: F811
  root, corpus, *_ = world
  reference = tmp_path / "reference"
  assert build_index.main(_flags(root, corpus, reference)) == 0
  expected = _tree(reference)
  out = tmp_path / "kb"
  env = {**os.environ, "PYTHONPATH": str(ROOT)}

  def run(point: str | None, index: str = "exact") -> int:
    cmd = [sys.executable, "-m", "rag_jax.commands.build_index", *_flags(root, corpus, out, index)]
    res = subprocess.run(cmd, env={**env, KILL_ENV: point or ""}, cwd=tmp_path,
                         capture_output=True, timeout=300, text=True)
    assert res.returncode in (0, -9), res.stderr[-3000:]
    return res.returncode

  # A new output: each run is killed one stage further on; OUT never exists partially.
  for point in KILL_POINTS:
    assert run(point) == -9, point
    assert not out.exists(), point
    assert (tmp_path / ".kb.partial").is_dir(), point
  assert run(None) == 0
  assert not (tmp_path / ".kb.partial").exists()
  got = _tree(out)
  assert got.pop(MANIFEST) and expected.pop(MANIFEST)
  assert got == expected

  # An existing output rebuilt in place (another index kind), killed as the new index is about
  # to replace the old: the old build stays whole and usable, and the rerun finishes the new one.
  assert run("atomic_directory:index", "scann") == -9
  got = _tree(out)
  assert [k for k in got if k.startswith(".index.tmp-")]  # the killed save's temporary ...
  assert {k: v for k, v in got.items() if not k.startswith(".")} == expected  # ... beside it
  assert run(None, "scann") == 0
  assert sorted(k for k in _tree(out) if k.startswith(".")) == [MANIFEST]  # swept by the rerun
  assert (out / "index" / "index.json").read_text().count("scann") >= 1
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_second_build_into_one_out_is_refused_naming_the_first(world, tmp_path, capsys):  # noqa: F811
  # Another live process holds --out's lock (.kb.lock beside it, as a running build writes it:
  # its pid, host and start time). The old build_index had no lock: the second build ran into
  # the first one's half-written output ("shard-00000.npy is missing").
  root, corpus, passages, *_ = world
  out = tmp_path / "kb"
  holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
  try:
    started = 1_700_000_000.0
    lock_file = tmp_path / ".kb.lock"
    lock_file.write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                     "started": started,
                                     "proc_start": lock.process_start(holder.pid)}))
    capsys.readouterr()
    assert build_index.main(_flags(root, corpus, out)) == 1
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    assert capsys.readouterr().err == (
        f"error: {out} is being built by pid {holder.pid} on host {socket.gethostname()} "
        f"(started {when}): a second build there would write over the files it is writing. "
        f"Wait for it to finish, stop it, or use another --out (if that process is gone, delete "
        f"{lock_file})\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".kb.lock"]  # nothing written
  finally:
    holder.kill()
    holder.wait()
  # Its owner gone (killed), the lock is stale: the next build takes it over, says so, builds,
  # and leaves no lock behind. With --quiet the one line printed says where the index went.
  assert build_index.main(_flags(root, corpus, out)) == 0
  printed = capsys.readouterr()
  assert printed.out == f"built an exact index of {len(passages)} passages x 32 in {out}/index\n"
  assert f"taking over the stale lock of pid {holder.pid}" in printed.err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["kb"]


def test_build_index_without_an_encoder_is_a_usage_error(world, tmp_path, capsys):  # noqa: F811
  root, corpus, *_ = world
  flags = _flags(root, corpus, tmp_path / "kb")
  at = flags.index("--encoder")
  del flags[at:at + 2]
  with pytest.raises(SystemExit) as exit_:
    build_index.main(flags)
  assert exit_.value.code == 2
  assert capsys.readouterr().err == (
      "error: flags encoder=None, dpr_embeddings=None: give --encoder (a DPRContextEncoder "
      "directory that encodes the passages) or --dpr_embeddings (DPR's wikipedia_passages_*.pkl "
      "files, with --allow_pickle) (see python -m rag_jax.commands.build_index --help)\n")
  assert not list(tmp_path.iterdir())


def test_damaged_files_are_named_and_a_rerun_rebuilds_them(world, tmp_path, capsys):  # noqa: F811
  # A shard of the saved index cut short on disk: named by the index's loader (the old one
  # opened it, then numpy failed with "mmap length is greater than file size", naming no file);
  # rerunning the same build encodes it again and rebuilds the index, as the message says.
  root, corpus, *_ = world
  out = tmp_path / "kb"
  assert build_index.main(_flags(root, corpus, out)) == 0
  whole = _tree(out)
  shard = out / "index" / "embeddings" / "shard-00001.npy"
  shard.write_bytes(shard.read_bytes()[:-7])
  with pytest.raises(EmbeddingFormatError, match=rf"^{shard}: \d+ bytes, expected \d+ .*"
                                                 r"rerun python -m rag_jax\.commands\.build_index "
                                                 r"with the same --corpus and --out"):
    load_index(out / "index")
  capsys.readouterr()
  assert build_index.main(_flags(root, corpus, out)) == 0
  assert "shard-00001.npy: " in capsys.readouterr().err  # the warning: encoded again
  assert _tree(out) == whole
  # A cut passage store: named; deleted and built again as the message says, the same files.
  text = out / "passages" / "text.bin"
  text.write_bytes(text.read_bytes()[:-3])
  with pytest.raises(StoreFormatError, match=rf"^{text}: \d+ bytes, expected \d+ .*delete "
                                             rf"{out / 'passages'} and rerun"):
    PassageStore(out / "passages")
  shutil.rmtree(out / "passages")
  assert build_index.main(_flags(root, corpus, out)) == 0
  assert _tree(out) == whole


def test_a_full_disk_names_the_output_directory(world, tmp_path, capsys, monkeypatch):  # noqa: F811
  """A write that fails with ENOSPC names no file; the one error line says it was under --out."""
  root, corpus, *_ = world
  out = tmp_path / "kb"

  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(build_index, "build_from_corpus", full_disk)
  assert build_index.main(_flags(root, corpus, out)) == 1
  assert capsys.readouterr().err == (
      f"error: No space left on device (errno 28); in a file under {out}\n")


def test_an_encoder_directory_without_its_vocabulary_is_named(world, tmp_path, capsys):  # noqa: F811
  """A DPR encoder directory whose tokenizer files are gone (no vocab.txt, no tokenizer.json):
  transformers' AutoTokenizer would build an empty vocabulary and every passage would encode as
  unknown tokens; build_index names the missing file and writes nothing."""
  root, corpus, *_ = world
  encoder = tmp_path / "ctx"
  shutil.copytree(root / "ctx", encoder)
  for name in ("vocab.txt", "tokenizer.json"):
    (encoder / name).unlink(missing_ok=True)
  flags = _flags(root, corpus, tmp_path / "kb")
  flags[flags.index("--encoder") + 1] = str(encoder)
  assert build_index.main(flags) == 1
  err = capsys.readouterr().err
  assert err.startswith(f"error: {encoder / 'vocab.txt'}: no such file"), err
  assert not (tmp_path / "kb").exists()
