"""What every entry point shares (train.py, evaluate.py, benchmark.py and the rag-* commands):
flag parsing, the error policy, the console, and the question loop of search and answer.

Error policy (`run_main`):

  exit 0  done.
  exit 2  a usage error: an unknown flag, a bad flag value, an unknown or badly typed
          `--config.x` override, a missing config file, a stray argument (UsageError, or a flag
          absl refuses). Nothing was run.
  exit 1  an anticipated failure: a UserError (a bad corpus line, a locked workdir, an index
          built with another encoder, ...) or an OSError (a path that is a file, a read-only or
          full disk), which names the path and the cause: `error: OUT: Read-only file system
          (errno 30)`.

Each prints one line `error: <message>` on stderr; --traceback shows its traceback instead. Any
other exception is a bug and keeps its traceback (Python's exit 1). Library warnings (a truncated
question) print once, as `warning: <message>` lines on stderr.

The rag-* commands keep their flags in their own `flags.FlagValues` (not absl's global FLAGS), so
they can be imported together (tests, notebooks) and `main(argv)` can be called as a function
with a list of arguments. The scripts use absl's global FLAGS; their `--config` is a `ConfigFile`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from absl import flags
from ml_collections import config_flags

from rag_jax.distributed import (
  DEFAULT_TIMEOUT_S,
  DistributedError,
  describe,
  initialize,
  is_primary,
  primary_value,
  process_count,
)
from rag_jax.retrieval.encode import EncodeConfig
from rag_jax.utils.errors import InputError, UsageError, UserError
from rag_jax.utils.logs import FORMAT

EXIT_FAILURE = 1
EXIT_USAGE = 2
# Where processes 1.. of a command that reads no output directory (search, answer) log, under the
# working directory, unless RAG_JAX_LOG_DIR (the launcher's --log_dir, same default) says.
LAUNCH_LOG_DIR = "launch_logs"


def int_list(values: list[str], flag: str) -> tuple[int, ...] | None:
  """A list flag's values as ints (None when empty); a non-number is a usage error."""
  try:
    numbers = tuple(int(v) for v in values)
  except ValueError:
    raise UsageError(f"{flag}: expected whole numbers, got {','.join(values)}") from None
  return numbers or None


def define_common_flags(flag_values: flags.FlagValues) -> None:
  """The flags of every command: --traceback and how to join a multi-process job
  (rag_jax/distributed.py)."""
  flags.DEFINE_bool("traceback", False, "On an anticipated error, show its traceback (by "
                    "default it prints one 'error: ...' line).", flag_values=flag_values)
  flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"], "Join a multi-process job: "
                    "auto (when the flags below, RAG_JAX_* variables, SLURM, Open MPI or a TPU "
                    "slice say so), yes (always; jax detects the cluster), no.",
                    flag_values=flag_values)
  flags.DEFINE_string("coordinator_address", None, "Multi-process job: HOST:PORT of process 0.",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_processes", None, "Multi-process job: number of processes.",
                       lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer("process_id", None, "Multi-process job: this process's id, 0 to "
                       "num_processes - 1.", lower_bound=0, flag_values=flag_values)
  flags.DEFINE_integer("distributed_timeout", DEFAULT_TIMEOUT_S, "Multi-process job: seconds "
                       "to wait for the coordinator and for every process to join.",
                       lower_bound=1, flag_values=flag_values)


def define_encode_flags(flag_values: flags.FlagValues) -> None:
  """The passage-encoding flags of build_index and encode_passages (an EncodeConfig's fields and
  the encoder's compute dtype); `encode_config` reads them back."""
  f = {"flag_values": flag_values}
  flags.DEFINE_integer("batch_size", EncodeConfig.batch_size, "Passages per encoder batch (per "
                       "process).", lower_bound=1, **f)
  flags.DEFINE_integer("max_length", EncodeConfig.max_length, "Passage tokens.", lower_bound=1,
                       **f)
  flags.DEFINE_integer("shard_size", EncodeConfig.shard_size, "Embeddings per saved shard (the "
                       "unit of work and of resumption).", lower_bound=1, **f)
  flags.DEFINE_integer("length_bucket", EncodeConfig.length_bucket, "Passage token lengths are "
                       "padded to a multiple of this.", lower_bound=1, **f)
  flags.DEFINE_integer("tokens_per_batch", EncodeConfig.tokens_per_batch, "If > 0, passages "
                       "per batch at padded length L are this // L (batches of equal tokens) "
                       "instead of --batch_size.", lower_bound=0, **f)
  flags.DEFINE_enum("dtype", "float32", ["float32", "float16", "bfloat16"],
                    "Storage dtype of the embeddings.", **f)
  flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                    "Encoder compute dtype.", **f)


def encode_config(flag_values: flags.FlagValues) -> EncodeConfig:
  """The EncodeConfig of `define_encode_flags`'s flags."""
  v = flag_values
  return EncodeConfig(batch_size=v.batch_size, max_length=v.max_length, shard_size=v.shard_size,
                      dtype=v.dtype, length_bucket=v.length_bucket,
                      tokens_per_batch=v.tokens_per_batch)


def start_processes(flag_values: flags.FlagValues, program: str,
                    log_dir: str | Path | None = None, why_one: str = "") -> int:
  """Joins the multi-process job the flags or the environment describe (rag_jax/distributed.py;
  nothing on one process) and returns the number of processes.

  log_dir: for a program that runs on several processes, where the processes other than 0
  write their output (RAG_JAX_LOG_DIR, the launcher's --log_dir, wins). None: the program runs
  on one process, and refuses several in one line (before writing anything), saying `why_one`
  where given."""
  count = initialize(flag_values["coordinator_address"].value,
                     flag_values["num_processes"].value, flag_values["process_id"].value,
                     distributed=flag_values["distributed"].value,
                     timeout_s=flag_values["distributed_timeout"].value, log_dir=log_dir)
  if count > 1 and log_dir is None:
    why = f" ({why_one})" if why_one else ""
    raise DistributedError(f"{program} runs on one process{why}; it was started as "
                           f"{describe()} (docs/distributed.md lists the stages that run on "
                           "several)")
  if count > 1 and not is_primary():  # stderr is its log file: rag_jax's INFO records too
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.getLogger("rag_jax").addHandler(handler)
    logging.getLogger("rag_jax").setLevel(logging.INFO)
  return count


# Console output ---------------------------------------------------------------------------------

# C0 controls but tab, DEL, C1 controls (Unicode category Cc) and lone surrogates (a JSON corpus
# can hold "\ud800"; a UTF-8 terminal cannot be sent one).
_UNPRINTABLE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\ud800-\udfff]")


def printable(text: str) -> str:
  """`text` as the console shows it: control characters escaped as Python writes them
  (ESC -> `\\x1b`, NUL -> `\\x00`, newline -> `\\n`, CR -> `\\r`, a lone surrogate ->
  `\\ud800`), so a corpus title cannot move the cursor, recolour or clear the terminal, or split
  one printed record into two. Tabs and every printable character (any script) stay as they
  are. Only the console gets this: files keep the raw text."""
  return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def printable_paragraph(text: str) -> str:
  """A passage text for the console: its runs of whitespace (newlines, tabs) one space, as the
  commands' wrapping prints them, then `printable`."""
  return printable(" ".join(text.split()))


@contextlib.contextmanager
def console_warnings() -> Iterator[None]:
  """For the duration of the block, log records from WARNING up print on the current stderr
  as `warning: <message>` (`error: ...` for errors).

  The handler is on the root logger from the start, so nothing logged inside (absl's
  `unparse_flags`, a library's module-level `logging.info`) makes logging's `basicConfig`
  install a second stderr handler that would print each warning again as `WARNING:name:...`."""
  handler = logging.StreamHandler(sys.stderr)
  handler.setLevel(logging.WARNING)
  handler.setFormatter(ConsoleFormatter())
  root = logging.getLogger()
  root.addHandler(handler)
  try:
    yield
  finally:
    root.removeHandler(handler)


class ConsoleFormatter(logging.Formatter):
  """`warning: <message>` in one line, control characters escaped (`printable`). A record's
  traceback (a library's logging.exception) is left to the log file, where there is one
  (rag_jax/utils/logs.py): the console gets the message."""

  def format(self, record: logging.LogRecord) -> str:
    return f"{record.levelname.lower()}: {printable(one_line(record.getMessage()))}"


# The error policy --------------------------------------------------------------------------------


def error_line(error: BaseException) -> str:
  """The one line `error: ...` printed for an anticipated error. An OSError from the system
  names its path(s) and cause: `error: /x/out: Read-only file system (errno 30)`."""
  if isinstance(error, OSError) and not isinstance(error, UserError) and error.strerror:
    paths = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
    cause = f"{error.strerror} (errno {error.errno})"
    message = f"{paths}: {cause}" if paths else cause
    if error.errno in (errno.EEXIST, errno.ENOTDIR) and error.filename is not None:
      in_the_way = next((p for p in (Path(error.filename), *Path(error.filename).parents)
                         if p.exists() and not p.is_dir()), None)
      if in_the_way is not None:
        message += f"; {in_the_way} is a file, not a directory"
  else:
    message = str(error) or type(error).__name__
  message = "; ".join([message, *getattr(error, "__notes__", ())])
  return f"error: {printable(one_line(message))}"


def one_line(message: str) -> str:
  """A message of several lines in one: a chained traceback (ml_collections puts one into the
  message of a config file that fails) kept to its first and last lines."""
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  if "Traceback (most recent call last):" in lines:
    lines = [lines[0], lines[-1]]
  return " ".join(lines)


def exit_code(error: BaseException) -> int:
  """2 for a usage error, 1 for any other."""
  return EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILURE


def asks_for_traceback(argv: Sequence[str]) -> bool:
  """Whether `argv` sets --traceback (read before the flags parse, for an error while they
  do)."""
  return any(a == "--traceback" or a.lower() in ("--traceback=true", "--traceback=1")
             for a in argv)


def one_line_errors(body: Callable[[], int | None], show_traceback: bool) -> int:
  """Runs `body`; an anticipated error (UserError, OSError) prints one `error: ...` line and
  gives its exit code (`exit_code`); raised with its traceback when `show_traceback`. Returns
  body's code (None: 0)."""
  try:
    return body() or 0
  except (UserError, OSError) as e:
    if show_traceback:
      raise
    print(error_line(e), file=sys.stderr, flush=True)
    return exit_code(e)


def run_command(body: Callable[[], int], flag_values: flags.FlagValues) -> int:
  """Runs a command's body under the error policy (module docstring); returns its exit code."""
  with console_warnings():
    return one_line_errors(
        body, flag_values.is_parsed() and flag_values["traceback"].value)


def run_main(flag_values: flags.FlagValues, program: str, doc: str, argv: Sequence[str] | None,
             body: Callable[[list[str]], int | None], config: ConfigFile | None = None) -> int:
  """An entry point: parses `argv` (default sys.argv[1:]) into `flag_values` and runs
  body(positional arguments), both under the error policy (module docstring) and with
  `console_warnings`; returns the exit code. --help prints `doc` and the flags (exit 0)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  with console_warnings():
    try:
      positional = parse_argv(flag_values, program, argv, config)
    except HelpRequested:
      print(f"{doc.strip()}\n\nflags:\n{flag_help(flag_values)}")
      return 0
    except UsageError as e:
      if asks_for_traceback(argv):
        raise
      print(error_line(e), file=sys.stderr, flush=True)
      return EXIT_USAGE
    return one_line_errors(lambda: body(positional), flag_values["traceback"].value)


# Flags ------------------------------------------------------------------------------------------


class HelpRequested(Exception):
  """--help, -h or --helpfull was given."""


def flag_help(flag_values: flags.FlagValues) -> str:
  """A command's own flags (all of its FlagValues'; of absl's global FLAGS, the main module's
  and the ones it declares key flags: the scripts' --config and --traceback)."""
  if flag_values is flags.FLAGS:
    return flag_values.main_module_help()
  return flag_values.get_help()


def parse_argv(flag_values: flags.FlagValues, program: str, argv: Sequence[str],
               config: ConfigFile | None = None) -> list[str]:
  """Parses `argv` (without the program name) into `flag_values` (again from the defaults if it
  was parsed before) and returns the positional arguments. Raises HelpRequested for --help, and
  UsageError naming the flag for anything absl or ml_collections refuse."""
  argv = list(argv)
  if any(a in ("--help", "-h", "--helpfull", "--helpshort") for a in argv):
    raise HelpRequested
  if config is not None:
    argv = config.prepare(argv)
  if flag_values.is_parsed():  # a second call in one process (tests, a notebook)
    # absl logs this at INFO through the logging module: with no handler on the root logger,
    # that would make logging install basicConfig's, and print every later warning twice.
    guard = logging.NullHandler()
    logging.getLogger().addHandler(guard)
    try:
      flag_values.unparse_flags()
    finally:
      logging.getLogger().removeHandler(guard)
  try:
    return flag_values([program, *argv])[1:]
  except flags.Error as e:
    raise UsageError(f"{e} (see {program} --help)") from e
  except (AttributeError, KeyError) as e:
    if config is None:
      raise
    raise UsageError(config.unknown_field(e, argv)) from e


def parse_flags(flag_values: flags.FlagValues, program: str, doc: str,
                argv: Sequence[str] | None) -> list[str]:
  """`parse_argv` for a command that runs its body with `run_command`: --help prints `doc` and
  the flags and exits 0; a bad flag prints one error line and exits 2."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    return parse_argv(flag_values, program, argv)
  except HelpRequested:
    print(f"{doc.strip()}\n\nflags:\n{flag_help(flag_values)}")
    raise SystemExit(0) from None
  except UsageError as e:
    print(error_line(e), file=sys.stderr, flush=True)
    raise SystemExit(EXIT_USAGE) from None


class ConfigFile:
  """The `--config` flag of train.py and evaluate.py: an ml_collections config file (a
  get_config() module), with `--config.<field>=value` overrides; `value` is the ConfigDict.

  ml_collections' DEFINE_config_file loads a default file when the flag is defined, at import,
  applying the overrides it finds in sys.argv there: a misspelt field then fails outside any
  error handling, as a chained traceback. This flag is defined without a default; `prepare`
  (called by `parse_argv`) puts `--config=<default>` in front of the arguments instead, checks
  that the file exists, and has the overrides read from the arguments being parsed."""

  def __init__(self, default: str | Path, help_string: str,
               flag_values: flags.FlagValues = flags.FLAGS):
    self.default = str(default)
    self.flag_values = flag_values
    self.argv: list[str] = []  # ml_collections reads the overrides from this list
    self.holder = config_flags.DEFINE_config_file(
        "config", None, help_string, flag_values=flag_values, sys_argv=self.argv)
    flag_values["config"].default_as_str = repr(self.default)

  @property
  def value(self) -> Any:
    """The parsed config (a ConfigDict), overrides applied."""
    return self.holder.value

  @property
  def path(self) -> str:
    """The config file of the last parse (its `:argument` suffix dropped)."""
    return self.file_argument(self.argv).split(":", 1)[0]

  @staticmethod
  def file_argument(argv: Sequence[str]) -> str:
    """The value of --config in `argv` ('' if absent)."""
    for i, arg in enumerate(argv):
      if arg.startswith(("--config=", "-config=")):
        return arg.split("=", 1)[1]
      if arg in ("--config", "-config") and i + 1 < len(argv):
        return argv[i + 1]
    return ""

  def prepare(self, argv: list[str]) -> list[str]:
    """`argv` with the default config file first when it names none; a missing config file is a
    UsageError. Drops the override flags of an earlier parse."""
    if not any(re.match(r"^--?config(=|$)", a) for a in argv):
      argv = [f"--config={self.default}", *argv]
    path = self.file_argument(argv).split(":", 1)[0]
    if not Path(path).is_file():
      raise UsageError(f"--config={path}: no such config file" if not Path(path).exists() else
                       f"--config={path}: not a file")
    for name in [n for n in self.flag_values if n.startswith("config.")]:
      delattr(self.flag_values, name)
    self.argv[:] = ["", *argv]
    return argv

  def unknown_field(self, error: Exception, argv: Sequence[str]) -> str:
    """The message for an override of a field the config does not have (ml_collections raises a
    chained AttributeError / KeyError naming the field)."""
    name = str(error).strip("\"'")
    overrides = [a.split("=", 1)[0].lstrip("-") for a in argv if re.match(r"^--?config\.", a)]
    culprit = next((o for o in overrides if name in o[len("config."):].split(".")),
                   f"config.{name}")
    return f"--{culprit}: the config has no field {name!r} (see the config file for its fields)"


# The question loop of search and answer ---------------------------------------------------------


def ask(questions: list[str], handle: Callable[[list[str]], str], stdin: TextIO,
        stdout: TextIO) -> int:
  """Prints handle(questions) for the questions given on the command line, or else for each
  non-empty line of stdin (with a prompt when stdin is a terminal) until end of input.

  Each stdin line is decoded on its own (from stdin's bytes where it has them, as sys.stdin
  does): a line that is not text in stdin's encoding is skipped with a warning naming it, the
  others are still answered, and at the end an InputError names every skipped line, so that
  the exit status says not every line was answered.

  On several processes (a search over one index block per process: every call of `handle` is
  collective), process 0 alone reads the questions and prints; each batch it reads is sent to
  the others (`shared_batches`), so every process calls `handle` on the same batches in the same
  order, and its end of input ends every process's loop."""
  skipped: list[int] = []
  several = process_count() > 1
  for batch in shared_batches(read_batches(questions, stdin, stdout, skipped)):
    with native_stdout_to_stderr() if several else contextlib.nullcontext():
      text = handle(batch)
    if is_primary():
      print(text, file=stdout, flush=True)
    else:
      logging.getLogger(__name__).info("asked %d question(s)", len(batch))
  if skipped:
    lines = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
    encoding = getattr(stdin, "encoding", None) or "utf-8"
    raise InputError(f"stdin: {len(skipped)} line(s) not valid {encoding} text skipped (line(s) "
                     f"{lines}); every other line was answered")
  return 0


@contextlib.contextmanager
def native_stdout_to_stderr() -> Iterator[None]:
  """Inside the block, file descriptor 1 (the C++ runtime's stdout) is stderr's: gloo prints
  `[Gloo] Rank 0 is connected to 1 peer ranks...` there when a collective first connects, which
  would mix with the results a command prints to stdout."""
  sys.stdout.flush()
  saved = os.dup(1)
  os.dup2(2, 1)
  try:
    yield
  finally:
    sys.stdout.flush()
    os.dup2(saved, 1)
    os.close(saved)


def read_batches(questions: list[str], stdin: TextIO, stdout: TextIO,
                 skipped: list[int]) -> Iterator[list[str]]:
  """`questions` as one batch if any, else each non-empty stdin line as a batch of one (`ask`);
  the numbers of the lines that are not text are appended to `skipped`."""
  if questions:
    yield questions
    return
  interactive = stdin.isatty()
  buffer = getattr(stdin, "buffer", None)
  encoding = getattr(stdin, "encoding", None) or "utf-8"
  number = 0
  while True:
    if interactive:
      print("question> ", end="", file=stdout, flush=True)
    raw = buffer.readline() if buffer is not None else stdin.readline()
    if not raw:
      return
    number += 1
    try:
      line = raw.decode(encoding, getattr(stdin, "errors", None) or "strict") if isinstance(
          raw, bytes) else raw
    except UnicodeDecodeError as e:
      skipped.append(number)
      logging.getLogger(__name__).warning(
          "stdin:%d: not valid %s text (%s at byte %d of the line); line skipped", number,
          encoding, e.reason, e.start)
      continue
    if line.strip():
      yield [line.strip()]


def shared_batches(batches: Iterator[list[str]]) -> Iterator[list[str]]:
  """Process 0's `batches` on every process, in its order (one process: `batches` as they are).
  Only process 0 iterates `batches`; the others wait for each of its batches as long as it takes
  (interactive input). Process 0's end of input ends every process's loop; an error reading it
  is raised on process 0 and, quoted, on the others (DistributedError)."""
  if process_count() == 1:
    yield from batches
    return
  while True:
    message: dict[str, Any] = {}
    if is_primary():
      try:
        message = {"batch": next(batches)}
      except StopIteration:
        message = {"end": True}
      except Exception as e:
        primary_value("ask/batch", json.dumps({"error": error_line(e).removeprefix("error: ")}),
                      None)
        raise
    message = json.loads(primary_value("ask/batch", json.dumps(message), None))
    if "error" in message:
      raise DistributedError(f"process 0 stopped reading questions, so {describe()} stops: "
                             f"{message['error']}")
    if "end" in message:
      return
    yield message["batch"]
