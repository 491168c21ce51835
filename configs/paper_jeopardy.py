"""Jeopardy question generation (SearchQA splits), the paper's Table 2 (BLEU-1, Q-BLEU-1).

    python evaluate.py --config=configs/paper_jeopardy.py --workdir=runs/jeopardy_tok \
        --config.model_type=rag_token --config.rag_checkpoint=runs/jeopardy_tok/export \
        --config.index_dir=/data/wiki_index --config.eval.test_file=/data/searchqa/test.jsonl

Input: the answer entity; output: the Jeopardy clue (§3.3). Test file: SearchQA's test split as
JSON records (rag_jax.data.tasks.read_searchqa_jeopardy). No Jeopardy RAG checkpoint is
released: train one with train.py from facebook/rag-{sequence,token}-base. Distinct tri-grams:
the paper's Table 5. Q-BLEU-1 and BLEU-1 (qgen_bleu1) are scored as the Q-BLEU script (Nema &
Khapra, 2018) scores them: lower-cased PTB-like tokens, punctuation dropped, the mean of sentence
BLEU-1 (docs/evaluation.md).
"""

from configs import paper_common


def get_config():
  config = paper_common.get_config(
      "jeopardy", reader="searchqa_jeopardy", test_file_hint="SearchQA test split (JSON)",
      metrics=("qbleu1", "qgen_bleu1", "distinct_trigrams"),
      paper={"rag_token": {"qgen_bleu1": 17.3, "qbleu1": 22.2, "distinct_trigrams": 46.8},
             "rag_sequence": {"qgen_bleu1": 14.7, "qbleu1": 21.4, "distinct_trigrams": 53.8}},
      paper_label="paper (Tables 2 and 5, test)", test=paper_common.GENERATION_TEST)
  config.max_target_length = 64  # Clues are sentences (the reference script's 25 cuts them).
  return config
