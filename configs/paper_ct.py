"""CuratedTrec, the paper's Table 1 (open-domain QA; gold answers are regular expressions).

    python train.py --config=configs/paper_ct.py --workdir=runs/ct_seq \
        --config.rag_checkpoint=runs/nq_seq/export --config.index_dir=/data/wiki_index \
        --config.data_dir=/data/ct
    python evaluate.py --config=configs/paper_ct.py --workdir=runs/ct_seq \
        --config.index_dir=/data/wiki_index \
        --config.eval.test_file=/data/dpr/curatedtrec-test.qa.csv

Test file: DPR's curatedtrec-test.qa.csv (694 questions, regex answers). A prediction is right
when a gold regex matches it from its start (DrQA's rule; the paper does not say which it used:
docs/evaluation.md). Paper §3.1: the CT model starts from the NQ RAG model. Training targets
(App. D): the most frequent regex match in the top-1000 retrieved passages, not built here;
write your own {train,val}.{source,target}.
"""

from configs import paper_common


def get_config():
  return paper_common.get_config(
      "ct", reader="curatedtrec", test_file_hint="DPR's curatedtrec-test.qa.csv",
      metrics=("regex_match",),
      paper={"rag_token": {"regex_match": 50.0}, "rag_sequence": {"regex_match": 52.2}},
      paper_label="paper (Table 1, CT test)", test=paper_common.QA_TEST)
