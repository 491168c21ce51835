"""The world experiments' phase runner (rag_jax/experiments/world/phases.py): recorded phases
are skipped on a rerun, and a damaged phases.json is a named error that leaves it as it was."""

import json

import pytest

from rag_jax.experiments.world.phases import Phase, PhaseLog, run_phases
from rag_jax.utils.errors import InputError


def test_a_rerun_runs_only_the_phases_not_recorded(tmp_path):
  ran = []
  phases = [Phase(n, lambda job, n=n: ran.append(n) or {"phase": n}) for n in ("a", "b", "c")]
  assert not run_phases(None, phases, PhaseLog(tmp_path), stop_after="b")
  assert run_phases(None, phases, PhaseLog(tmp_path))
  assert ran == ["a", "b", "c"]
  recorded = json.loads((tmp_path / "phases.json").read_text())
  assert {n: r["result"] for n, r in recorded.items()} == {n: {"phase": n} for n in "abc"}


def test_a_damaged_phase_record_is_named_and_kept(tmp_path):
  # Before: json.JSONDecodeError's traceback, naming no file.
  damaged = '{"world": {"seconds": 0.1, "res'
  (tmp_path / "phases.json").write_text(damaged)
  with pytest.raises(InputError, match=rf"^{tmp_path}/phases.json: not the JSON this job "
                                       r"writes \(.*delete it to run every phase again$"):
    PhaseLog(tmp_path)
  assert (tmp_path / "phases.json").read_text() == damaged
