"""benchmark.py's command line: the choices of its flags and their checks, importable without
jax, torch or the models, so that a bad flag is refused in a fraction of a second, before any
group runs (each check raises flags.ValidationError; absl names the flag and benchmark.py exits 2
with one `error:` line)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from absl import flags

from benchmarks.presets import Preset
from rag_jax.models.rag import MODEL_TYPES

WORKLOADS = ("train", "retrieval", "generate", "encode")
GROUPS = ("ceilings", *WORKLOADS, "max_batch_jax", "max_batch_torch")
TRAIN_KINDS = tuple(MODEL_TYPES)
ATTENTIONS = ("xla", "cudnn")
# The defaults of --scann and --faiss_ef: ScaNN's default width and the width tuned to
# recall@100 0.95; faiss HNSW at three efSearch values, so that each ScaNN row finds a faiss
# setting of about its recall.
SCANN_SPECS = ("2:0.03,recall=0.95",)
FAISS_EF = (128, 256, 512)
# benchmarks/runner.py starts a group only with more than this many seconds of the budget left.
MIN_GROUP_START_S = 5.0
# What runs on several processes (benchmarks/multiprocess.py): these workloads, no peers, no
# ScaNN or faiss (the retrieval workload times the exact search over the global mesh).
MULTIPROCESS_WORKLOADS = ("train", "retrieval", "encode")
# Flags that have no several-process form when given (their defaults are adjusted instead).
ONE_PROCESS_FLAGS = ("peers", "scann", "faiss_ef", "hnsw_m", "max_batch", "profile")


def _unique_choices(values: Sequence[str], choices: Sequence[str], empty_ok: bool = False) -> bool:
  unknown = [v for v in values if v not in choices]
  if unknown:
    raise flags.ValidationError(f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}")
  if len(set(values)) < len(values):
    raise flags.ValidationError("each may be named once")
  if not values and not empty_ok:
    raise flags.ValidationError(f"name at least one of {', '.join(choices)}")
  return True


def check_workloads(values: Sequence[str]) -> bool:
  """--workloads: known groups, each once, at least one."""
  return _unique_choices(values, WORKLOADS)


def check_train_kinds(values: Sequence[str]) -> bool:
  """--train_kinds: RAG-Sequence and / or RAG-Token, each once."""
  return _unique_choices(values, TRAIN_KINDS)


def check_attention(values: Sequence[str]) -> bool:
  """--attention: xla and / or cudnn, each once."""
  return _unique_choices(values, ATTENTIONS)


def check_positive_ints(values: Sequence[str]) -> bool:
  """--n_docs, --faiss_ef: whole numbers >= 1 (none: the defaults)."""
  bad = [v for v in values if not (v.strip().isdigit() and int(v) >= 1)]
  if bad:
    raise flags.ValidationError(f"{', '.join(map(repr, bad))}: expected whole numbers >= 1")
  return True


def check_group(value: str | None) -> bool:
  """--group (internal): one of the groups."""
  if value is not None and value not in GROUPS:
    raise flags.ValidationError(f"unknown group; choose from {', '.join(GROUPS)}")
  return True


def check_time_budget(value: float) -> bool:
  """--time_budget_s: enough for a group to start."""
  if not (math.isfinite(value) and value > MIN_GROUP_START_S):
    raise flags.ValidationError(f"must be a number of seconds > {MIN_GROUP_START_S:g} (a group "
                                f"starts only with more than {MIN_GROUP_START_S:g} s left)")
  return True


def _fraction(text: str) -> float | None:
  """`text` as a number in (0, 1], or None."""
  try:
    value = float(text)
  except ValueError:
    return None
  return value if 0 < value <= 1 else None


def check_scann(specs: Sequence[str]) -> bool:
  """--scann: each 'leaves_per_sqrt_n:width[,width...]', leaves_per_sqrt_n > 0 and each width a
  share of the leaves in (0, 1] or 'recall=R', R in (0, 1] (benchmarks/retrieval.py)."""
  for spec in specs:
    multiplier, _, widths = spec.partition(":")
    try:
      leaves_ok = math.isfinite(float(multiplier)) and float(multiplier) > 0
    except ValueError:
      leaves_ok = False
    widths_ok = bool(widths) and all(
        _fraction(w.removeprefix("recall=")) is not None for w in widths.split(","))
    if not (leaves_ok and widths_ok):
      raise flags.ValidationError(
          f"{spec!r}: expected leaves_per_sqrt_n:width[,width...], leaves_per_sqrt_n > 0 and "
          "each width a share of the leaves in (0, 1] or recall=R with R in (0, 1], e.g. "
          "2:0.03,recall=0.95")
  return True


def rescore_parts(spec: str) -> tuple[str, str]:
  """'G:W' of --rescore, checked: each part a positive int, 'auto' or 'all'."""
  parts = spec.split(":")
  if len(parts) != 2:
    raise ValueError(f"rescore setting {spec!r}: expected G:W, e.g. auto:auto or all:all")
  for part in parts:
    if part not in ("auto", "all") and not (part.isdigit() and int(part) > 0):
      raise ValueError(f"rescore setting {spec!r}: {part!r} is not a positive int, auto or all")
  return parts[0], parts[1]


def rescore_setting(spec: str, preset: Preset, n_docs: int) -> tuple[int | None, int | None]:
  """'G:W' -> (rescore_candidates, rescore_positions) of thorough decoding: each a positive
  int, 'auto' (None: the library's default, a quarter) or 'all' (one pass of all n x beams
  candidates, one call over all max_length - 1 positions)."""
  every = (n_docs * preset.num_beams, preset.target_length - 1)
  candidates, positions = (
      None if part == "auto" else full if part == "all" else int(part)
      for part, full in zip(rescore_parts(spec), every, strict=True))
  return candidates, positions


def check_rescore(specs: Sequence[str]) -> bool:
  """--rescore: at least one G:W, each as `rescore_parts` reads it."""
  if not specs:
    raise flags.ValidationError("name at least one setting G:W, e.g. auto:auto")
  for spec in specs:
    try:
      rescore_parts(spec)
    except ValueError as e:
      raise flags.ValidationError(str(e)) from None
  return True


def several_process_problem(workloads: Sequence[str], given: dict[str, object],
                            isolate: str) -> str | None:
  """Why a run on several processes cannot be made, or None: a workload outside
  MULTIPROCESS_WORKLOADS, a flag of ONE_PROCESS_FLAGS set on the command line (`given`: flag ->
  value, only those given; --peers=false and --profile=0 are what several processes run
  anyway), or --isolate=yes (one child process per group is one process)."""
  problems = [w for w in workloads if w not in MULTIPROCESS_WORKLOADS]
  problems += [f"--{name}" for name, value in given.items()
               if name in ONE_PROCESS_FLAGS and value not in (False, 0)]
  if isolate == "yes":
    problems.append("--isolate=yes")
  if not problems:
    return None
  return (f"on several processes benchmark.py runs --workloads="
          f"{','.join(MULTIPROCESS_WORKLOADS)} (or a part), in-process, without peers, ScaNN or "
          f"faiss; not {', '.join(problems)} (one process only)")


def global_batch_problem(preset: Preset, workloads: Sequence[str], devices: int) -> str | None:
  """Why the workloads' global batches cannot be split over `devices` (every device of every
  process holds the same number of rows), or None."""
  batches = {"train": ("batch", preset.batch), "encode": ("encode_batch", preset.encode_batch)}
  bad = [f"{name} {size}" for w, (name, size) in batches.items()
         if w in workloads and size % devices]
  if not bad:
    return None
  return (f"the {preset.name} preset's {' and '.join(bad)} cannot be split over {devices} "
          "devices (each process feeds the same number of rows to each of its devices); use "
          "a device count that divides it")
