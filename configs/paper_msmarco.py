"""MS-MARCO NLG v2.1 as open-domain abstractive QA, the paper's Table 2 (BLEU-1, ROUGE-L).

    python evaluate.py --config=configs/paper_msmarco.py --workdir=runs/msmarco_seq \
        --config.rag_checkpoint=runs/msmarco_seq/export --config.index_dir=/data/wiki_index \
        --config.eval.test_file=/data/msmarco/dev_v2.1.json     # add --config.model_type=rag_token

Test file: MS-MARCO v2.1 dev_v2.1.json (the test answers are hidden; the paper's numbers are on
the test set). MS-MARCO's NLG task scores well-formed answers, so only the questions that have
them are evaluated (rag_jax.data.tasks.read_msmarco_nlg); the supplied passages are not used
(§3.2). BLEU-1 and ROUGE-L are scored as MS-MARCO's ms_marco_eval.py scores them
(docs/evaluation.md).
Distinct tri-grams: the paper's Table 5. No MS-MARCO RAG checkpoint is released: train one with
train.py from facebook/rag-{sequence,token}-base.
"""

from configs import paper_common


def get_config():
  config = paper_common.get_config(
      "msmarco", reader="msmarco_nlg", test_file_hint="MS-MARCO v2.1 dev_v2.1.json",
      metrics=("bleu1", "rouge_l", "distinct_trigrams"),
      paper={"rag_token": {"bleu1": 41.5, "rouge_l": 40.1, "distinct_trigrams": 77.8},
             "rag_sequence": {"bleu1": 44.2, "rouge_l": 40.8, "distinct_trigrams": 83.5}},
      paper_label="paper (Tables 2 and 5, test)", test=paper_common.GENERATION_TEST)
  config.max_target_length = 64  # Answers are sentences (the reference script's 25 cuts them).
  return config
