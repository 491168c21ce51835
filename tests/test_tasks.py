"""Task readers on small files in each public format, malformed rows, App. D helpers, and the
TFDS reader on tiny datasets prepared here from the real builders' feature specs (no download)."""

import csv
import json

import pytest

from rag_jax.data import qa
from rag_jax.data import tasks as t
from rag_jax.utils.errors import InputError, InputNotFoundError

# ---------------------------------------------------------------- DPR *.qa.csv, CuratedTrec

NQ_CSV = (
    'who got the first nobel prize in physics\t[\'Wilhelm Conrad Röntgen\']\n'
    'when is the next deadpool movie being released\t[\'May 18 , 2018\']\n'
    'big little lies season 2 how many episodes\t[\'seven\']\n'
    'who sings "does he love me" with reba\t[\'Linda Davis\', "Linda Kaye Davis"]\n'
)


def test_dpr_qa_csv(tmp_path):
  path = tmp_path / "nq-test.qa.csv"
  path.write_text(NQ_CSV, encoding="utf-8")
  split = t.read_dpr_qa_csv(path)
  assert len(split) == 4 and split.skipped == 0
  assert split[0] == t.TaskExample("who got the first nobel prize in physics",
                                   ("Wilhelm Conrad Röntgen",))
  # csv.reader treats a quote as quoting only at the start of a field, so these stay.
  assert split[3].source == 'who sings "does he love me" with reba'
  assert split[3].targets == ("Linda Davis", "Linda Kaye Davis")
  assert not split[0].targets_are_regex


def test_dpr_qa_csv_quoted_field_as_csv_writes_it(tmp_path):
  import csv

  path = tmp_path / "webq-test.qa.csv"
  with path.open("w", newline="", encoding="utf-8") as f:
    csv.writer(f, delimiter="\t").writerow(
        ['who said "to be or not"?', "['Hamlet', 'Shakespeare']"])
  split = t.read_dpr_qa_csv(path)
  assert split[0].source == 'who said "to be or not"?'
  assert split[0].targets == ("Hamlet", "Shakespeare")


@pytest.mark.parametrize("bad_line, message", [
    ("no tab here", "2 tab-separated fields"),
    ("q\t['unclosed", "not a Python literal"),
    ("q\t[]", "non-empty Python list of strings"),
    ("q\t[1, 2]", "non-empty Python list of strings"),
    ("\t['a']", "empty question"),
    ("q\t['a']\textra", "2 tab-separated fields"),
    # Answers that parse but are not a list: DPR's eval() would iterate them (a string's letters).
    ("q\t{['a']: 1}", r"not a Python literal \(TypeError: unhashable"),
    ('q\t{"a": 1}', "non-empty Python list of strings"),
    ("q\t42", "non-empty Python list of strings"),
    ("q\t'just a string'", "non-empty Python list of strings"),
    ("q\t('a', 'b')", "non-empty Python list of strings"),
    ("q\x00\t['a']", "NUL byte"),
])
def test_dpr_qa_csv_malformed_row_names_file_and_line(tmp_path, bad_line, message):
  path = tmp_path / "trivia-dev.qa.csv"
  path.write_text("q1\t['a']\nq2\t['b']\n" + bad_line + "\nq4\t['d']\n", encoding="utf-8")
  with pytest.raises(t.TaskFileError, match=message) as error:
    t.read_dpr_qa_csv(path)
  assert str(error.value).startswith(f"{path}:3: ")
  split = t.read_dpr_qa_csv(path, skip_malformed=True)
  assert [ex.source for ex in split] == ["q1", "q2", "q4"]
  assert split.skipped == 1 and split.skipped_at == (f"{path}:3",)


def test_curatedtrec_answers_are_regexes(tmp_path):
  from rag_jax import metrics

  path = tmp_path / "curatedtrec-test.qa.csv"
  path.write_text("Where is Roosevelt Field?\t['Long Island|New\\\\s?York|Roosevelt Field']\n",
                  encoding="utf-8")
  split = t.read_curatedtrec(path)
  assert split[0].targets_are_regex
  assert split[0].targets == (r"Long Island|New\s?York|Roosevelt Field",)
  assert metrics.regex_exact_match(["newyork"], [split[0].targets]) == 1.0


def test_dpr_qa_csv_unmatched_quote_never_merges_rows(tmp_path):
  # Line 2 opens a quote that closes on line 3: csv.reader (and DPR's reader) would read lines 2
  # and 3 as one question, 3 examples from 4 lines.
  path = tmp_path / "nq-test.qa.csv"
  path.write_text("q1\t['a']\n\"q2 opens\t['b']\nq3 closes\"\t['c']\nq4\t['d']\n",
                  encoding="utf-8")
  for skip in (False, True):  # Rows that ran together cannot be skipped one by one.
    with pytest.raises(t.TaskFileError, match=r"nq-test.qa.csv:2: a field opens a double quote "
                       "that closes on line 3"):
      t.read_dpr_qa_csv(path, skip_malformed=skip)
  path.write_text("q1\t['a']\n\"q2 never closes\t['b']\n", encoding="utf-8")
  with pytest.raises(t.TaskFileError, match=r"qa.csv:2: a field opens a double quote that never"):
    t.read_dpr_qa_csv(path)


def test_dpr_qa_csv_unmatched_quote_in_a_large_file(tmp_path):
  # Over the csv module's default field limit (128 KiB): csv raises "field larger than field
  # limit" with no file or line. The limit is set here as a fresh process has it
  # (rag_jax.retrieval.corpus raises it for the whole process when imported).
  path = tmp_path / "trivia-test.qa.csv"
  path.write_text("q1\t['a']\n\"q2 opens\t['b']\n"
                  + "".join(f"q{i} {'x' * 100}\t['c']\n" for i in range(3, 1500)), encoding="utf-8")
  assert path.stat().st_size > 128 * 1024
  limit = csv.field_size_limit(128 * 1024)
  try:
    with pytest.raises(t.TaskFileError, match=r"trivia-test.qa.csv:2: .*double quote"):
      t.read_dpr_qa_csv(path)
  finally:
    csv.field_size_limit(limit)


def _binary(path):
  path.write_bytes(b"q1\t['a']\n\x89PNG\r\n\x1a\n\x00\x00\rIHDR\n")
  return path


@pytest.mark.parametrize("reader, name", [
    (t.read_dpr_qa_csv, "nq-test.qa.csv"), (t.read_curatedtrec, "curatedtrec-test.qa.csv"),
    (t.read_msmarco_nlg, "dev_v2.1.json"), (t.read_searchqa_jeopardy, "test.jsonl"),
    (t.read_searchqa_jeopardy, "test.json"), (t.read_fever, "fever-dev-kilt.jsonl"),
])
def test_task_readers_refuse_missing_and_binary_files_by_name(tmp_path, reader, name):
  with pytest.raises(InputNotFoundError, match=f"{tmp_path / name}: no such file"):
    reader(tmp_path / name)
  folder = (tmp_path / "folder")
  folder.mkdir()
  if reader in (t.read_searchqa_jeopardy, t.read_fever):  # They read folders of .json records.
    with pytest.raises(InputNotFoundError, match=f"{folder}: a directory without .json files"):
      reader(folder)
  else:
    with pytest.raises(InputError, match=f"{folder}: not a file"):
      reader(folder)
  # The first bad byte (0x89) is on line 2; the whole file is refused, skip_malformed or not.
  with pytest.raises(t.TaskFileError, match=rf"{name}:2: not valid UTF-8 at byte offset 9 "
                     r"\(invalid start byte\); is it a binary file\?"):
    reader(_binary(tmp_path / name), skip_malformed=True)


def test_source_target_refuses_missing_and_binary_files_by_name(tmp_path):
  (tmp_path / "test.source").write_text("q1\nq2\n")
  with pytest.raises(InputNotFoundError, match="test.target: no such file"):
    t.read_source_target_task(tmp_path, "test")
  _binary(tmp_path / "test.target")
  with pytest.raises(qa.QAFormatError, match=r"test.target:2: not valid UTF-8 at byte offset 9"):
    t.read_source_target_task(tmp_path, "test")


# ---------------------------------------------------------------- MS-MARCO NLG v2.1


def _msmarco(tmp_path, records):
  columns = {"query": {}, "answers": {}, "wellFormedAnswers": {}, "query_id": {},
             "query_type": {}, "passages": {}}
  for key, (query, answers, wfa) in records.items():
    columns["query"][key] = query
    columns["answers"][key] = answers
    columns["wellFormedAnswers"][key] = wfa
    columns["query_id"][key] = 1000 + int(key)
    columns["query_type"][key] = "DESCRIPTION"
    columns["passages"][key] = [{"is_selected": 0, "passage_text": "...", "url": "http://x"}]
  path = tmp_path / "dev_v2.1.json"
  path.write_text(json.dumps(columns), encoding="utf-8")
  return path


MSMARCO_RECORDS = {
    "0": ("define middle ear", ["The middle ear is..."], ["The middle ear is the part..."]),
    "1": ("what currency needed in scotland", ["pound sterling"], "[]"),
    "2": ("is it safe", ["No Answer Present."], "[]"),
    "3": ("what is rba", ["Results-Based Accountability"], ["RBA is Results-Based..."]),
}


def test_msmarco_nlg_scores_the_well_formed_subset(tmp_path):
  # The NLG task: only the questions with well-formed answers, scored against them.
  path = _msmarco(tmp_path, MSMARCO_RECORDS)
  split = t.read_msmarco_nlg(path)
  assert [(ex.id, ex.targets) for ex in split] == [("1000", ("The middle ear is the part...",)),
                                                   ("1003", ("RBA is Results-Based...",))]
  assert split.dropped == 2 and split.skipped == 0


def test_msmarco_nlg_answers_fallback_only_when_asked(tmp_path):
  path = _msmarco(tmp_path, MSMARCO_RECORDS)
  split = t.read_msmarco_nlg(path, answers_fallback=True)
  assert [ex.targets for ex in split] == [("The middle ear is the part...",), ("pound sterling",),
                                          ("No Answer Present.",), ("RBA is Results-Based...",)]
  assert [ex.id for ex in split] == ["1000", "1001", "1002", "1003"] and split.dropped == 0
  kept = t.read_msmarco_nlg(path, skip_no_answer=True, answers_fallback=True)
  assert len(kept) == 3 and kept.dropped == 1


def test_msmarco_nlg_paper_config_reads_the_well_formed_subset(tmp_path):
  from configs import paper_msmarco
  from rag_jax.evaluation import paper

  config = paper_msmarco.get_config()
  config.eval.test_file = str(_msmarco(tmp_path, MSMARCO_RECORDS))
  assert [ex.question for ex in paper.read_examples(config)] == ["define middle ear",
                                                                 "what is rba"]
  config.eval.msmarco_answers_fallback = True  # "is it safe" has no answer: left out.
  assert len(paper.read_examples(config)) == 3


def test_msmarco_malformed_record_and_eval_file(tmp_path):
  path = _msmarco(tmp_path, {"0": ("q", ["a"], "[]"), "7": ("q7", [], "[]"),
                             "8": ("q8", ["a"], [1])})
  with pytest.raises(t.TaskFileError, match=r"dev_v2.1.json:record 8: wellFormedAnswers \[1\]"):
    t.read_msmarco_nlg(path)
  with pytest.raises(t.TaskFileError, match=r"dev_v2.1.json:record 7: answers \[\]"):
    t.read_msmarco_nlg(path, answers_fallback=True)
  assert t.read_msmarco_nlg(path, skip_malformed=True).skipped == 1
  assert t.read_msmarco_nlg(path, skip_malformed=True, answers_fallback=True).skipped == 2
  no_answers = tmp_path / "eval_v2.1_public.json"
  no_answers.write_text(json.dumps({"query": {"0": "q"}, "query_id": {"0": 1}}))
  with pytest.raises(t.TaskFileError, match="no \"wellFormedAnswers\" column"):
    t.read_msmarco_nlg(no_answers)
  with pytest.raises(t.TaskFileError, match="no \"answers\" column"):
    t.read_msmarco_nlg(no_answers, answers_fallback=True)
  broken = tmp_path / "broken.json"
  broken.write_text('{"query": {\n"0": ')
  with pytest.raises(t.TaskFileError, match=r"broken.json:2: not JSON"):
    t.read_msmarco_nlg(broken)


# ---------------------------------------------------------------- SearchQA -> Jeopardy QGen

SEARCHQA = {"category": "EXPLORERS", "air_date": "2004-12-31", "show_number": "4680",
            "question": "'This Italian sailed for Spain in 1492'", "value": "$200",
            "answer": "Christopher Columbus", "round": "Jeopardy!", "id": "sqa-1",
            "search_results": [{"snippet": "...", "title": "Columbus", "url": "http://x"}]}


def test_searchqa_jeopardy_directory_and_jsonl(tmp_path):
  folder = tmp_path / "searchqa_test"
  folder.mkdir()
  (folder / "000001.json").write_text(json.dumps(SEARCHQA))
  (folder / "000002.json").write_text(json.dumps({**SEARCHQA, "answer": "Magellan", "id": None}))
  split = t.read_searchqa_jeopardy(folder)
  assert split[0] == t.TaskExample("Christopher Columbus",
                                   ("'This Italian sailed for Spain in 1492'",), id="sqa-1")
  assert split[1].source == "Magellan" and split[1].id is None
  jsonl = tmp_path / "test.jsonl"
  jsonl.write_text(json.dumps(SEARCHQA) + "\n" + json.dumps({**SEARCHQA, "answer": ""}) + "\n")
  with pytest.raises(t.TaskFileError, match=r"test.jsonl:2: needs non-empty"):
    t.read_searchqa_jeopardy(jsonl)
  assert len(t.read_searchqa_jeopardy(jsonl, skip_malformed=True)) == 1


def test_searchqa_bad_json_line(tmp_path):
  jsonl = tmp_path / "train.jsonl"
  jsonl.write_text(json.dumps(SEARCHQA) + "\n{oops\n")
  with pytest.raises(t.TaskFileError, match=r"train.jsonl:2: not JSON"):
    t.read_searchqa_jeopardy(jsonl)


# ---------------------------------------------------------------- FEVER (KILT and original)

KILT = [
    {"id": "3", "input": "Nikolaj Coster-Waldau worked with the Fox Broadcasting Company.",
     "output": [{"answer": "SUPPORTS", "provenance": [{"wikipedia_id": "1", "title": "Fox"}]},
                {"answer": "SUPPORTS", "provenance": [{"wikipedia_id": "2", "title": "Nikolaj"}]}]},
    {"id": "4", "input": "Roman Atwood is a content creator.",
     "output": [{"answer": "REFUTES", "provenance": []}]},
]
ORIGINAL = [
    {"id": 75397, "verifiable": "VERIFIABLE", "label": "SUPPORTS", "claim": "A claim.",
     "evidence": [[[92206, 104971, "Nikolaj_Coster-Waldau", 7]]]},
    {"id": 91198, "verifiable": "NOT VERIFIABLE", "label": "NOT ENOUGH INFO",
     "claim": "Another claim.", "evidence": [[[108548, None, None, None]]]},
]


def _jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def test_fever_kilt_and_original(tmp_path):
  kilt = t.read_fever(_jsonl(tmp_path / "fever-dev-kilt.jsonl", KILT))
  assert [ex.targets for ex in kilt] == [("true",), ("false",)]
  assert kilt[0].titles == ("Fox", "Nikolaj") and kilt[0].id == "3"
  three = t.read_fever(_jsonl(tmp_path / "shared_task_dev.jsonl", ORIGINAL), num_classes=3)
  assert [ex.targets for ex in three] == [("true",), ("unknown",)] and three.dropped == 0
  two = t.read_fever(tmp_path / "shared_task_dev.jsonl", num_classes=2)
  assert [ex.source for ex in two] == ["A claim."] and two.dropped == 1
  targets = {"SUPPORTS": "yes", "REFUTES": "no", "NOT ENOUGH INFO": "nei"}
  custom = t.read_fever(tmp_path / "shared_task_dev.jsonl", label_targets=targets)
  assert [ex.targets[0] for ex in custom] == ["yes", "nei"]


def test_fever_malformed(tmp_path):
  bad = [ORIGINAL[0], {**ORIGINAL[0], "label": "MAYBE"}, {"id": 1, "label": "SUPPORTS"},
         {"id": 2, "input": "c", "output": [{"answer": "SUPPORTS"}, {"answer": "REFUTES"}]}]
  path = _jsonl(tmp_path / "train.jsonl", bad)
  with pytest.raises(t.TaskFileError, match=r"train.jsonl:2: label 'MAYBE'"):
    t.read_fever(path)
  split = t.read_fever(path, skip_malformed=True)
  assert len(split) == 1 and split.skipped_at == tuple(f"{path}:{i}" for i in (2, 3, 4))
  with pytest.raises(ValueError, match="num_classes"):
    t.read_fever(path, num_classes=4)


# ---------------------------------------------------------------- source/target, App. D helpers


def test_source_target_round_trip_and_app_d_helpers(tmp_path):
  examples = [t.TaskExample("q1", ("a", "b")), t.TaskExample("q2", ("c",))]
  expanded = t.expand_answers(examples)
  assert [(ex.source, ex.targets) for ex in expanded] == [("q1", ("a",)), ("q1", ("b",)),
                                                          ("q2", ("c",))]
  assert [ex.targets for ex in t.first_answer(examples)] == [("a",), ("c",)]
  with pytest.raises(ValueError, match="exactly one"):
    t.write_source_target(examples, tmp_path, "train")
  assert t.write_source_target(expanded, tmp_path, "train") == 3
  assert qa.read_source_target(tmp_path, "train") == (["q1", "q1", "q2"], ["a", "b", "c"])
  back = t.read_source_target_task(tmp_path, "train")
  assert [(ex.source, ex.targets) for ex in back] == [("q1", ("a",)), ("q1", ("b",)),
                                                      ("q2", ("c",))]
  with pytest.raises(ValueError, match="spans lines"):
    t.write_source_target([t.TaskExample("a\nb", ("c",))], tmp_path, "val")


def test_source_target_malformed_names_line(tmp_path):
  (tmp_path / "val.source").write_text("q1\n\nq3\n")
  (tmp_path / "val.target").write_text("a\nb\nc\n")
  with pytest.raises(qa.QAFormatError, match=r"val.source:2: empty line"):
    t.read_source_target_task(tmp_path, "val")


# ---------------------------------------------------------------- TFDS (tiny local datasets)


def _prepare_tiny(name, config, data_dir, rows):
  """Prepares `rows` as the validation split of the registered builder `name` (its features,
  version and config) in data_dir as array_record, with a subclass that generates them."""
  import tensorflow_datasets as tfds

  base = tfds.builder_cls(name)

  class Tiny(base, skip_registration=True):
    code_path = None  # No checksums file to look up (its lookup needs importlib_resources).

    @classmethod
    def _get_pkg_dir_path(cls):
      return base._get_pkg_dir_path()

    def _split_generators(self, dl_manager):
      return {"validation": self._tiny_examples()}

    def _tiny_examples(self):
      yield from enumerate(rows)

  Tiny.name = name
  kwargs = {"config": config} if config else {}
  Tiny(data_dir=str(data_dir), file_format="array_record", **kwargs).download_and_prepare()


def _tqa_row(question, qid, value, aliases):
  return {"question": question, "question_id": qid, "question_source": "http://x",
          "entity_pages": [], "search_results": [],
          "answer": {"value": value, "aliases": aliases, "normalized_value": value.lower(),
                     "normalized_aliases": [a.lower() for a in aliases],
                     "matched_wiki_entity_name": "", "normalized_matched_wiki_entity_name": "",
                     "type": "WikipediaEntity"}}


def test_tfds_nq_open_and_trivia_qa(tmp_path):
  _prepare_tiny("natural_questions_open", None, tmp_path, [
      {"question": "who wrote hamlet", "answer": ["Shakespeare", "William Shakespeare"]},
      {"question": "capital of france", "answer": ["Paris"]}])
  nq = t.read_tfds_qa("natural_questions_open", "validation", data_dir=tmp_path)
  assert sorted((ex.source, ex.targets) for ex in nq) == [
      ("capital of france", ("Paris",)),
      ("who wrote hamlet", ("Shakespeare", "William Shakespeare"))]
  assert len(t.read_tfds_qa("natural_questions_open", "validation", tmp_path, limit=1)) == 1
  _prepare_tiny("trivia_qa", "unfiltered.nocontext", tmp_path, [
      _tqa_row("Which Lloyd Webber musical...?", "tc_33", "Starlight Express",
               ["Starlight Express", "Starlight Expres"])])
  tqa = t.read_tfds_qa("trivia_qa/unfiltered.nocontext", "validation", data_dir=tmp_path)
  assert tqa[0] == t.TaskExample("Which Lloyd Webber musical...?",
                                 ("Starlight Express", "Starlight Expres"), id="tc_33")
  assert t.first_answer(tqa)[0].targets == ("Starlight Express",)


def test_tfds_not_prepared_and_unavailable(tmp_path):
  with pytest.raises(t.TaskDataNotPrepared, match=r"tfds build natural_questions_open "
                     rf"--data_dir={tmp_path} --file_format=array_record"):
    t.read_tfds_qa("natural_questions_open", "validation", data_dir=tmp_path)
  with pytest.raises(ValueError, match="webq-"):
    t.read_tfds_qa("web_questions", "test", data_dir=tmp_path)
  with pytest.raises(ValueError, match="unknown TFDS QA task"):
    t.read_tfds_qa("squad", "train", data_dir=tmp_path)
