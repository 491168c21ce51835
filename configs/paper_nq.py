"""Natural Questions, the paper's Table 1 (open-domain QA, test exact match).

    python evaluate.py --config=configs/paper_nq.py --workdir=runs/nq_seq \
        --config.rag_checkpoint=/ckpt/rag-sequence-nq --config.index_dir=/data/wiki_index \
        --config.eval.test_file=/data/dpr/nq-test.qa.csv        # add --config.model_type=rag_token
    python train.py --config=configs/paper_nq.py --workdir=runs/nq_seq \
        --config.rag_checkpoint=/ckpt/rag-sequence-base --config.index_dir=/data/wiki_index \
        --config.data_dir=/data/nq       # {train,val}.{source,target}: one (q, a) pair a line

Test file: DPR's nq-test.qa.csv (3,610 questions). Training data (paper App. D): every (question,
answer) annotation pair is one example (rag_jax.data.tasks.expand_answers, write_source_target).
"""

from configs import paper_common


def get_config():
  config = paper_common.get_config(
      "nq", reader="dpr_qa_csv", test_file_hint="DPR's nq-test.qa.csv",
      metrics=("exact_match", "token_f1"),
      paper={"rag_token": {"exact_match": 44.1}, "rag_sequence": {"exact_match": 44.5}},
      paper_label="paper (Table 1, NQ test)", test=paper_common.QA_TEST)
  return config
