"""Markdown tables from benchmark.py's JSON, written into docs between markers.

  python -m benchmarks.report --markdown=docs/benchmarks.md docs/benchmark_results/*.json

For each JSON file NAME.json the section between `<!-- begin NAME -->` and `<!-- end NAME -->`
of the markdown file is replaced (appended at the end if the markers are missing; a missing file
is created), so the figures in the docs are always the JSON's. The file is replaced whole, never
left half-written. `commit` is the checkout's commit the run measured (benchmarks/timing.py,
source_commit). `python -m benchmarks.doc_tables` renders every marked table of
README.md and docs/*.md, these included.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from absl import app, flags

from benchmarks.runner import derive
from rag_jax.utils.atomic import atomic_file


def _num(value: Any, fmt: str = "{:.3g}") -> str:
  return fmt.format(value) if isinstance(value, (int, float)) and value == value else "-"


def _pct(value: Any) -> str:
  return f"{100 * value:.1f} %" if isinstance(value, (int, float)) else "-"


def _memory(side: dict[str, Any]) -> str:
  if side.get("device_peak_gib") is not None:
    return f"{side['device_peak_gib']:.1f} GiB"
  device = side.get("device") or {}
  if device.get("peak_gib_in_use") is not None:
    return f"{device['peak_gib_in_use']:.1f} GiB"
  return f"{side['host_peak_mib'] / 1024:.1f} GiB host" if side.get("host_peak_mib") else "-"


def _copies(ceilings: dict[str, Any]) -> str:
  """'2.5e+03 GB/s (jax), 4.1e+03 GB/s (torch)', or the one figure older reports hold."""
  if "jax_copy_bandwidth" not in ceilings:
    return f"{_num(ceilings['copy_bandwidth'] / 1e9)} GB/s"
  parts = [f"{_num(ceilings['jax_copy_bandwidth'] / 1e9)} GB/s (jax)"]
  if ceilings.get("torch_copy_bandwidth"):
    parts.append(f"{_num(ceilings['torch_copy_bandwidth'] / 1e9)} GB/s (torch)")
  return ", ".join(parts)


def render(report: dict[str, Any]) -> str:
  """One markdown block: what ran, the ceilings, one table row per case."""
  derive(report)
  m, c = report["machine"], report.get("ceilings") or {}
  lines = [f"`{report['command']}` ({report['date'][:10]}; {m['devices']}, {m['cpu_count']} host "
           f"CPUs; jax {m['jax']}, flax {m['flax']}, torch {m.get('torch', '-')}, "
           f"transformers {m['transformers']}; compute {c.get('compute_dtype', '-')}"
           f"{'; XLA_FLAGS=' + m['xla_flags'] if m.get('xla_flags') else ''}"
           f"{'; compilation cache on' if m.get('compilation_cache') else ''}"
           f"; commit {report.get('commit', 'not recorded')})", ""]
  if c:
    lines += [f"Ceilings measured in the same run: {c['matmul_size']}^3 matmul "
              f"{_num(c.get('jax_matmul_flops', 0) / 1e12)} TFLOP/s (jax), "
              f"{_num((c.get('torch_matmul_flops') or 0) / 1e12)} TFLOP/s (torch); device copy "
              f"{_copies(c)} (read + write). \"of peak\" = hand-counted "
              f"matmul FLOPs / time / the faster matmul.", ""]
  lines += ["| workload | case | rag_jax /s | peer | peer /s | rag_jax vs peer | rag_jax of peak "
            "| peer of peak | rag_jax compile s | memory rag_jax / peer |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
  for row in report["results"]:
    ours, peer = row.get("rag_jax") or {}, row.get("peer") or {}
    frac = ours.get("fraction_of_peak")
    if row["workload"] == "retrieval" and "bandwidth_fraction" in ours:
      frac_text = f"{_pct(ours['bandwidth_fraction'])} of bandwidth"
    else:
      frac_text = _pct(frac)
    extra = ""
    if "recall@100" in ours:
      extra = f" (R@100 {ours['recall@100']:.3f} / {_num(peer.get('recall@100'))})"
    ratio = row.get("ratio_to_peer")
    lines.append(
        f"| {row['workload']} | {row['case']}{extra} | {_num(ours.get('items_per_s'))} | "
        f"{peer.get('name', peer.get('skipped', '-'))} | {_num(peer.get('items_per_s'))} | "
        f"{_num(ratio, '{:.2f}x') if ratio else '-'} | {frac_text} | "
        f"{_pct(peer.get('fraction_of_peak'))} | {_num(ours.get('compile_s'), '{:.0f}')} | "
        f"{_memory(ours)} / {_memory(peer)} |")
  for err in report.get("errors", []):
    lines.append(f"\n{err['group']}: {err['error']}")
  for row in report["results"]:
    if "error" in (row.get("rag_jax") or {}):
      lines.append(f"\n{row['workload']} {row['case']}: rag_jax failed: "
                   f"{row['rag_jax']['error'][:300]}")
  for row in report["results"]:
    summary = (row.get("rag_jax") or {}).get("profile")
    if summary and "by_category" in summary:
      lines += ["", *render_profile(row["case"], summary)]
  return "\n".join(lines)


def render_profile(case: str, summary: dict[str, Any], components: int = 12) -> list[str]:
  """Where one case's time went (benchmarks/profile.py): per category, then per component."""
  head = (f"Profile of {case} ({summary['calls']} traced calls, {summary['where']}): "
          f"{summary['wall_ms_per_call']:.1f} ms per call, ops {summary['op_ms_per_call']:.1f} "
          f"ms, busy {_pct(summary.get('busy_fraction'))} of the wall time, "
          f"{summary['events_per_call']:.0f} ops per call")
  unattributed = sum(part["share"] for label, part in summary["by_category"].items()
                     if label.startswith("not in the program"))
  if unattributed > 0.5:  # kernels inside CUDA graphs carry the graph's name only
    return [head + f"; {_pct(unattributed)} of the op time not attributed to instructions "
            "(kernels inside CUDA graphs: trace with XLA_FLAGS=--xla_gpu_enable_command_buffer= "
            "to attribute them)."]
  lines = [head + ".", "", "| where | ms per call | share of op time |", "|---|---:|---:|"]
  for label, part in summary["by_category"].items():
    lines.append(f"| {label} | {part['ms_per_call']:.2f} | {_pct(part['share'])} |")
  lines.append("| *by component (forward, backward, outside the gradient)* | | |")
  for label, part in list(summary.get("by_component", {}).items())[:components]:
    lines.append(f"| {label} | {part['ms_per_call']:.2f} | {_pct(part['share'])} |")
  return lines


def update(markdown: Path, reports: list[Path]) -> None:
  """Writes each report's tables between its markers in `markdown` (created if missing)."""
  text = markdown.read_text() if markdown.exists() else ""
  for path in reports:
    name = path.stem
    block = f"<!-- begin {name} -->\n{render(json.loads(path.read_text()))}\n<!-- end {name} -->"
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->",
                         re.S)
    text = (pattern.sub(lambda _, b=block: b, text) if pattern.search(text)
            else text + "\n" + block)
  with atomic_file(markdown, "w") as f:
    f.write(text)


_MARKDOWN = flags.DEFINE_string("markdown", "docs/benchmarks.md", "The markdown file to update.")


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError("name one or more benchmark.py JSON files")
  update(Path(_MARKDOWN.value), [Path(p) for p in argv[1:]])


if __name__ == "__main__":
  app.run(main)
