"""train.py's guards: configs validated before the workdir is touched (each bad field named with
its range), a config mismatch named leaf by leaf, one `error:` line instead of a traceback, and
the workdir lock (a second run refused naming the holder, a stale lock taken over)."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from configs import default as default_config
from configs import reversal as reversal_config
from rag_jax.training import config_check, loop
from rag_jax.utils import lock

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# A reversal run of a few seconds (8 CPU devices: the batch is a multiple of 8).
TINY = ["--config=configs/reversal.py", "--config.num_train_steps=10", "--config.batch_size=16",
        "--config.log_every=5", "--config.eval_every=10", "--config.eval_batches=1",
        "--config.checkpoint_every=5", "--config.warmup_steps=2", "--config.task.max_length=6"]


def _train(workdir: Path, *flags: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "train.py", f"--workdir={workdir}", *flags], cwd=ROOT,
                          env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_validate_names_each_bad_field_with_its_range():
  config = default_config.get_config()
  config_check.validate(config)
  config_check.validate(reversal_config.get_config())
  config.rag.num_train_steps = -5
  config.rag.n_docs = 0
  config.retriever.learning_rate = float("nan")
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(config)
  assert str(e.value) == (
      "config.retriever.learning_rate = nan: must be a finite number > 0; "
      "config.rag.num_train_steps = -5: must be an integer >= 1; "
      "config.rag.n_docs = 0: must be an integer >= 1 (invalid config: nothing was run or "
      "written)")
  config = reversal_config.get_config()
  config.task.min_length = 9
  config.task.max_length = 4
  with pytest.raises(config_check.ConfigError, match=r"^config.task.min_length = 9: must be <= "
                                                     r"task.max_length \(4\)"):
    config_check.validate(config)
  config = reversal_config.get_config()
  config.batch_size = 12  # the test session has 8 devices
  with pytest.raises(config_check.ConfigError,
                     match=r"^config.batch_size = 12: must be a multiple of the 8 devices"):
    config_check.validate(config)
  del config.trainer
  with pytest.raises(config_check.ConfigError, match=r"^config.trainer = None: must be one of "
                                                     r"\['world', 'reversal', 'rag', "
                                                     r"'paper_scale', 'world_paper', "
                                                     r"'world_shift'\]"):
    config_check.validate(config)


def test_config_mismatch_names_each_leaf_with_both_values(tmp_path):
  config = default_config.get_config()
  loop.check_workdir(config, tmp_path)
  loop.check_workdir(config, tmp_path)  # the same config: accepted
  other = default_config.get_config()
  other.rag.num_train_steps = 600
  other.seed = 1
  with pytest.raises(loop.WorkdirConfigError) as e:
    loop.check_workdir(other, tmp_path)
  assert str(e.value) == (
      f"{tmp_path} holds a run with another config (config.rag.num_train_steps: 300 in the "
      "workdir, 600 now; config.seed: 0 in the workdir, 1 now); use a new --workdir, rerun with "
      f"the values of {tmp_path / 'config.json'}, or delete {tmp_path}")


def test_train_py_bad_config_unknown_field_and_a_second_run(tmp_path):
  workdir = tmp_path / "run"
  bad = _train(workdir, *TINY, "--config.num_train_steps=-5")
  unknown = _train(tmp_path / "other", *TINY, "--config.model.foo=3")
  out, err = bad.communicate(timeout=300)
  assert bad.returncode == 1, err
  assert err == ("error: config.num_train_steps = -5: must be an integer >= 1 (invalid config: "
                 "nothing was run or written)\n")
  assert not workdir.exists()  # nothing recorded: the corrected rerun below is not refused
  out, err = unknown.communicate(timeout=300)
  assert unknown.returncode == 2
  assert err == ("error: --config.model.foo: the config has no field 'foo' (see the config file "
                 "for its fields)\n")
  assert not (tmp_path / "other").exists()

  # The corrected config, twice at once in the same workdir: one runs, the other is refused.
  runs = [_train(workdir, *TINY), _train(workdir, *TINY)]
  results = [(p.pid, *p.communicate(timeout=300), p.returncode) for p in runs]
  codes = sorted(r[3] for r in results)
  if codes != [0, 1]:  # each run's whole stderr (an assertion message would be cut short)
    pytest.fail("\n\n".join(f"pid {pid}, exit {code}:\n{err}" for pid, _, err, code in results))
  (winner, *_), (_, _, err, _) = sorted(results, key=lambda r: r[3])
  assert err.startswith(f"error: {workdir} is in use by pid {winner} on host "
                        f"{socket.gethostname()} (started ")
  assert err.count("\n") == 1 and "Traceback" not in err
  assert json.loads((workdir / "report.json").read_text())["steps"] == 10
  assert not (workdir / lock.LOCK_NAME).exists()  # released on exit


def test_stale_lock_of_a_killed_process_is_reported_and_taken_over(tmp_path, caplog):
  holder = textwrap.dedent(f"""
      import os, signal
      from rag_jax.utils.lock import workdir_lock
      with workdir_lock({str(tmp_path)!r}):
        os.kill(os.getpid(), signal.SIGKILL)
  """)
  proc = subprocess.run([sys.executable, "-c", holder], cwd=ROOT, env=ENV, timeout=120)
  assert proc.returncode == -signal.SIGKILL
  path = tmp_path / lock.LOCK_NAME
  dead = json.loads(path.read_text())
  assert dead["host"] == socket.gethostname() and dead["pid"] != os.getpid()
  with lock.workdir_lock(tmp_path):
    assert json.loads(path.read_text())["pid"] == os.getpid()
    # A live holder (this process) refuses the next one, naming it.
    with pytest.raises(lock.WorkdirLocked, match=rf"in use by pid {os.getpid()} on host "):
      with lock.workdir_lock(tmp_path):
        pass
  assert not path.exists()
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(dead["started"]))
  stale = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
  assert stale == [f"{path}: taking over the stale lock of pid {dead['pid']} on host "
                   f"{dead['host']} (started {started}); that process is no longer running"]

  # A lock written on another host cannot be checked from here: refused, naming the host.
  path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
  with pytest.raises(lock.WorkdirLocked, match=r"in use by pid 1 on host elsewhere"):
    with lock.workdir_lock(tmp_path):
      pass
