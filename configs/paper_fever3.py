"""FEVER 3-way fact verification, the paper's Table 2 (label accuracy).

    python evaluate.py --config=configs/paper_fever3.py --workdir=runs/fever3_seq \
        --config.rag_checkpoint=runs/fever3_seq/export --config.index_dir=/data/wiki_index \
        --config.eval.test_file=/data/fever/shared_task_dev.jsonl

Claims are classified by generating one label token (§3.4; targets
rag_jax.data.tasks.FEVER_LABEL_TARGETS). The FEVER test labels are hidden, so the file is a dev
split (original FEVER jsonl; KILT's has no NOT ENOUGH INFO claims). RAG-Token and RAG-Sequence
are the same model for a one-token target (§2.1), one number for both. The paper gives no test-
time settings for FEVER (App. A covers QA, MS-MARCO and Jeopardy): greedy, 10 docs here. No
FEVER RAG checkpoint is released: train one with train.py from
facebook/rag-{sequence,token}-base.
"""

from configs import paper_common


def get_config():
  settings = dict(n_docs=10, num_beams=1, decoding="thorough")  # Not in the paper (see above).
  config = paper_common.get_config(
      "fever3", reader="fever", test_file_hint="a FEVER dev jsonl (original or KILT)",
      metrics=("label_accuracy",),
      paper={"rag_token": {"label_accuracy": 72.5},
             "rag_sequence": {"label_accuracy": 72.5}},
      paper_label="paper (Table 2, FEVER-3 test)",
      test={"rag_token": settings, "rag_sequence": settings}, max_length=8, fever_classes=3)
  config.max_target_length = 8  # One label token with its specials.
  return config
