"""rag_jax.metrics against independent oracles: the SQuAD v1.1 evaluation rule re-derived here,
sacrebleu / rouge-score where they are the definition, and cases computed by hand."""

import math
import random
import re
import string
import unicodedata
from collections import Counter

import numpy as np
import pytest

from rag_jax import metrics as m
from rag_jax.evaluation import scoring
from rag_jax.evaluation.loop import EvalExample
from rag_jax.utils.errors import InputError

# ------------------------------------------------- SQuAD v1.1 oracle (evaluate-v1.1.py)


def _squad_normalize(s):
  s = s.lower()
  s = "".join(ch for ch in s if ch not in set(string.punctuation))
  s = re.sub(r"\b(a|an|the)\b", " ", s)
  return " ".join(s.split())


def _squad_f1(prediction, ground_truth):
  p, g = _squad_normalize(prediction).split(), _squad_normalize(ground_truth).split()
  same = sum((Counter(p) & Counter(g)).values())
  if same == 0:
    return 0
  precision, recall = same / len(p), same / len(g)
  return 2 * precision * recall / (precision + recall)


def _squad_scores(predictions, answers):
  em = [max(_squad_normalize(p) == _squad_normalize(g) for g in gold)
        for p, gold in zip(predictions, answers, strict=True)]
  f1 = [max(_squad_f1(p, g) for g in gold) for p, gold in zip(predictions, answers, strict=True)]
  return sum(em) / len(em), sum(f1) / len(f1)


def test_em_f1_match_squad_v11_on_random_strings():
  rng = random.Random(0)
  vocab = ["the", "The", "a", "an", "Paris", "paris,", "new", "York", "theatre", "U.S.", "—", "é",
           "  ", "1,000", "an-", "(the)", "Anne", "!?", "ok."]
  predictions, answers = [], []
  for _ in range(300):
    predictions.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 5))))
    answers.append([" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 4)))
                    for _ in range(rng.randint(1, 3))])
  em, f1 = _squad_scores(predictions, answers)
  assert m.exact_match(predictions, answers) == pytest.approx(em)
  assert m.token_f1(predictions, answers) == pytest.approx(f1)
  assert 0 < em < f1 < 1  # The sample exercises both outcomes.


@pytest.mark.parametrize("prediction, gold, em, f1", [
    ("The Eiffel Tower", ["eiffel tower"], 1.0, 1.0),       # article and case
    ("Eiffel Tower!", ["eiffel tower"], 1.0, 1.0),          # punctuation
    ("theatre", ["atre"], 0.0, 0.0),                        # \b keeps "the" inside a word
    ("Eiffel", ["eiffel tower"], 0.0, 2 * 1 * 0.5 / 1.5),   # P=1, R=1/2
    ("Eiffel", ["eiffel tower", "Eiffel"], 1.0, 1.0),       # a second gold answer
    ("a", ["the"], 1.0, 0.0),                               # both "": EM 1, v1.1 F1 0
    ("U.S.", ["US"], 1.0, 1.0),                             # dots dropped, not spaced
    ("new-york", ["new york"], 0.0, 0.0),                   # "-" dropped -> "newyork"
])
def test_em_f1_mutations(prediction, gold, em, f1):
  assert m.exact_match([prediction], [gold]) == em
  assert m.token_f1([prediction], [gold]) == pytest.approx(f1)


def test_em_rejects_empty_gold_and_length_mismatch():
  with pytest.raises(ValueError, match="no gold"):
    m.exact_match(["x"], [[]])
  with pytest.raises(ValueError, match="predictions"):
    m.token_f1(["x", "y"], [["x"]])


@pytest.mark.parametrize("call, name", [
    (lambda: m.exact_match(["o"], ["Obama"]), r"answers\[0\]"),  # 1.0 when read letter by letter
    (lambda: m.exact_match("o", [["Obama"]]), "predictions"),
    (lambda: m.token_f1(["o"], ["Obama"]), r"answers\[0\]"),
    (lambda: m.max_over_ground_truths(m.exact_match_score, "o", "Obama"), "ground_truths"),
    (lambda: m.regex_exact_match(["o"], ["Obama"]), r"patterns\[0\]"),
    (lambda: m.has_answer("Obama", "o is a letter"), "answers"),
    (lambda: m.answer_recall_at_k(["Paris"], [["in Paris"]], ks=[1]), r"answers\[0\]"),
    (lambda: m.answer_recall_at_k([["Paris"]], ["in Paris"], ks=[1]), r"passages\[0\]"),
    (lambda: m.id_recall_at_k([["1", "5"]], ["15"], ks=[1]), r"gold_ids\[0\]"),
    (lambda: m.id_recall_at_k(["15"], [["1"]], ks=[1]), r"retrieved_ids\[0\]"),
    (lambda: m.precision_at_k([["A"]], ["AB"], k=1), r"gold_titles\[0\]"),
    (lambda: m.precision_at_k(["AB"], [{"A"}], k=1), r"retrieved_titles\[0\]"),
    (lambda: m.bleu1(["the cat"], ["the cat"]), r"references\[0\]"),
    (lambda: m.rouge_l(["the cat"], ["the cat"]), r"references\[0\]"),
    (lambda: m.distinct_trigram_ratio("a b c d"), "generations"),
    (lambda: m.label_accuracy("S", ["S"]), "predictions"),
    (lambda: m.qbleu1("a", ["a"]), "hypotheses"),
    (lambda: m.qgen_bleu1(["a"], "a"), "references"),
    (lambda: scoring.answer_metrics([{"prediction": "o", "answers": "Obama", "doc_scores": [0.0]}],
                                    ["exact_match"]), "prediction record 0: answers"),
    (lambda: scoring.CORRECT["exact_match"]("o", EvalExample("q", "Obama")), r"answers\[0\]"),
    (lambda: scoring.CORRECT["regex_match"]("o", EvalExample("q", "Obama")), r"patterns\[0\]"),
    (lambda: scoring.CORRECT["label_accuracy"]("S", EvalExample("q", "SUPPORTS")), "answers"),
])
def test_metrics_refuse_a_str_where_a_list_is_expected(call, name):
  with pytest.raises(InputError, match=f"^{name} is a str"):
    call()


# ---------------------------------------------------------------- regex answers, DPR has_answer


def test_regex_exact_match_follows_drqa_pipeline_eval():
  # DrQA's scripts/pipeline/eval.py --regex: NFD on prediction and pattern, then
  # regex_match_score: regex.compile(pattern, IGNORECASE | UNICODE | MULTILINE).match(prediction).
  pattern = r"Long Island|New\s?York|Roosevelt Field"
  assert m.regex_exact_match(["I think New York"], [[pattern]]) == 0.0  # .match: from the start
  assert m.regex_exact_match(["New York City"], [[pattern]]) == 1.0     # no end anchor
  assert m.regex_exact_match(["newyork"], [[pattern]]) == 1.0           # IGNORECASE, \s?
  assert m.regex_exact_match(["anything"], [["(unclosed"]]) == 0.0      # no compile: no match
  assert m.regex_exact_match(["cafe\u0301 au lait"], [["caf\u00e9"]]) == 1.0  # both NFD
  unicode = "\u00dcn\u00efc\u00f6d\u00e9"  # "Ünïcödé", composed.
  assert m.regex_exact_match([unicode.lower()], [[unicode]]) == 1.0    # IGNORECASE after NFD
  # NFD turns "Ü" into "U" + U+0308, a mark and not \p{Ll}: the capitalized-word pattern stops
  # matching "Ünïcödé" (it matches "Unicode"). DPR's passage rule searches and finds "ni" (\p{Lu}
  # under IGNORECASE matches "n").
  capitalized = r"\p{Lu}\p{Ll}+"
  assert m.regex_exact_match([unicode], [[capitalized]]) == 0.0
  assert m.regex_exact_match(["Unicode"], [[capitalized]]) == 1.0
  assert m.has_answer([capitalized], unicode, match_type="regex")
  # The evaluation's CuratedTrec metric and per-question verdict use this rule.
  records = [{"prediction": p, "answers": [pattern], "doc_scores": [0.0]}
             for p in ("I think New York", "New York City")]
  assert scoring.answer_metrics(records, ["regex_match"])["regex_match"] == 0.5
  assert [scoring.CORRECT["regex_match"](r["prediction"], EvalExample("q", (pattern,)))
          for r in records] == [False, True]


def test_regex_match_dpr_semantics():
  pattern = r"Long Island|New\s?York|Roosevelt Field"
  assert m.regex_match("newyork", pattern)                     # IGNORECASE, \s?
  assert m.regex_match("I think New York", pattern)            # search: anywhere
  assert not m.regex_match("I think New York", pattern, anchored=True)  # DrQA .match
  assert m.regex_match("New York City", pattern, anchored=True)  # .match has no end anchor
  assert not m.regex_match("Boston", pattern)
  assert not m.regex_match("anything", r"(unclosed")           # compile error -> no match
  composed, decomposed = "caf\u00e9", "cafe\u0301"
  assert m.regex_match(decomposed, composed)                   # both NFD-normalized
  assert m.regex_exact_match(["new york", "Boston", "x"], [[pattern], [pattern], ["x", "y"]]) == \
      pytest.approx(2 / 3)


def test_has_answer_tokens_not_substrings():
  text = "President Barack Obama, born in Honolulu (Hawaii), ..."
  assert m.has_answer(["barack obama"], text)
  assert m.has_answer(["Hawaii"], text)           # "(" is its own token
  assert not m.has_answer(["Obam"], text)         # token match, not substring
  assert not m.has_answer(["Obama born"], text)   # "," lies between
  nfc = unicodedata.normalize("NFC", "Beyonc\u00e9")
  assert m.has_answer([nfc], unicodedata.normalize("NFD", "by Beyonc\u00e9 Knowles"))
  assert m.has_answer([""], "any passage")        # DPR: an empty answer matches everything
  assert m.has_answer([r"Bar\w+ Obama"], text, match_type="regex")


def test_answer_recall_at_k_by_hand():
  answers = [["Paris"], ["Lyon"], ["Nice"]]
  passages = [["in Paris", "x", "y"], ["x", "y", "Lyon is"], ["x", "y", "z"]]
  assert m.answer_recall_at_k(answers, passages, ks=[1, 2, 3, 20]) == \
      {1: 1 / 3, 2: 1 / 3, 3: 2 / 3, 20: 2 / 3}


def test_recall_from_hits_reads_each_row_up_to_its_first_hit():
  def row_then_fail(flags):
    yield from flags
    raise AssertionError("read past the first hit")
  hits = [row_then_fail([False, True]), [], row_then_fail([True]), [False, False, False]]
  assert m.recall_from_hits(hits, [1, 2, 3]) == {1: 1 / 4, 2: 2 / 4, 3: 2 / 4}


def test_id_recall_at_k_by_hand():
  retrieved = np.array([[3, 1, 2], [5, 6, 7], [9, 8, 4]])
  gold = [{1}, {0}, {4, 9}]
  assert m.id_recall_at_k(retrieved, gold, ks=[1, 2, 3]) == {1: 1 / 3, 2: 2 / 3, 3: 2 / 3}


def brute_force_recall(retrieved, gold, k, count):
  """recall@k read off the definition, one retrieved place at a time: "any" asks whether any of
  the first k places holds a gold id; "shared" counts the distinct ids of the first k gold
  neighbours that some place of the first k holds, over k. The padding id -1 is never gold."""
  per_row = []
  for row, g in zip(retrieved, gold, strict=True):
    row = [int(x) for x in row]
    if count == "any":
      per_row.append(any(x != -1 and x in [int(y) for y in g] for x in row[:k]))
    else:
      distinct = [y for i, y in enumerate(int(v) for v in g[:k]) if y not in g[:i]]
      per_row.append(sum(y != -1 and y in row[:k] for y in distinct) / k)
  return sum(per_row) / len(per_row)


@pytest.mark.parametrize("count", ["any", "shared"])
def test_id_recall_at_k_equals_a_brute_force_count(count):
  # Ragged rows, repeated ids, -1 padding on both sides, ids as numpy and Python ints.
  rng = np.random.default_rng(7)
  retrieved, gold = [], []
  for _ in range(200):
    row = rng.integers(-1, 12, rng.integers(0, 9)).tolist()
    retrieved.append(row if rng.random() < 0.5 else np.asarray(row))
    ids = rng.integers(-1, 12, 8 if count == "shared" else 3)
    gold.append(ids if count == "shared" else set(ids.tolist()))
  ks = [1, 2, 5, 8]
  got = m.id_recall_at_k(retrieved, gold, ks, count=count)
  for k in ks:
    assert got[k] == pytest.approx(brute_force_recall(retrieved, gold, k, count), abs=1e-12)


def test_id_recall_at_k_shared_ids_by_hand():
  found = np.array([[1, 2, 3, -1], [4, 5, 6, 7], [8, 9, 10, 11], [-1, -1, -1, -1]])
  truth = np.array([[3, 2, 1, 0], [7, 6, 5, 4], [0, 1, 2, 3], [-1, 5, 6, 7]])
  got = m.id_recall_at_k(found, truth, [2, 4], count="shared")
  assert got == {2: (1 + 0 + 0 + 0) / 8, 4: (3 + 4 + 0 + 0) / 16}  # -1 meets -1: no match
  # The question-answering recall of the same rows: any gold id among the top k.
  assert m.id_recall_at_k(found, truth, [1, 4]) == {1: 2 / 4, 4: 2 / 4}
  with pytest.raises(ValueError, match=r"gold_ids\[0\] has 4 ids"):
    m.id_recall_at_k(found, truth, [5], count="shared")
  with pytest.raises(ValueError, match="count must be"):
    m.id_recall_at_k(found, truth, [1], count="all")


def test_precision_at_k_eval_rag_hand_cases():
  retrieved = [["A", "A", "B", "C"], ["C", "D"], ["E"]]
  gold = [{"A", "C"}, {"C"}, {"F"}]
  # Top-3 titles {A, B} & {A, C} = 1 -> 1/3; {C, D} & {C} -> 1/3 (denominator k, not 2); 0.
  assert m.precision_at_k(retrieved, gold, k=3) == pytest.approx((1 / 3 + 1 / 3 + 0) / 3)
  assert m.precision_at_k(retrieved, gold, k=1) == pytest.approx((1 + 1 + 0) / 3)
  assert m.strip_title('"Hamlet"') == "Hamlet" and m.strip_title('A "b"') == 'A "b'


def test_doc_score_diagnostics_by_hand():
  got = m.doc_score_diagnostics(np.array([[0.0, math.log(3.0)], [7.0, 7.0]]))
  h1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
  assert got["doc_entropy"] == pytest.approx((h1 + math.log(2)) / 2)
  assert got["doc_entropy_normalized"] == pytest.approx((h1 / math.log(2) + 1) / 2)
  assert got["top_doc_prior"] == pytest.approx((0.75 + 0.5) / 2)
  collapsed = m.doc_score_diagnostics(np.array([[1000.0, 0.0, 0.0]]))
  assert collapsed["top_doc_prior"] == pytest.approx(1.0)
  assert collapsed["doc_entropy"] == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------- generation metrics


def test_bleu1_hand_case_clipping_and_brevity():
  # "the" x4 against one reference holding "the" twice: clipped precision 2/4; c=4 < r=6 so
  # BP = exp(1 - 6/4).
  assert m.bleu1(["the the the the"], [["the cat is on the mat"]]) == \
      pytest.approx(0.5 * math.exp(1 - 6 / 4))
  # Corpus level: counts summed before dividing (3+2 matches of 3+4 tokens, c=7 >= r=3+2).
  got = m.bleu1(["a b c", "d e f g"], [["a b c"], ["d e"]])
  assert got == pytest.approx(5 / 7)
  assert got != pytest.approx((1 + 0.5) / 2)  # not the mean of sentence scores


def _msmarco_normalize(text):
  """MS-MARCO's normalize_batch on plain text: lower-cased tokens, each punctuation mark one
  token, joined by spaces (exact for text without digits next to "." or "," or apostrophes)."""
  return " ".join(re.findall(r"\w+|[^\w\s]", text.lower()))


def test_bleu1_and_rouge_l_lower_case_and_split_punctuation_as_ms_marco_eval():
  # ms_marco_eval.py tokens: "the eiffel tower is 324 metres tall ." (8) against "the eiffel tower
  # is 324 m tall" (7): 6 unigrams match, c = 8 >= r = 7, so BLEU-1 = 6/8 (case-sensitive: 3/8).
  hyp, ref = ["The Eiffel Tower is 324 metres tall."], [["the eiffel tower is 324 m tall"]]
  assert m.bleu1(hyp, ref) == pytest.approx(6 / 8)
  assert m.bleu1(hyp, ref, lowercase=False) == pytest.approx(3 / 8)
  # ROUGE-L (coco-caption's Rouge, beta = 1.2): LCS = 6, P = 6/8, R = 6/7,
  # F = (1 + 1.44) P R / (R + 1.44 P) = 549/678.
  assert m.rouge_l(hyp, ref) == pytest.approx(549 / 678)
  assert m.msmarco_tokens(hyp[0]) == _msmarco_normalize(hyp[0]).split()


def test_rouge_l_takes_best_precision_and_best_recall_over_references():
  # "a b c d" vs "a b": P = 2/4, R = 1; vs "a b c d e f g h": P = 1, R = 4/8. The script keeps
  # P = 1 and R = 1 from different references: 1.0 (rouge-score's best reference F1: 2/3).
  assert m.rouge_l(["a b c d"], [["a b", "a b c d e f g h"]]) == pytest.approx(1.0)
  assert m.rouge_l(["x y"], [["a b"]]) == 0.0


def test_bleu1_matches_sacrebleu_on_normalized_text_and_differs_from_its_4gram_default():
  import sacrebleu

  hyps = ["The cat sat on the mat.", "A dog barked, loudly; at night!", "Hello"]
  refs = [["The cat is on the mat.", "There is a cat on the mat."],
          ["The dog barked at night"], ["hello world"]]
  norm_hyps = [_msmarco_normalize(h) for h in hyps]
  streams = [[_msmarco_normalize(r[0]) for r in refs], [_msmarco_normalize(refs[0][1]), None, None]]
  expected = sacrebleu.BLEU(max_ngram_order=1, smooth_method="none", tokenize="none").corpus_score(
      norm_hyps, streams).score / 100
  got = m.bleu1(hyps, refs)
  assert got == pytest.approx(expected)
  assert got != pytest.approx(sacrebleu.corpus_bleu(norm_hyps, streams).score / 100)


def _lcs(a, b):
  table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
  for i, x in enumerate(a):
    for j, y in enumerate(b):
      table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
  return table[-1][-1]


def _msmarco_rouge_l(hyp, refs, beta=1.2):
  """coco-caption's Rouge.calc_score on MS-MARCO-normalized text, re-derived here."""
  h = _msmarco_normalize(hyp).split()
  p = max(_lcs(h, _msmarco_normalize(r).split()) / len(h) for r in refs)
  rec = max(_lcs(h, _msmarco_normalize(r).split()) / len(_msmarco_normalize(r).split())
            for r in refs)
  return (1 + beta**2) * p * rec / (rec + beta**2 * p) if p and rec else 0.0


def test_rouge_l_hand_lcs_and_rouge_score():
  from rouge_score import rouge_scorer

  # LCS("the cat sat on mat", "the cat was on the mat") = "the cat on mat": P=4/5, R=4/6.
  p, r = 4 / 5, 4 / 6
  assert m.rouge_l(["the cat sat on mat"], [["the cat was on the mat"]]) == \
      pytest.approx(2.44 * p * r / (r + 1.44 * p))
  rng = random.Random(1)
  words = ["the", "cat", "Mat", "on", "sat", "dog", "a", "ear,", "middle", "."]
  hyps = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 9))) for _ in range(50)]
  refs = [[" ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))
           for _ in range(rng.randint(1, 3))] for _ in range(50)]
  expected = np.mean([_msmarco_rouge_l(h, rs) for h, rs in zip(hyps, refs, strict=True)])
  assert m.rouge_l(hyps, refs) == pytest.approx(expected)
  # rouge-score on text without punctuation (its tokenizer drops it): per-reference P and R, the
  # best of each, F with beta = 1.2; beta = 1 with one reference is its own F-measure.
  scorer = rouge_scorer.RougeScorer(["rougeL"])
  plain = [w for w in words if w.isalpha()]
  for _ in range(30):
    hyp = " ".join(rng.choice(plain) for _ in range(rng.randint(1, 9)))
    rs = [" ".join(rng.choice(plain) for _ in range(rng.randint(1, 9)))
          for _ in range(rng.randint(1, 3))]
    scores = [scorer.score(ref, hyp)["rougeL"] for ref in rs]
    p, r = max(x.precision for x in scores), max(x.recall for x in scores)
    assert m.rouge_l([hyp], [rs]) == pytest.approx(2.44 * p * r / (r + 1.44 * p) if p else 0.0)
    assert m.rouge_l([hyp], [rs[:1]], beta=1.0) == pytest.approx(scores[0].fmeasure)


def test_distinct_trigram_ratio_by_hand():
  # Tri-grams: abc bca cab abc | abc -> 3 distinct of 5; "x y" has none.
  assert m.distinct_trigram_ratio(["a b c a b c", "a b c", "x y"]) == pytest.approx(3 / 5)
  assert math.isnan(m.distinct_trigram_ratio(["x y"]))


def test_label_accuracy():
  assert m.label_accuracy(["SUPPORTS", " REFUTES", "NOT ENOUGH INFO"],
                          ["SUPPORTS", "SUPPORTS", "NOT ENOUGH INFO"]) == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="label set"):
    m.label_accuracy(["SUPPORTS"], ["NOT ENOUGH INFO"], label_set={"SUPPORTS", "REFUTES"})
  assert m.label_accuracy(["maybe"], ["REFUTES"], label_set={"SUPPORTS", "REFUTES"}) == 0.0


# ---------------------------------------------------------------- Q-BLEU-1 by hand


def test_qbleu1_hand_case_entities_differ():
  # hyp/ref "Who wrote Hamlet" / "Who wrote Macbeth":
  # ner {hamlet} vs {macbeth} -> 0; qt {who} vs {who} -> 1; relevant {wrote} vs {wrote} -> 1;
  # stop words: none on either side -> 0; BLEU-1 = 2/3 (no brevity penalty).
  answerability = 0.6 * 0 + 0.2 * 1 + 0.1 * 1 + 0.1 * 0
  assert m.qbleu1(["Who wrote Hamlet"], ["Who wrote Macbeth"]) == \
      pytest.approx(0.7 * answerability + 0.3 * (2 / 3))
  # The same question with the right entity gains the full NER weight.
  assert m.qbleu1(["Who wrote Hamlet"], ["Who wrote Hamlet"]) == \
      pytest.approx(0.7 * (0.6 + 0.2 + 0.1 + 0.0) + 0.3 * 1)


def test_qbleu1_hand_case_brevity_and_stop_words():
  hyp, ref = "What year did the war end ?", "What year did the Korean War end ?"
  # ner: {} vs {korean, war} -> 0.  qt: {what, year} both -> 1.  stop words {did, the} both -> 1.
  # relevant: hyp {war, end} vs ref {end}: P = 1/2; R = 1/1 * exp(1 - 2/1); F = 2PR/(P+R).
  p, r = 0.5, math.exp(1 - 2)
  f_re = 2 * p * r / (p + r)
  # BLEU-1: 6 hyp tokens all in the 7-token reference ("?" dropped): BP = exp(1 - 7/6).
  fluency = math.exp(1 - 7 / 6)
  answerability = 0.6 * 0 + 0.2 * 1 + 0.1 * f_re + 0.1 * 1
  assert m.qbleu1([hyp], [ref]) == pytest.approx(0.7 * answerability + 0.3 * fluency)
  parts = m.answerability_components(hyp, ref)
  assert parts == pytest.approx({"ner": 0, "qt": 1, "re": f_re, "sw": 1, "bleu1": fluency})


def test_qbleu1_entity_tagger_and_weights():
  def tagger(tokens):
    return [t for t in tokens if t.lower() in {"hamlet", "macbeth"}]

  # A tagger that finds the lowercase entity: ner {hamlet} vs {hamlet} -> 1.
  got = m.answerability_components("who wrote hamlet", "Who wrote hamlet", entity_tagger=tagger)
  assert got["ner"] == 1.0
  assert m.answerability_components("who wrote hamlet", "Who wrote hamlet")["ner"] == 0.0
  # delta = 0 leaves plain sentence BLEU-1.
  assert m.qbleu1(["a b c d"], ["a b x"], delta=0.0) == pytest.approx(2 / 4)


def test_qgen_bleu1_is_the_q_bleu_scripts_mean_sentence_bleu1():
  # Lower-cased tokens, punctuation dropped: [who, wrote, hamlet] vs [who, wrote, macbeth] = 2/3;
  # [who, wrote] vs [who, wrote, hamlet]: P = 1, BP = exp(1 - 3/2). The mean of the two, not the
  # corpus score (3 + 2 matches of 3 + 2 tokens against 3 + 3: 5/5 x exp(1 - 6/5)).
  got = m.qgen_bleu1(["Who wrote Hamlet?", "who wrote"], ["who wrote Macbeth", "Who wrote Hamlet?"])
  assert got == pytest.approx((2 / 3 + math.exp(1 - 3 / 2)) / 2)
  records = [{"prediction": "Who wrote Hamlet?", "answers": ["who wrote macbeth"],
              "doc_scores": [0.0]}]
  assert scoring.answer_metrics(records, ["qgen_bleu1"])["qgen_bleu1"] == pytest.approx(2 / 3)
