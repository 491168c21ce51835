"""The paper in miniature's figures as PNGs (matplotlib, headless): Figure 2 (RAG-Token's
posterior over the retrieved passages per generated token) and Figure 3 (EM and recall@K against
the passages retrieved at test time)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np

from rag_jax.experiments.world.paper_report import MODEL_LABELS, Figure2Panel, Figure3

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the headless backend is chosen)


def figure2(panels: Sequence[Figure2Panel], out_png: Path) -> None:
  """One heat map per panel: passages (rows) x generated tokens (columns), p(z | x, y_<=t)."""
  if not panels:
    return
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.2), squeeze=False)
  for ax, p in zip(axes[0], panels, strict=True):
    ax.imshow(np.asarray(p.posterior), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_yticks(range(len(p.titles)), [f"{k + 1}. {t}" for k, t in enumerate(p.titles)],
                  fontsize=7)
    ax.set_xticks(range(len(p.tokens)), [repr(t.strip() or t)[1:-1] for t in p.tokens],
                  rotation=60, fontsize=7)
    ax.set_title(f"{p.question}\n-> {p.generated}", fontsize=8)
  fig.suptitle("RAG-Token: posterior over the retrieved passages per generated token")
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)


def figure3(sweep: Figure3, world: str, out_png: Path) -> None:
  """Held-out EM and retrieval recall@K of the learned rows against K (log scale)."""
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
  for model, label in MODEL_LABELS.items():
    a1.plot(sweep.docs, sweep.em[model], marker="o", label=label)
    a2.plot(sweep.docs, sweep.recall[model], marker="o", label=label)
  for ax, title in ((a1, "held-out EM"), (a2, "retrieval recall@K")):
    ax.set_xscale("log")
    ax.set_xticks(sweep.docs, [str(d) for d in sweep.docs])
    ax.set_xlabel("documents retrieved at test time (K)")
    ax.set_title(f"{title} ({world} world)")
    ax.legend()
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)
  plt.close(fig)
