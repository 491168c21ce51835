"""Outputs get the modes the umask gives, as a plain mkdir / open would make them: atomic writes
(tempfile.mkdtemp / mkstemp make their temporaries owner-only) and files a library writes 0600
(safetensors) included, so an index, a passage store, an export or a workdir's config.json is
readable to the rest of a team."""

import contextlib
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from configs import reversal as reversal_config
from rag_jax.checkpoints import load_pretrained, save_pretrained
from rag_jax.retrieval.corpus import Passage
from rag_jax.retrieval.embeddings import save_embeddings
from rag_jax.retrieval.store import write_store
from rag_jax.training import loop
from rag_jax.utils.atomic import atomic_directory, atomic_file
from tests import torch_reference as ref


@contextlib.contextmanager
def _umask(mask: int):
  old = os.umask(mask)
  try:
    yield
  finally:
    os.umask(old)


def _mode(path: Path) -> int:
  return stat.S_IMODE(path.stat().st_mode)


def _reference_modes(tmp_path: Path) -> tuple[int, int]:
  """(directory, file) modes of a plain os.mkdir and open(..., "w") under the current umask."""
  plain_dir, plain_file = tmp_path / "plain_dir", tmp_path / "plain_file"
  plain_dir.mkdir()
  plain_file.write_text("x")
  return _mode(plain_dir), _mode(plain_file)


@pytest.mark.parametrize("mask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_atomic_outputs_get_the_umasks_modes(tmp_path, mask):
  with _umask(mask):
    dir_mode, file_mode = _reference_modes(tmp_path)
    assert (dir_mode, file_mode) == (0o777 & ~mask, 0o666 & ~mask)
    with atomic_file(tmp_path / "report.json", "w") as f:
      f.write("{}")
    with atomic_directory(tmp_path / "out") as tmp:
      (tmp / "sub").mkdir(mode=0o700)
      (tmp / "sub" / "data.bin").write_bytes(b"x")
      os.chmod(tmp / "sub" / "data.bin", 0o600)  # as safetensors writes its files
      (tmp / "run.sh").write_text("#!/bin/sh\n")
      os.chmod(tmp / "run.sh", 0o700)
    store = write_store([Passage("1", "t", "x")], tmp_path / "passages", progress=False)
    save_embeddings(np.ones((3, 2), np.float32), tmp_path / "embeddings", shard_size=2)
    config = reversal_config.get_config()
    (tmp_path / "workdir").mkdir()
    loop.check_workdir(config, tmp_path / "workdir")
  store.close()
  assert _mode(tmp_path / "report.json") == file_mode
  assert _mode(tmp_path / "out") == dir_mode
  assert _mode(tmp_path / "out" / "sub") == dir_mode
  assert _mode(tmp_path / "out" / "sub" / "data.bin") == file_mode
  assert _mode(tmp_path / "out" / "run.sh") == 0o777 & ~mask  # keeps its execute bits
  for built in ("passages", "embeddings"):
    assert _mode(tmp_path / built) == dir_mode, built
    for path in (tmp_path / built).iterdir():
      assert _mode(path) == file_mode, path
  assert _mode(tmp_path / "workdir" / "config.json") == file_mode


def test_an_export_gets_the_umasks_modes(tmp_path):
  model, params = load_pretrained(ref.bart(tmp_path)[1])
  with _umask(0o022):
    dir_mode, file_mode = _reference_modes(tmp_path)
    export = save_pretrained(model, params, tmp_path / "export")
  assert _mode(export) == dir_mode == 0o755
  assert {p.name: _mode(p) for p in export.iterdir()} == {
      "config.json": file_mode, "model.safetensors": file_mode}
  assert file_mode == 0o644
