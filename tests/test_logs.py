"""The console shows warnings and errors only; the workdir's log file gets everything from INFO
(rag_jax/utils/logs.py), also when a job's phase opens its own log file inside the job's."""

from __future__ import annotations

import errno
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rag_jax.utils.logs import WorkdirLogFile, workdir_logging


@pytest.fixture
def console():
  """A handler on the root logger standing in for absl's stderr handler."""
  stream = io.StringIO()
  handler = logging.StreamHandler(stream)
  root = logging.getLogger()
  root.addHandler(handler)
  yield stream
  root.removeHandler(handler)


def test_info_goes_to_the_files_and_warnings_also_to_the_console(console, tmp_path):
  log = logging.getLogger("rag_jax.test")
  (tmp_path / "phase").mkdir()
  with workdir_logging(tmp_path):
    log.info("job info 1")
    with workdir_logging(tmp_path / "phase"):
      log.info("phase info")
      log.warning("phase warning")
    log.info("job info 2")  # after the nested block ended: still kept off the console
    log.warning("job warning")
  job_file = (tmp_path / "train.log").read_text()
  phase_file = (tmp_path / "phase" / "train.log").read_text()
  for line in ("job info 1", "phase info", "phase warning", "job info 2", "job warning"):
    assert line in job_file
  assert "phase info" in phase_file and "job info" not in phase_file
  assert console.getvalue().splitlines() == ["phase warning", "job warning"]


def test_orbax_handler_override_note_stays_off_the_console(console, tmp_path):
  record = logging.LogRecord("absl", logging.WARNING,
                             "/site-packages/orbax/checkpoint/type_handler_registry.py", 108,
                             "Type handler registry overriding jax.Array", None, None)
  with workdir_logging(tmp_path):
    logging.getLogger().handle(record)
  assert console.getvalue() == ""
  assert "overriding jax.Array" in (tmp_path / "train.log").read_text()


def test_the_block_restores_the_root_level_and_handlers(console, tmp_path):
  root = logging.getLogger()
  level, handlers = root.level, list(root.handlers)
  with workdir_logging(tmp_path):
    assert root.level == logging.INFO
  assert root.level == level and root.handlers == handlers
  logging.getLogger("rag_jax.test").warning("after")
  assert console.getvalue() == "after\n"


def test_no_pytorch_advice_on_a_torch_less_install():
  """rag_jax needs no PyTorch: transformers' import-time "PyTorch was not found" advice must not
  reach a user who installed requirements.txt only (torch hidden here from the import system)."""
  hide_torch = ("import importlib.util, sys\n"
                "real = importlib.util.find_spec\n"
                "importlib.util.find_spec = lambda n, *a, **k: (None if n.split('.')[0] == 'torch'"
                " else real(n, *a, **k))\n"
                "import rag_jax.checkpoints\n")
  env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
  result = subprocess.run([sys.executable, "-c", hide_torch], capture_output=True, text=True,
                          env=env, cwd=Path(__file__).resolve().parents[1], timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "PyTorch was not found" not in result.stderr


class _FullDisk(io.StringIO):
  def write(self, text: str) -> int:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_log_file_that_cannot_be_written_says_so_once(tmp_path, capsys):
  """A full disk under the workdir: one warning line naming the file and the cause (logging's
  own handler printed a traceback for every record), and the run goes on."""
  handler = WorkdirLogFile(tmp_path / "train.log")
  handler.stream.close()
  handler.stream = _FullDisk()
  log = logging.getLogger("rag_jax.test.full")
  log.addHandler(handler)
  try:
    for step in range(3):
      log.warning("step %d", step)
  finally:
    log.removeHandler(handler)
    handler.close()
  assert capsys.readouterr().err == (f"warning: {tmp_path / 'train.log'}: No space left on device "
                                     "(errno 28); log records are not written there from now on\n")
