"""benchmark.py on several processes: each process's share of a workload, timed calls that end
on every process together, and what each process measured gathered to all (the coordination
service's key-value store, rag_jax/distributed.py; on one process all of it is a no-op).

A workload with collectives (the train step, the sharded exact index) lines the processes up by
them; one whose processes work apart (the encoding batch and corpus) ends each timed call at a
barrier, so that every process's median is the slowest share's wall time and global work / that
time is the job's rate. The ceilings a rate is compared with are the processes' summed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from rag_jax.distributed import all_gather_text, barrier, process_count, process_index

# How long a process waits for the others at a barrier or an exchange (a dead process is found
# sooner: jax's heartbeat timeout aborts the job).
WAIT_S = 1800.0


def share(count: int) -> range:
  """This process's block of `count` items: process p of P takes [p * count // P,
  (p + 1) * count // P), so the blocks are contiguous, in order, and cover every item once."""
  p, processes = process_index(), process_count()
  return range(p * count // processes, (p + 1) * count // processes)


def together(fn: Callable[[], Any], name: str) -> Callable[[], Any]:
  """fn, returning only once every process's call of it returned (one process: fn)."""
  if process_count() == 1:
    return fn

  def call():
    out = fn()
    barrier(name, WAIT_S)
    return out

  return call


def gathered(name: str, facts: dict[str, Any]) -> list[dict[str, Any]]:
  """Every process's JSON-able `facts`, in process order ([facts] on one process)."""
  return [json.loads(t) for t in all_gather_text(name, json.dumps(facts), WAIT_S)]


def fields(rows: int | None = None) -> dict[str, Any]:
  """What a row records of the split on several processes ({} on one): the process count and,
  for a global batch of `rows` split evenly, each process's rows."""
  if process_count() == 1:
    return {}
  out: dict[str, Any] = {"processes": process_count()}
  if rows is not None:
    out["rows_per_process"] = rows // process_count()
  return out


def summed_ceilings(ceilings: dict[str, Any]) -> dict[str, Any]:
  """The job's ceilings: on several processes, each rate summed over the processes (each
  measured its own device at the same time, as the workloads run) and every process's own
  under `per_process`; on one process `ceilings` unchanged."""
  each = gathered("benchmark/ceilings", ceilings)
  if len(each) == 1:
    return ceilings
  total = {k: sum(c[k] for c in each) if isinstance(v, float) else v
           for k, v in ceilings.items()}
  return {**total, "per_process": each}
