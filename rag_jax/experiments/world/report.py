"""The default job's report: report.json, report.md and the printed summary.

Every exact-match and hot-swap row names the objective its model was trained with, its export's
architecture and the decoder that produced its answers, as the evaluation recorded them from the
decoding calls (rag_jax.experiments.world.evaluation)."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from pathlib import Path
from typing import Any

import jax
import ml_collections

from rag_jax.decoding.generation import DECODER_NAMES
from rag_jax.experiments.world.evaluation import HotSwap
from rag_jax.utils.atomic import atomic_file


def machine() -> dict[str, Any]:
  return {"platform": platform.platform(), "processor": platform.processor() or "unknown",
          "cpu_cores": os.cpu_count(), "devices": [str(d) for d in jax.devices()],
          "jax": jax.__version__}


def build_report(config: ml_collections.ConfigDict, phases: dict[str, Any]) -> dict[str, Any]:
  """Gathers the phases' results into the report (figures only, no recomputation)."""
  ev = phases["evaluation"]["result"]
  models = {}
  for name in ("rag_sequence", "rag_token"):
    train = phases[name]["result"]
    swap = HotSwap(**ev[name]["hot_swap"])
    models[name] = {
        "trained_as": ev[name]["trained_as"],
        "export_architecture": ev[name]["export_architecture"],
        "decoder": ev[name]["decoder"],
        "heldout_em": ev[name]["em"],
        "recall_after": ev[name]["recall"],
        "hot_swap_follow_new": swap.share(swap.follow_new_index),
        "hot_swap_keep_old": swap.share(swap.keep_old_answer),
        "hot_swap": dataclasses.asdict(swap),
        "train_loss_first": train["loss_first"], "train_loss_last": train["loss_last"],
        "steps": train["steps"], "steps_per_s": train["steps_per_s"],
        "examples": ev[name]["examples"],
    }
  closed = phases["closed_book"]["result"]
  report = {
      "world": phases["world"]["result"],
      "tokenizer": {k: v for k, v in phases["tokenizer"]["result"].items()},
      "retriever": {**phases["retriever"]["result"], "recall_before": ev["recall_before"]},
      "rag_sequence": models["rag_sequence"], "rag_token": models["rag_token"],
      "closed_book": {"decoder": ev["closed_book"]["decoder"],
                      "heldout_em": ev["closed_book"]["em"], "steps": closed["steps"],
                      "train_loss_first": closed["loss_first"],
                      "train_loss_last": closed["loss_last"],
                      "train_token_accuracy_note": "closed_book/report.json"},
      "majority_em": ev["majority_em"],
      "decoding_options": ev["decoding_options"],
      # Each model exported as its objective's class and decoded with that class's decoder.
      "decoders_match_objectives": all(
          m["decoder"]["kind"] == m["hot_swap"]["decoder"]["kind"] == m["trained_as"]
          and m["export_architecture"] == m["decoder"]["architecture"]
          for m in models.values()),
      "phase_seconds": {name: p["seconds"] for name, p in phases.items()},
      "total_seconds": round(sum(p["seconds"] for p in phases.values()), 1),
      "machine": machine(),
      "config": json.loads(config.to_json_best_effort()),
  }
  return report


def _pct(x: float) -> str:
  return f"{100 * x:.1f} %"


def _objective(model: dict[str, Any]) -> str:
  """'RAG-Token' for a model trained with the RAG-Token marginal likelihood."""
  return DECODER_NAMES[model["trained_as"]]


def markdown(r: dict[str, Any]) -> str:
  """The report as Markdown (report.md and the printed summary)."""
  w, seq, tok, cb = r["world"], r["rag_sequence"], r["rag_token"], r["closed_book"]
  ks = list(r["retriever"]["recall_before"])
  lines = [
      "# rag_jax default job: RAG on a synthetic knowledge world", "",
      f"World: {w['people']} people, {w['facts']} facts, {w['passages']} passages "
      f"({w['distractor_passages']} distractors); {w['train_questions']} training questions "
      f"over {w['train_facts']} facts; {w['heldout_questions']} held-out questions about facts "
      f"never asked in training; {w['changed_heldout']} held-out facts changed in world 2. "
      f"Tokenizer: {r['tokenizer']['kind']}, {r['tokenizer']['vocab_size']} tokens.", "",
      "## Held-out exact match", "",
      "| model (training objective) | decoder that ran | EM | train loss (first -> last window) "
      "| steps | steps/s |",
      "|---|---|---|---|---|---|",
  ]
  for m in (seq, tok):
    lines.append(f"| {_objective(m)} | {m['decoder']['name']} | **{m['heldout_em']:.3f}** | "
                 f"{m['train_loss_first']:.3f} -> {m['train_loss_last']:.4f} | {m['steps']} | "
                 f"{m['steps_per_s']:.2f} |")
  lines += [
      f"| closed-book BART (same size, steps) | {cb['decoder']['name']} | "
      f"**{cb['heldout_em']:.3f}** | {cb['train_loss_first']:.3f} -> "
      f"{cb['train_loss_last']:.4f} | {cb['steps']} | |",
      f"| majority answer per attribute | | {r['majority_em']:.3f} | | | |", "",
      "Exports: " + ", ".join(f"{_objective(m)} {m['export_architecture']}" for m in (seq, tok))
      + "; decoders as returned by the decoding calls; "
      + ("each model decoded with its training objective's decoder."
         if r["decoders_match_objectives"] else
         "**a model was NOT decoded with its training objective's decoder.**"), "",
      "## Retrieval recall on held-out questions (ScaNN index)", "",
      "| question encoder | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks),
      "| retriever (before RAG training) | " + " | ".join(
          f"{r['retriever']['recall_before'][k]:.3f}" for k in ks) + " |",
  ]
  for name, m in (("after RAG-Sequence training", seq), ("after RAG-Token training", tok)):
    lines.append(f"| {name} | " + " | ".join(f"{m['recall_after'][k]:.3f}" for k in ks) + " |")
  ret = r["retriever"]
  lines += [
      "", f"Retriever: {ret['steps']} steps, in-batch loss {ret['loss_first']:.3f} -> "
      f"{ret['loss_last']:.3f} (chance {ret['chance_loss']:.3f}).", "",
      "## Index hot-swap (world 2's index, no retraining)", "",
      "| model (training objective) | decoder that ran | changed facts | answers with the new "
      "value | still the old value |",
      "|---|---|---|---|---|",
  ]
  for m in (seq, tok):
    s = m["hot_swap"]
    lines.append(f"| {_objective(m)} | {s['decoder']['name']} | {s['changed']} | "
                 f"{s['follow_new_index']} "
                 f"({_pct(m['hot_swap_follow_new'])}) | {s['keep_old_answer']} "
                 f"({_pct(m['hot_swap_keep_old'])}) |")
  lines += [
      "", "## Speed", "",
      f"RAG training steps/s (batch {r['config']['rag']['batch_size']}, k = "
      f"{r['config']['rag']['n_docs']}): RAG-Sequence {seq['steps_per_s']:.2f}, RAG-Token "
      f"{tok['steps_per_s']:.2f} (this run, compilation left out). The step against "
      "transformers' PyTorch RAG on the same shapes: `python benchmark.py --preset=world`.", "",
      "| phase | seconds |", "|---|---|",
      *[f"| {k} | {v:.1f} |" for k, v in r["phase_seconds"].items()],
      f"| **total** | **{r['total_seconds']:.1f}** |", "",
      f"Machine: {r['machine']['cpu_cores']} CPU cores, {r['machine']['platform']}, "
      f"jax {r['machine']['jax']}, devices {', '.join(r['machine']['devices'])}.",
  ]
  return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], workdir: Path) -> None:
  """report.md first, report.json last: report.json marks a finished run."""
  with atomic_file(workdir / "report.md", "w") as f:
    f.write(markdown(report))
  with atomic_file(workdir / "report.json", "w") as f:
    json.dump(report, f, indent=2)
