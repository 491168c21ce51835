"""Readers for the paper's tasks (Lewis et al., 2020, §3, App. D), each returning a TaskSplit of
TaskExample(source, targets, id, titles, targets_are_regex).

  NQ, TriviaQA, WebQuestions   read_dpr_qa_csv (DPR's *.qa.csv), read_tfds_qa (NQ-open, TriviaQA)
  CuratedTrec                  read_curatedtrec (answers are regexes)
  MS-MARCO NLG v2.1            read_msmarco_nlg
  Jeopardy QGen (SearchQA)     read_searchqa_jeopardy
  FEVER 3-way / 2-way          read_fever
  reference source/target      read_source_target_task, write_source_target
  App. D training targets      expand_answers (NQ, WQ), first_answer (TQA)
"""

from rag_jax.data.tasks.common import (
    TaskExample,
    TaskFileError,
    TaskSplit,
    expand_answers,
    first_answer,
    read_source_target_task,
    write_source_target,
)
from rag_jax.data.tasks.files import (
    FEVER_LABEL_TARGETS,
    FEVER_LABELS_2WAY,
    FEVER_LABELS_3WAY,
    NO_ANSWER,
    is_single_token,
    read_curatedtrec,
    read_dpr_qa_csv,
    read_fever,
    read_msmarco_nlg,
    read_searchqa_jeopardy,
)
from rag_jax.data.tasks.tfds_qa import TFDS_QA_TASKS, TaskDataNotPrepared, read_tfds_qa

__all__ = [
    "FEVER_LABELS_2WAY", "FEVER_LABELS_3WAY", "FEVER_LABEL_TARGETS", "NO_ANSWER", "TFDS_QA_TASKS",
    "TaskDataNotPrepared", "TaskExample", "TaskFileError", "TaskSplit", "expand_answers",
    "first_answer", "is_single_token", "read_curatedtrec", "read_dpr_qa_csv", "read_fever",
    "read_msmarco_nlg", "read_searchqa_jeopardy", "read_source_target_task", "read_tfds_qa",
    "write_source_target",
]
