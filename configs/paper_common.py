"""Shared builder of the paper-row configs (configs/paper_<task>.py), one per row of the RAG
paper's Tables 1 and 2 (Lewis et al., 2020), for RAG-Sequence and RAG-Token
(`--config.model_type=rag_token`).

A paper-row config is configs/rag_finetune.py's (so `python train.py --config=...` fine-tunes it)
plus an `eval` group read by `python evaluate.py --config=...` (rag_jax/evaluation/paper.py):
the task's test file and reader, the paper's test-time settings for each model_type and the
paper's number for that row. Test-time settings are the paper's Appendix A: open-domain QA
decodes greedily, RAG-Token with 15 docs and RAG-Sequence with 50 docs and Thorough Decoding;
MS-MARCO and Jeopardy use beam size 4 and 10 docs for both, RAG-Sequence with Fast Decoding.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from configs import rag_finetune

# Paper, Appendix A: "For open-domain QA we report test numbers using 15 retrieved documents for
# RAG-Token models. For RAG-Sequence models, we report test results using 50 retrieved
# documents, and we use the Thorough Decoding approach ... We use greedy decoding for QA as we
# did not find beam search improved results."
QA_TEST = {"rag_token": dict(n_docs=15, num_beams=1, decoding="thorough"),
           "rag_sequence": dict(n_docs=50, num_beams=1, decoding="thorough")}
# Paper, Appendix A: "For Open-MSMarco and Jeopardy question generation, we report test numbers
# using ten retrieved documents for both RAG-Token and RAG-Sequence ... We use beam search with
# a beam size of four, and use the Fast Decoding approach for RAG-Sequence models, as Thorough
# Decoding did not improve performance."
GENERATION_TEST = {"rag_token": dict(n_docs=10, num_beams=4, decoding="fast"),
                   "rag_sequence": dict(n_docs=10, num_beams=4, decoding="fast")}


def get_config(task: str, *, reader: str, test_file_hint: str, metrics: tuple[str, ...],
               paper: dict[str, dict[str, float]], paper_label: str,
               test: dict[str, dict[str, Any]], max_length: int = 50,
               fever_classes: int = 3) -> ml_collections.ConfigDict:
  """configs/rag_finetune.py's config + the `eval` group of one paper row.

  paper: {model_type: {metric: the paper's value (percent)}}; test: {model_type: n_docs,
  num_beams, decoding}.
  """
  config = rag_finetune.get_config()
  config.rag_checkpoint = ""  # Training starts here; evaluation falls back to it (see below).
  # Read by evaluate.py only (train.py checks it first): changed on a trained workdir, the
  # training is kept (rag_jax/training/loop.py, EVALUATION_ONLY).
  ev = config.eval = ml_collections.ConfigDict()
  ev.task = task  # The row's name; results go to <workdir>/eval/<task>-<model_type>-<split>/.
  ev.reader = reader  # rag_jax.data.tasks reader of test_file (rag_jax/evaluation/paper.py).
  ev.test_file = ""  # The evaluation file (see test_file_hint and README's paper table).
  ev.test_file_hint = test_file_hint  # What test_file should be (shown when it is empty).
  ev.split = "test"  # Label of the split in the results' folder name.
  ev.tfds_name = ""  # reader="tfds" only: the TFDS dataset (test_file = its data_dir).
  ev.tfds_split = "validation"  # reader="tfds" only: NQ-open's validation = the paper's test.
  ev.fever_classes = fever_classes  # reader="fever": 3-way or 2-way.
  # reader="msmarco_nlg" only. False: the NLG task's questions, those with wellFormedAnswers.
  # True: every answered question, scored against its wellFormedAnswers if any, else its
  # extractive `answers` (not the NLG task).
  ev.msmarco_answers_fallback = False
  ev.limit = 0  # Evaluate the first `limit` questions only (0: all).
  # The checkpoint evaluated: this, else <workdir>/export (a train.py run of this config in the
  # same workdir), else rag_checkpoint (e.g. the released facebook/rag-sequence-nq).
  ev.checkpoint = ""
  ev.index_dir = ""  # The index evaluated against ("" = index_dir).
  ev.max_length = max_length  # Decoder length limit; the paper gives none (transformers'
  # eval_rag.py uses 50).
  ev.min_length = 0  # 0: the checkpoint's own generation defaults (min_length 1 in the hub's).
  ev.batch_size = 8  # Questions per fixed-shape batch (transformers' eval_rag.py: 8).
  ev.metrics = metrics  # rag_jax.evaluation.scoring.METRICS names; the first is the headline.
  # --retrieval_only: recall@k and precision@k (depths beyond the index's passages left out).
  ev.recall_ks = (1, 5, 10, 20, 50, 100)
  ev.paper_label = paper_label  # The column the paper's numbers are printed under.
  for model_type in ("rag_sequence", "rag_token"):
    row = ev[model_type] = ml_collections.ConfigDict(test[model_type])
    row.paper = ml_collections.ConfigDict(paper[model_type])
  return config
