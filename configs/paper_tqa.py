"""TriviaQA, the paper's Table 1 (open-domain QA, test exact match, the standard open test set).

    python evaluate.py --config=configs/paper_tqa.py --workdir=runs/tqa_seq \
        --config.rag_checkpoint=/ckpt/rag-sequence-tqa --config.index_dir=/data/wiki_index \
        --config.eval.test_file=/data/dpr/trivia-test.qa.csv    # add --config.model_type=rag_token

Test file: DPR's trivia-test.qa.csv (11,313 questions; the paper's "standard" TQA test set is
TriviaQA's public dev split as DPR uses it, App. D; the TQA-Wiki column, 66.1 / 68.0, needs the
official Wikipedia test set). No TriviaQA RAG checkpoint is released: train one with train.py
from facebook/rag-{sequence,token}-base. Training data (paper App. D): one answer per question
(rag_jax.data.tasks.first_answer); the paper also drops answers absent from the top-1000
retrieved passages, which is not done here.
"""

from configs import paper_common


def get_config():
  return paper_common.get_config(
      "tqa", reader="dpr_qa_csv", test_file_hint="DPR's trivia-test.qa.csv",
      metrics=("exact_match", "token_f1"),
      paper={"rag_token": {"exact_match": 55.2}, "rag_sequence": {"exact_match": 56.8}},
      paper_label="paper (Table 1, TQA test)", test=paper_common.QA_TEST)
