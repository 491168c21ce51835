"""WebQuestions, the paper's Table 1 (open-domain QA, test exact match).

    python train.py --config=configs/paper_wq.py --workdir=runs/wq_seq \
        --config.rag_checkpoint=runs/nq_seq/export --config.index_dir=/data/wiki_index \
        --config.data_dir=/data/wq
    python evaluate.py --config=configs/paper_wq.py --workdir=runs/wq_seq \
        --config.index_dir=/data/wiki_index --config.eval.test_file=/data/dpr/webq-test.qa.csv

Test file: DPR's webq-test.qa.csv (2,032 questions). Paper §3.1: the WQ model starts from the NQ
RAG model (rag_checkpoint = the NQ model: facebook/rag-sequence-nq or a paper_nq.py export).
Training data (App. D): every (question, answer) pair is one example (expand_answers).
"""

from configs import paper_common


def get_config():
  return paper_common.get_config(
      "wq", reader="dpr_qa_csv", test_file_hint="DPR's webq-test.qa.csv",
      metrics=("exact_match", "token_f1"),
      paper={"rag_token": {"exact_match": 45.5}, "rag_sequence": {"exact_match": 45.2}},
      paper_label="paper (Table 1, WQ test)", test=paper_common.QA_TEST)
