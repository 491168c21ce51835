"""The entry points' error policy and console (rag_jax/commands/common.py): a bad flag, flag value,
config override or config file is one `error:` line and exit 2, before any work; an OSError is one
line naming the path and the cause, exit 1; a warning prints once; corpus text reaches the
terminal with its control characters escaped; a stdin line that is not UTF-8 is named, the others
answered. The scripts run as subprocesses that fail while parsing (a fraction of a second each:
they load jax only after their flags); the rest runs in-process."""

from __future__ import annotations

import errno
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rag_jax.answer import Answer, format_answer
from rag_jax.commands import answer, search
from rag_jax.commands.common import ask, console_warnings, one_line_errors, printable
from rag_jax.decoding.generation import DecoderInfo
from rag_jax.retrieval.retriever import Hit
from rag_jax.utils.errors import InputError, UsageError, os_errors_under

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=timeout)


# Each: a script's arguments, then the one line it prints (all exit 2, nothing written).
FLAG_ERRORS = [
    (["train.py", "--config.rag.foo=1"],  # an unknown field of the default config
     "error: --config.rag.foo: the config has no field 'foo' (see the config file for its "
     "fields)"),
    (["train.py", "--config.rag.num_train_steps=abc"],
     "error: flag --config.rag.num_train_steps=abc: invalid literal for int() with base 10: "
     "'abc' (see python train.py --help)"),
    (["train.py", "--nonsense=1"],
     "error: Unknown command line flag 'nonsense' (see python train.py --help)"),
    (["train.py", "--config=configs/missing.py"],
     "error: --config=configs/missing.py: no such config file"),
    (["train.py", "--config.seed=1", "--config=configs/reversal.py"],
     "error: Found --config.seed=1 in argv before a value for --config was specified (see "
     "python train.py --help)"),
    (["train.py", "stray"], "error: unexpected arguments ['stray']; every setting is a flag"),
    (["evaluate.py", "--config.eval.foo=1"],
     "error: --config.eval.foo: the config has no field 'foo' (see the config file for its "
     "fields)"),
    (["evaluate.py", "--config=configs/paper_nq.py", "--config.eval.max_length=x"],
     "error: flag --config.eval.max_length=x: invalid literal for int() with base 10: 'x' (see "
     "python evaluate.py --help)"),
    (["evaluate.py", "--doc=5"],
     "error: Unknown command line flag 'doc'. Did you mean: docs ? (see python evaluate.py "
     "--help)"),
    (["evaluate.py", "--config=configs/missing.py"],
     "error: --config=configs/missing.py: no such config file"),
    (["evaluate.py", "--config=configs/reversal.py"],
     "error: configs/reversal.py: not an evaluation config (config.trainer 'reversal', expected "
     "one of ['rag', 'world'], and an `eval` group); use configs/paper_<task>.py or "
     "configs/default.py"),
]


@pytest.mark.parametrize("args,message", FLAG_ERRORS, ids=[" ".join(a) for a, _ in FLAG_ERRORS])
def test_scripts_refuse_bad_flags_in_one_line_with_exit_2(args, message, tmp_path):
  workdir = tmp_path / "workdir"
  proc = _run(*args, f"--workdir={workdir}")
  assert (proc.returncode, proc.stderr, proc.stdout) == (2, message + "\n", "")
  assert not workdir.exists()


def test_traceback_flag_shows_the_usage_error_traceback():
  proc = _run("train.py", "--config.rag.foo=1", "--traceback")
  assert proc.returncode == 1
  assert "Traceback (most recent call last)" in proc.stderr
  assert proc.stderr.rstrip().splitlines()[-1] == (
      "rag_jax.utils.errors.UsageError: --config.rag.foo: the config has no field 'foo' (see the "
      "config file for its fields)")


def test_scripts_name_an_os_error_in_one_line_with_exit_1(tmp_path):
  """A --workdir under a file: the path, the cause and the file in the way; nothing run."""
  (tmp_path / "file").write_text("keep me")
  proc = _run("benchmark.py", f"--workdir={tmp_path / 'file' / 'bench'}", "--workloads=encode")
  assert (proc.returncode, proc.stdout) == (1, "")
  assert proc.stderr == (f"error: {tmp_path / 'file' / 'bench'}: Not a directory (errno 20); "
                         f"{tmp_path / 'file'} is a file, not a directory\n")
  assert (tmp_path / "file").read_text() == "keep me"


def test_evaluate_py_validates_the_config_before_reading_any_file(tmp_path):
  """A paper row's bad evaluation field is named before its (missing) files are looked at."""
  proc = _run("evaluate.py", "--config=configs/paper_nq.py", "--config.eval.batch_size=0",
              f"--workdir={tmp_path / 'w'}")
  assert (proc.returncode, proc.stdout) == (1, "")
  assert proc.stderr == ("error: config.eval.batch_size = 0: must be an integer >= 1 (invalid "
                         "config: nothing was run or written)\n")
  assert not (tmp_path / "w").exists()


def test_train_py_validates_a_paper_rows_eval_group_before_training(tmp_path):
  """train.py on a paper row names a bad evaluation field before training, not hours after."""
  proc = _run("train.py", "--config=configs/paper_nq.py", "--config.eval.reader=csv",
              f"--workdir={tmp_path / 'w'}")
  assert (proc.returncode, proc.stdout) == (1, "")
  assert proc.stderr.startswith("error: config.eval.reader = 'csv': must be one of [")
  assert not (tmp_path / "w").exists()


def _line(error: BaseException) -> tuple[int, str]:
  """(exit code, stderr) of the error policy for a body raising `error`."""
  stderr = io.StringIO()

  def body():
    raise error

  sys_stderr, sys.stderr = sys.stderr, stderr
  try:
    code = one_line_errors(body, show_traceback=False)
  finally:
    sys.stderr = sys_stderr
  return code, stderr.getvalue()


def test_os_errors_name_the_path_and_the_cause(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(OSError) as under_a_file:
    (tmp_path / "file" / "out").mkdir(parents=True)
  assert _line(under_a_file.value) == (1, f"error: {tmp_path / 'file' / 'out'}: Not a directory "
                                          f"(errno 20); {tmp_path / 'file'} is a file, not a "
                                          "directory\n")
  with pytest.raises(OSError) as is_a_file:
    os.makedirs(tmp_path / "file", exist_ok=True)
  assert _line(is_a_file.value) == (1, f"error: {tmp_path / 'file'}: File exists (errno 17); "
                                       f"{tmp_path / 'file'} is a file, not a directory\n")
  # A read-only mount (tests may run as root, where chmod does not refuse): the error as open()
  # raises it there.
  read_only = OSError(errno.EROFS, os.strerror(errno.EROFS), "/x/out")
  assert _line(read_only) == (1, "error: /x/out: Read-only file system (errno 30)\n")
  with pytest.raises(OSError) as moved:
    os.rename(tmp_path / "gone", tmp_path / "final")
  assert _line(moved.value) == (1, f"error: {tmp_path / 'gone'} -> {tmp_path / 'final'}: No such "
                                   "file or directory (errno 2)\n")


def test_a_full_disk_names_the_directory_written_under(tmp_path):
  """A write or an fsync that fails for lack of space names no file: the entry point's output
  directory is named instead."""
  def write():
    with os_errors_under(tmp_path / "run"), open(tmp_path / "f", "wb") as f:
      f.write(b"partial")
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as f.write raises it

  with pytest.raises(OSError) as full:
    write()
  assert _line(full.value) == (1, "error: No space left on device (errno 28); in a file under "
                                  f"{tmp_path / 'run'}\n")


def test_usage_errors_exit_2_and_other_user_errors_1():
  assert _line(UsageError("--k: must be >= 1")) == (2, "error: --k: must be >= 1\n")
  assert _line(InputError("corpus.tsv:3: bad line")) == (1, "error: corpus.tsv:3: bad line\n")
  # A message of several lines, or with control characters, is still one line.
  assert _line(InputError("a\nb \x1b[2J")) == (1, "error: a b \\x1b[2J\n")


def test_printable_escapes_control_characters_only():
  assert printable("ESC\x1b[31mred\x1b[0m") == "ESC\\x1b[31mred\\x1b[0m"
  assert printable("NUL\x00 BEL\x07 DEL\x7f") == "NUL\\x00 BEL\\x07 DEL\\x7f"
  assert printable("one\ntwo\rthree") == "one\\ntwo\\rthree"
  assert printable("C1 CSI\x9b2J NEL\x85") == "C1 CSI\\x9b2J NEL\\x85"
  assert printable("lone \ud800 surrogate") == "lone \\ud800 surrogate"
  kept = "tab\there, Ünïcödé, 東京, Ελλάδα, ‎RTL mark, emoji 🙂, back\\slash"
  assert printable(kept) == kept


class _Checked:
  def unknown_warnings(self) -> list[str]:
    return ["question 1: 1 unknown token(s)"]


class StubRetriever:
  """Retriever.load's stand-in: one passage with control characters in every field."""

  @classmethod
  def load(cls, *args, **kwargs):
    return cls()

  def check(self, batch):
    return _Checked()

  def retrieve(self, batch, k):
    return [[Hit(row=3, score=0.5, id="7\x1b", title="T\x1b[2J\x00",
                 text="line one\nline\ttwo \x1b[31mred\x07")] for _ in batch]


def test_search_prints_corpus_text_escaped(monkeypatch, capsys):
  monkeypatch.setattr(search, "Retriever", StubRetriever)
  out = io.StringIO()
  assert search.main(["--dir=unused", "--question_encoder=unused", "who\x1b"], stdout=out) == 0
  assert out.getvalue() == ("Q: who\\x1b\n"
                            "   1. [   0.5000] T\\x1b[2J\\x00 (id 7\\x1b, row 3)\n"
                            "      line one line two \\x1b[31mred\\x07\n")
  assert capsys.readouterr().err == "warning: question 1: 1 unknown token(s)\n"


def test_answer_prints_answers_and_passages_escaped():
  decoder = DecoderInfo("rag_token", "RagTokenForGeneration", num_beams=1, max_length=8,
                        num_return_sequences=2, n_docs=2)
  raw = Answer(question="q\r", text="Paris\x1b]0;title\x07", score=-0.1,
               alternatives=(("Paris\x1b]0;title\x07", -0.1), ("Lyon\x00", -0.5)),
               passages=(Hit(0, 2.0, "9", "Title\x9b31m", "a\nb"),
                         Hit(1, 1.0, "10", "Plain", "c")),
               passage_probs=(0.75, 0.25), decoder=decoder)
  assert format_answer(answer.printable_answer(raw)) == "\n".join([
      "Q: q\\r",
      f"A: Paris\\x1b]0;title\\x07   (score -0.1000; {decoder.describe()})",
      "   or: Lyon\\x00   (score -0.5000)",
      "   passages:",
      "   1. p=0.750 [   2.0000] Title\\x9b31m (id 9)",
      "      a b",
      "   2. p=0.250 [   1.0000] Plain (id 10)",
      "      c"])


def test_answer_refuses_an_unknown_dtype_in_one_line(capsys):
  with pytest.raises(SystemExit) as exit_:
    answer.main(["--checkpoint=unused", "--index_dir=unused", "--dtype=foo"])
  assert exit_.value.code == 2
  assert capsys.readouterr().err == ("error: flag --dtype=foo: value should be one of "
                                     "<float32|bfloat16> (see python -m rag_jax.commands.answer "
                                     "--help)\n")


def test_a_stdin_line_that_is_not_utf8_is_named_and_the_others_answered(monkeypatch, capsys):
  monkeypatch.setattr(search, "Retriever", StubRetriever)
  stdin = io.TextIOWrapper(io.BytesIO(b"first\n\xff\xfe latin-1 \xe9\nthird\n"), encoding="utf-8")
  out = io.StringIO()
  assert search.main(["--dir=unused", "--question_encoder=unused"], stdin=stdin, stdout=out) == 1
  assert [line for line in out.getvalue().splitlines() if line.startswith("Q: ")] == [
      "Q: first", "Q: third"]
  assert capsys.readouterr().err == (
      "warning: question 1: 1 unknown token(s)\n"
      "warning: stdin:2: not valid utf-8 text (invalid start byte at byte 0 of the line); line "
      "skipped\n"
      "warning: question 1: 1 unknown token(s)\n"
      "error: stdin: 1 line(s) not valid utf-8 text skipped (line(s) 2); every other line was "
      "answered\n")


def test_ask_reads_text_streams_without_bytes_too():
  asked = []
  assert ask([], lambda batch: asked.extend(batch) or "", io.StringIO("a\n\n b \n"),
             io.StringIO()) == 0
  assert asked == ["a", "b"]


WARNING_ONCE = """
import sys
from rag_jax.commands import search
from tests.test_entry_points import StubRetriever

search.Retriever = StubRetriever
sys.exit(search.main(["--dir=unused", "--question_encoder=unused", "who"]))
"""


def test_a_command_prints_each_warning_once():
  """In a fresh process (no logging configured): absl's unparse_flags used to make logging
  install a second stderr handler, and each warning printed again as `WARNING:name:...`."""
  proc = _run("-c", WARNING_ONCE)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stderr == "warning: question 1: 1 unknown token(s)\n"


def test_console_warnings_print_one_line_without_the_traceback(capsys):
  with console_warnings():
    try:
      raise ValueError("inner\ndetail")
    except ValueError:
      logging.getLogger("rag_jax.test").exception("saving failed:\n%s", "ENOSPC \x1b[2J")
  assert capsys.readouterr().err == "error: saving failed: ENOSPC \\x1b[2J\n"
