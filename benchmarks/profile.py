"""Where a workload's time goes: a jax.profiler trace of a few calls, summarised per HLO op.

Every event that runs an XLA instruction carries the instruction's name (the `hlo_op` stat): a
kernel on a GPU stream of the device plane, a thunk on the CPU's executor threads. The summary
sums the time per instruction, classifies each one from the compiled program's HLO text
(matmul, fused attention, elementwise or reduction fusion, copy, collective, sort, scatter)
and names the model code it came from (the instruction's `op_name` metadata, e.g.
`transpose(jvp(...))/generator/decoder/layers_3/fc1/dot_general`). It also states how busy the
device was during the traced calls (the union of its op intervals over the wall time): a busy
fraction well under 1 means gaps between kernels (launches, host work), not slow kernels.

The summary is small JSON written beside the benchmark's; the raw trace stays in a temporary
directory unless one is named.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_OPCODE = re.compile(r"\s([a-z][a-z0-9\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_WRAPPED = re.compile(r"^[\w.<>\-]+\((.*)\)$")
_CONTAINERS = ("while", "call", "conditional")  # their bodies' ops are events of their own
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute")


def parse_hlo(text: str) -> tuple[dict[str, str], dict[str, list[str]]]:
  """HLO text -> ({instruction name: its line after '='}, {computation: its lines})."""
  instructions: dict[str, str] = {}
  computations: dict[str, list[str]] = {}
  current: list[str] | None = None
  for line in text.splitlines():
    header = _COMPUTATION.match(line)  # headers start at column 0, instructions indented
    if header and not line[:1].isspace() and not line.startswith("HloModule"):
      current = computations.setdefault(header.group(1), [])
      continue
    if line.strip() == "}":
      current = None
      continue
    match = _INSTRUCTION.match(line)
    if match and current is not None:
      instructions[match.group(1)] = match.group(2)
      current.append(match.group(2))
  return instructions, computations


def opcode(line: str) -> str:
  """The opcode of an HLO instruction's right-hand side ('fusion', 'dot', 'custom-call', ...)."""
  match = _OPCODE.search(" " + line.split(", metadata=")[0])
  return match.group(1) if match else "?"


def category(line: str | None, computations: dict[str, list[str]]) -> str:
  """What an instruction does, in a few words, from its HLO line (and a fusion's body)."""
  if line is None:
    return "not in the program (runtime copy, memset, ...)"
  code = opcode(line)
  target = _TARGET.search(line)
  if code == "custom-call" and target:
    name = target.group(1)
    if "fmha" in name or "attention" in name.lower():
      return "fused attention (cuDNN)"
    if "gemm" in name or "matmul" in name.lower():
      return "matmul (library)"
    return f"custom call {name}"
  if code == "fusion":
    calls = _CALLS.search(line)
    body = computations.get(calls.group(1), []) if calls else []
    ops = {opcode(b) for b in body}
    if "__triton_gemm" in line or "triton_gemm" in line or "dot" in ops:
      return "matmul fusion"
    if "custom-call" in ops and any("fmha" in b for b in body):
      return "fused attention (cuDNN)"
    for marker, label in (("scatter", "scatter fusion"), ("sort", "sort fusion"),
                          ("reduce", "reduction fusion"), ("transpose", "transpose fusion")):
      if marker in ops:
        return label
    return "elementwise fusion"
  if code in ("dot", "convolution"):
    return "matmul"
  if code in _COLLECTIVES or code.endswith("-start") or code.endswith("-done"):
    return "collective"
  if code in ("copy", "transpose", "copy-start", "copy-done"):
    return "copy / transpose"
  return code


def component(op_name: str | None) -> str:
  """'forward' / 'backward' / 'outside grad' (optimizer update, clipping, metrics) and the module
  path of an op, layer numbers as '*': 'backward: RagModel/generator/decoder/layers_*/fc1' for
  the fc1 matmul's gradient."""
  if not op_name:
    return "?"
  phase = ("backward" if "transpose(" in op_name else
           "forward" if "jvp(" in op_name else "outside grad")
  parts = []
  names = op_name.split("/")
  if names[0].startswith("jit("):  # the jitted function itself
    names = names[1:]
  for part in names:
    while (match := _WRAPPED.match(part)):  # jvp(RagModel) -> RagModel
      part = match.group(1)
    if part and not part.startswith(("<", "_")):
      parts.append(re.sub(r"_\d+$", "_*", part))
  return f"{phase}: {'/'.join(parts[:-1]) or '(top level)'}"


def _events(space: Any) -> tuple[list[tuple[str, str, int, int]], bool]:
  """(hlo_op, kernel name, start_ns, duration_ns) of every instruction event; True if they are
  a device's."""
  device, host = [], []
  for plane in space.planes:
    on_device = plane.name.startswith("/device:")
    for line in plane.lines:
      if on_device and line.name.startswith("XLA"):  # derived lines repeat the stream events
        continue
      for event in line.events:
        stats = dict(event.stats)
        name = stats.get("hlo_op")
        if not name:
          continue
        row = (str(name), str(event.name), event.start_ns, event.duration_ns)
        (device if on_device else host).append(row)
  return (device, True) if device else (host, False)


def _instruction_of(hlo_op: str, kernel: str, instructions: dict[str, str]) -> str:
  """The instruction an event ran. Inside a CUDA graph (XLA's command buffers) every kernel is
  tagged with the buffer's name; its kernel is named after its fusion ('loop_add_fusion_3' for
  'loop_add_fusion.3'), and library kernels (cuBLAS) keep their own names."""
  if not hlo_op.startswith("command_buffer"):
    return hlo_op
  if kernel in instructions:
    return kernel
  dotted = re.sub(r"_(\d+)$", r".\1", kernel)
  return dotted if dotted in instructions else kernel


def _union_ns(intervals: list[tuple[int, int]]) -> int:
  total, end = 0, None
  for start, stop in sorted(intervals):
    if end is None or start > end:
      total += stop - start
      end = stop
    elif stop > end:
      total += stop - end
      end = stop
  return total


def summarize(trace_dir: str, hlo_text: str, wall_s: float, calls: int,
              top: int = 30) -> dict[str, Any]:
  """Per-instruction and per-category time of the newest trace under `trace_dir`."""
  from jax.profiler import ProfileData
  files = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.xplane.pb")),
                 key=os.path.getmtime)
  if not files:
    return {"error": f"no trace written under {trace_dir}"}
  raw, on_device = _events(ProfileData.from_file(files[-1]))
  instructions, computations = parse_hlo(hlo_text)
  events = [(_instruction_of(op, kernel, instructions), start, duration)
            for op, kernel, start, duration in raw]
  events = [e for e in events if opcode(instructions.get(e[0], "")) not in _CONTAINERS]
  per_op: collections.Counter[str] = collections.Counter()
  counts: collections.Counter[str] = collections.Counter()
  per_kernel: collections.Counter[str] = collections.Counter()
  for name, _, duration in events:
    per_op[name] += duration
    counts[name] += 1
  for _, kernel, _, duration in raw:
    per_kernel[kernel[:120]] += duration
  total = sum(per_op.values()) or 1
  by_category: collections.Counter[str] = collections.Counter()
  by_component: collections.Counter[str] = collections.Counter()
  for name, ns in per_op.items():
    line = instructions.get(name)
    by_category[category(line, computations)] += ns
    op_name = _OP_NAME.search(line or "")
    by_component[component(op_name.group(1) if op_name else None)] += ns
  rows = []
  for name, ns in per_op.most_common(top):
    line = instructions.get(name)
    op_name = _OP_NAME.search(line or "")
    rows.append({"op": name, "ms_per_call": ns / 1e6 / calls, "share": ns / total,
                 "launches_per_call": counts[name] / calls,
                 "category": category(line, computations),
                 "shape": (line or "").split(" ")[0][:120],
                 "source": op_name.group(1)[-200:] if op_name else None})
  busy = _union_ns([(s, s + d) for _, s, d in events])
  return {
      "where": "device kernels" if on_device else "host thunks",
      "calls": calls, "wall_ms_per_call": 1e3 * wall_s / calls,  # calls = program runs
      "op_ms_per_call": total / 1e6 / calls,
      "busy_ms_per_call": busy / 1e6 / calls,
      "busy_fraction": busy / 1e9 / wall_s if wall_s else None,
      "events_per_call": len(events) / calls,
      "by_category": {k: {"ms_per_call": v / 1e6 / calls, "share": v / total}
                      for k, v in by_category.most_common()},
      "by_component": {k: {"ms_per_call": v / 1e6 / calls, "share": v / total}
                       for k, v in by_component.most_common(top)},
      "top_ops": rows,
      "top_kernels": [{"kernel": k, "ms_per_call": v / 1e6 / calls, "share": v / total}
                      for k, v in per_kernel.most_common(top)],
  }


def profile(fn: Callable[[], Any], calls: int, hlo_text: str, trace_dir: str | None = None,
            steps: int = 1) -> dict[str, Any]:
  """Traces `calls` calls of fn (each blocks until its work is done) and summarises them per
  step: fn runs `steps` steps of the program per call (e.g. dispatched back to back)."""
  with tempfile.TemporaryDirectory() as tmp:
    where = trace_dir or tmp
    jax.profiler.start_trace(where)
    start = time.perf_counter()
    try:
      for _ in range(calls):
        fn()
    finally:
      wall = time.perf_counter() - start
      jax.profiler.stop_trace()
    return summarize(where, hlo_text, wall, calls * steps)
