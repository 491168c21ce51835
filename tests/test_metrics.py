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


# ---------------------------------------------------------------- regex answers, DPR has_answer


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


def test_id_recall_at_k_by_hand():
  retrieved = np.array([[3, 1, 2], [5, 6, 7], [9, 8, 4]])
  gold = [{1}, {0}, {4, 9}]
  assert m.id_recall_at_k(retrieved, gold, ks=[1, 2, 3]) == {1: 1 / 3, 2: 2 / 3, 3: 2 / 3}


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


def test_bleu1_matches_sacrebleu_and_differs_from_its_4gram_default():
  import sacrebleu

  hyps = ["The cat sat on the mat.", "A dog barked loudly at night", "hello"]
  refs = [["The cat is on the mat.", "There is a cat on the mat."],
          ["The dog barked at night"], ["hello world"]]
  streams = [[r[0] for r in refs], [refs[0][1], None, None]]
  expected = sacrebleu.BLEU(max_ngram_order=1, smooth_method="none").corpus_score(
      hyps, streams).score / 100
  got = m.bleu1(hyps, refs)
  assert got == pytest.approx(expected)
  assert got != pytest.approx(sacrebleu.corpus_bleu(hyps, streams).score / 100)
  assert m.bleu1(["THE CAT"], [["the cat"]], lowercase=True) == pytest.approx(1.0)
  assert m.bleu1(["THE CAT"], [["the cat"]]) == 0.0


def _lcs(a, b):
  table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
  for i, x in enumerate(a):
    for j, y in enumerate(b):
      table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
  return table[-1][-1]


def _rouge_l_f(hyp, ref):
  h, r = re.findall(r"[a-z0-9]+", hyp.lower()), re.findall(r"[a-z0-9]+", ref.lower())
  lcs = _lcs(h, r)
  if lcs == 0:
    return 0.0
  p, rec = lcs / len(h), lcs / len(r)
  return 2 * p * rec / (p + rec)


def test_rouge_l_hand_lcs_and_rouge_score():
  from rouge_score import rouge_scorer

  # LCS("the cat sat on mat", "the cat was on the mat") = "the cat on mat": P=4/5, R=4/6.
  assert m.rouge_l(["the cat sat on mat"], [["the cat was on the mat"]]) == \
      pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
  rng = random.Random(1)
  words = ["the", "cat", "Mat", "on", "sat", "dog", "a", "ear,", "middle"]
  hyps = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 9))) for _ in range(50)]
  refs = [[" ".join(rng.choice(words) for _ in range(rng.randint(1, 9)))
           for _ in range(rng.randint(1, 3))] for _ in range(50)]
  expected = np.mean([max(_rouge_l_f(h, r) for r in rs) for h, rs in zip(hyps, refs, strict=True)])
  assert m.rouge_l(hyps, refs) == pytest.approx(expected)
  scorer = rouge_scorer.RougeScorer(["rougeL"])
  assert m.rouge_l(hyps[:1], [refs[0][:1]]) == \
      pytest.approx(scorer.score(refs[0][0], hyps[0])["rougeL"].fmeasure)


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
