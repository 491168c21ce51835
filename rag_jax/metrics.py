"""Evaluation metrics of the RAG paper (Lewis et al., 2020, §3, Table 2) and retrieval diagnostics.

Pure Python / numpy (no jax, no model code), so evaluation can run anywhere the predictions are.
Every score is a fraction in [0, 1] (the paper's tables print 100 x these).

  open-domain QA     exact_match, token_f1 (SQuAD v1.1 normalization, max over gold answers)
  CuratedTrec        regex_exact_match (DrQA's regex rule for answers), regex_match
  MS-MARCO           bleu1, rouge_l (as MS-MARCO's ms_marco_eval.py: lower-cased tokens with
                     punctuation split off; corpus BLEU-1 by sacrebleu, ROUGE-L by rouge-score)
  Jeopardy QGen      qgen_bleu1, qbleu1 (the Q-BLEU script of Nema & Khapra 2018: BLEU-1 and
                     answerability-weighted BLEU-1)
  FEVER              label_accuracy
  diversity          distinct_trigram_ratio (paper §4.5, Table 5)
  retrieval          answer_recall_at_k (DPR's has_answer), id_recall_at_k, recall_from_hits,
                     precision_at_k
                     (transformers' eval_rag.py), doc_score_diagnostics (retrieval collapse)

docs/evaluation.md lists each metric's definition, its oracle test and the differences from the
paper's scripts that remain. A str where a list is expected (answers, references, passages,
predictions) raises InputError: iterated, it would score letter by letter.
"""

from __future__ import annotations

import functools
import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence

import numpy as np
import regex

from rag_jax.utils.errors import InputError

# ------------------------------------------------------------------------------------------------
# Exact match and token F1 (SQuAD v1.1; transformers' examples/research_projects/rag/utils_rag.py).

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
  """SQuAD v1.1 normalization: lowercase, drop string.punctuation, articles -> " ", squash spaces.

  The order (lower, punctuation, articles, whitespace) is the official script's and
  transformers' utils_rag.py `normalize_answer`; "the" inside a word ("theatre") is kept by \\b.
  """
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
  """1.0 when the normalized strings are equal, else 0.0."""
  return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
  """Token-multiset F1 of the normalized strings; 0.0 without a common token (SQuAD v1.1).

  As in v1.1 (not v2.0), an empty normalized prediction or gold scores 0, even against each other.
  """
  pred_tokens = normalize_answer(prediction).split()
  gold_tokens = normalize_answer(ground_truth).split()
  common = Counter(pred_tokens) & Counter(gold_tokens)
  num_same = sum(common.values())
  if num_same == 0:
    return 0.0
  precision = num_same / len(pred_tokens)
  recall = num_same / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def _refuse_str(value: object, name: str, expected: str) -> None:
  """InputError when `value` is a str (or bytes) where a list is expected: iterated, a str gives
  its letters, so exact_match("o", "Obama") would score the letter "o" against ["O", "b", ...]."""
  if isinstance(value, str | bytes):
    raise InputError(f"{name} is a str ({value[:40]!r}) where {expected} is expected; wrap it in "
                     f"a list: [{value[:40]!r}]")


def max_over_ground_truths(metric_fn: Callable[[str, str], float], prediction: str,
                           ground_truths: Sequence[str]) -> float:
  """max_g metric_fn(prediction, g); a question without gold answers is an error."""
  _refuse_str(ground_truths, "ground_truths", "a list of gold answers")
  if not ground_truths:
    raise ValueError("a question has no gold answers")
  return max(metric_fn(prediction, g) for g in ground_truths)


def _check_lengths(predictions: Sequence, references: Sequence, what: str,
                   names: tuple[str, str] = ("predictions", "answers"),
                   nested: bool = True) -> None:
  """Equal non-zero lengths, and no str where a list is expected: `names` are the two arguments'
  names for the message, and with `nested` each entry of the second must be a list too."""
  _refuse_str(predictions, names[0], "a list with one entry per question")
  _refuse_str(references, names[1], "a list with one entry per question")
  if len(predictions) != len(references):
    raise ValueError(f"{len(predictions)} predictions but {len(references)} {what}")
  if len(predictions) == 0:
    raise ValueError("no predictions to score")
  if nested:
    for i, reference in enumerate(references):
      _refuse_str(reference, f"{names[1]}[{i}]", "a list")


def exact_match(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
  """Mean over questions of max-over-gold exact match. predictions [N]; answers [N][n_gold_i]."""
  _check_lengths(predictions, answers, "answer lists")
  return float(np.mean([max_over_ground_truths(exact_match_score, p, a)
                        for p, a in zip(predictions, answers, strict=True)]))


def token_f1(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
  """Mean over questions of max-over-gold token F1. predictions [N]; answers [N][n_gold_i]."""
  _check_lengths(predictions, answers, "answer lists")
  return float(np.mean([max_over_ground_truths(f1_score, p, a)
                        for p, a in zip(predictions, answers, strict=True)]))


# ------------------------------------------------------------------------------------------------
# Regex answers (CuratedTrec) and DPR's answer-in-passage rule.


def _nfd(text: str) -> str:
  return unicodedata.normalize("NFD", text)


def regex_match(text: str, pattern: str, anchored: bool = False) -> bool:
  """Whether `pattern` (a CuratedTrec gold regex) matches `text`, as DPR's and DrQA's scripts
  decide it.

  Both scripts NFD-normalize the text and the pattern first (DPR's has_answer calls `_normalize`
  on both; DrQA's scripts/pipeline/eval.py runs drqa.retriever.utils.normalize on predictions and
  answers before regex_match_score), compile the pattern with the `regex` module and the flags
  IGNORECASE | UNICODE | MULTILINE, and count a pattern that fails to compile as no match.
  anchored=False: `.search`, DPR's regex_match (dpr/data/qa_validation.py): the pattern may occur
  anywhere, as DPR asks of a passage. anchored=True: `.match`, DrQA's regex_match_score
  (drqa/reader/utils.py): a predicted answer must match from its start (there is no end anchor).
  """
  try:
    flags = regex.IGNORECASE | regex.UNICODE | regex.MULTILINE
    compiled = regex.compile(_nfd(pattern), flags=flags)
  except Exception:  # Both scripts: `except BaseException: return False`.
    return False
  text = _nfd(text)
  found = compiled.match(text) if anchored else compiled.search(text)
  return found is not None


def regex_exact_match(predictions: Sequence[str], patterns: Sequence[Sequence[str]],
                      anchored: bool = True) -> float:
  """CuratedTrec accuracy: fraction of predictions matched by any of their gold regexes.

  predictions [N]; patterns [N][n_gold_i]. The default is DrQA's scripts/pipeline/eval.py
  --regex, the public script that scores predicted answers against CuratedTrec's regexes: NFD,
  then regex_match_score (`.match`, anchored at the start). anchored=False searches anywhere, as
  DPR's passage rule does (see regex_match).
  """
  _check_lengths(predictions, patterns, "pattern lists", ("predictions", "patterns"))
  return float(np.mean([any(regex_match(p, g, anchored) for g in gold)
                        for p, gold in zip(predictions, patterns, strict=True)]))


class SimpleTokenizer:
  """DPR's (and DrQA's) SimpleTokenizer: runs of letters/digits/marks, or any other visible char.

  The pattern `([\\p{L}\\p{N}\\p{M}]+)|([^\\p{Z}\\p{C}])` with IGNORECASE | UNICODE | MULTILINE is
  the one in DPR's dpr/utils/tokenizers.py; `words(text, uncased=True)` returns the token texts
  lowercased, as `Tokens.words(uncased=True)` does. Only the words are kept (no spans).
  """

  _PATTERN = regex.compile(r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])",
                           flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)

  def words(self, text: str, uncased: bool = True) -> list[str]:
    tokens = [m.group() for m in self._PATTERN.finditer(text)]
    return [t.lower() for t in tokens] if uncased else tokens


_SIMPLE_TOKENIZER = SimpleTokenizer()


def has_answer(answers: Sequence[str], text: str, match_type: str = "string") -> bool:
  """DPR's `has_answer`: does `text` (one passage) contain any of `answers`?

  match_type="string": the passage and each answer are NFD-normalized, tokenized by
  SimpleTokenizer, lowercased, and the answer's token list must occur as a contiguous sublist of
  the passage's. As in DPR, an answer with no tokens (e.g. "" or only spaces) matches every
  passage. match_type="regex": regex_match(text, answer) (search, not anchored).
  """
  _refuse_str(answers, "answers", "a list of gold answers")
  text = _nfd(text)
  if match_type == "string":
    words = _SIMPLE_TOKENIZER.words(text)
    for answer in answers:
      target = _SIMPLE_TOKENIZER.words(_nfd(answer))
      for i in range(len(words) - len(target) + 1):
        if words[i:i + len(target)] == target:
          return True
    return False
  if match_type == "regex":
    return any(regex_match(text, answer) for answer in answers)
  raise ValueError(f"match_type must be 'string' or 'regex', got {match_type!r}")


def answer_recall_at_k(answers: Sequence[Sequence[str]], passages: Sequence[Sequence[str]],
                       ks: Iterable[int], match_type: str = "string") -> dict[int, float]:
  """DPR's top-k retrieval accuracy: fraction of questions with an answer in a top-k passage.

  answers [N][n_gold_i]; passages [N][n_retrieved] passage texts in rank order (DPR matches the
  text only; prepend the title to match it too). A question with fewer than k passages uses the
  ones it has. Returns {k: recall}; this is DPR's `top_k_hits[k - 1] / N` (DPR Table 2).
  """
  _check_lengths(answers, passages, "passage lists", ("answers", "passages"))
  for i, gold in enumerate(answers):
    _refuse_str(gold, f"answers[{i}]", "a list of gold answers")
  return recall_from_hits((map(functools.partial(has_answer, gold, match_type=match_type), texts)
                           for gold, texts in zip(answers, passages, strict=True)), ks)


def recall_from_hits(hits: Iterable[Iterable[bool]], ks: Iterable[int]) -> dict[int, float]:
  """{k: the fraction of questions with a hit among their first k places}.

  hits [N][n_places]: each question's per-place flags in rank order, read up to the first True
  (they may be lazy); a question with fewer than k places uses the ones it has.
  """
  ks = list(ks)
  if any(k <= 0 for k in ks):
    raise ValueError(f"every k must be positive, got {ks}")
  first = [next((i for i, hit in enumerate(row) if hit), math.inf) for row in hits]
  if not first:
    raise ValueError("no questions to score")
  return {k: sum(f < k for f in first) / len(first) for k in ks}


def id_recall_at_k(retrieved_ids: Sequence[Sequence[object]] | np.ndarray,
                   gold_ids: Sequence[Collection[object]] | np.ndarray, ks: Iterable[int],
                   count: str = "any", pad: object = -1) -> dict[int, float]:
  """Recall@k of retrieved ids against gold ids, {k: recall} for each k in ks.

  retrieved_ids [N, n_retrieved] in rank order (rows may be ragged); gold_ids [N] collections.
  count="any": the fraction of questions with any gold id among the top k retrieved (the
    question-answering recall; a question may have several gold passages, in any order).
  count="shared": mean over queries of |top k retrieved & first k gold| / k, the ANN-benchmarks
    recall@k of a search against the exact neighbours gold_ids [N, >= k] in rank order.
  Ids compare as sets (a repeated id counts once); the id `pad` (a search's filler when it
  returns fewer than k rows) never matches, and a row shorter than k counts its missing places
  as misses.
  """
  if count not in ("any", "shared"):
    raise ValueError(f"count must be 'any' or 'shared', got {count!r}")
  _check_lengths(retrieved_ids, gold_ids, "gold id sets", ("retrieved_ids", "gold_ids"))
  for i, row in enumerate(retrieved_ids):
    _refuse_str(row, f"retrieved_ids[{i}]", "a list of ids")
  ids = [(np.asarray(row).tolist(), np.asarray(list(gold)).tolist())
         for row, gold in zip(retrieved_ids, gold_ids, strict=True)]
  if count == "any":
    return recall_from_hits((map((set(gold) - {pad}).__contains__, row) for row, gold in ids), ks)
  ks = list(ks)
  if any(k <= 0 for k in ks):
    raise ValueError(f"every k must be positive, got {ks}")
  hits = dict.fromkeys(ks, 0)
  for i, (row, gold) in enumerate(ids):
    for k in ks:
      if len(gold) < k:
        raise ValueError(f"gold_ids[{i}] has {len(gold)} ids; recall@{k} of shared ids needs k")
      hits[k] += len((set(row[:k]) & set(gold[:k])) - {pad})
  return {k: hits[k] / (len(ids) * k) for k in ks}


def strip_title(title: str) -> str:
  """One leading and one trailing double quote removed (eval_rag.py's `strip_title`)."""
  if title.startswith('"'):
    title = title[1:]
  if title.endswith('"'):
    title = title[:-1]
  return title


def precision_at_k(retrieved_titles: Sequence[Sequence[str]],
                   gold_titles: Sequence[Collection[str]], k: int) -> float:
  """transformers' eval_rag.py `get_precision_at_k`: mean of |set(top-k titles) & gold| / k.

  retrieved_titles [N][n_retrieved] in rank order (pass them through strip_title as
  evaluate_batch_retrieval does); gold_titles [N]. As in eval_rag.py the top-k titles form a set,
  so two passages of one article count once, and the denominator is always k.
  """
  if k <= 0:
    raise ValueError(f"k must be positive, got {k}")
  _check_lengths(retrieved_titles, gold_titles, "gold title sets",
                 ("retrieved_titles", "gold_titles"))
  for i, titles in enumerate(retrieved_titles):
    _refuse_str(titles, f"retrieved_titles[{i}]", "a list of titles")
  return float(np.mean([len(set(r[:k]) & set(g)) / k
                        for r, g in zip(retrieved_titles, gold_titles, strict=True)]))


def doc_score_diagnostics(doc_scores: np.ndarray) -> dict[str, float]:
  """Retrieval-collapse diagnostics of retriever scores doc_scores [N, n_docs].

  Per question, p = softmax(doc_scores) (the RAG document prior p(z|x) over the retrieved docs);
  returns the means over questions of its entropy (nats), entropy / log(n_docs) (1 = uniform),
  and top_doc_prior = max p. A prior collapsing onto one document (top_doc_prior -> 1,
  entropy -> 0) for every question is the failure transformers users report after fine-tuning.
  """
  scores = np.asarray(doc_scores, dtype=np.float64)
  if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape[1] == 0:
    raise ValueError(f"doc_scores must be [N, n_docs] with N, n_docs > 0, got {scores.shape}")
  shifted = scores - scores.max(axis=1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  p = np.exp(log_p)
  entropy = -(p * log_p).sum(axis=1)
  n_docs = scores.shape[1]
  normalized = entropy / math.log(n_docs) if n_docs > 1 else np.zeros_like(entropy)
  return {"doc_entropy": float(entropy.mean()),
          "doc_entropy_normalized": float(normalized.mean()),
          "top_doc_prior": float(p.max(axis=1).mean())}


# ------------------------------------------------------------------------------------------------
# Generation metrics.


def _transpose_references(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
  """[N][n_refs_i] -> sacrebleu's reference streams [max_refs][N], padded with None."""
  width = max(len(r) for r in references)
  if min(len(r) for r in references) == 0:
    raise ValueError("a hypothesis has no reference")
  return [[r[j] if j < len(r) else None for r in references] for j in range(width)]


def msmarco_tokens(text: str) -> list[str]:
  """MS-MARCO's evaluation tokens of `text`: lower-cased, punctuation split off and kept.

  ms_marco_eval.py (`normalize_batch`) lower-cases the tokens of spaCy's English tokenizer and
  keeps punctuation tokens; sacrebleu's 13a tokenizer (mteval-v13a) stands in for spaCy here (see
  docs/evaluation.md for where the two split differently).
  """
  from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a  # deferred, as in bleu1

  return Tokenizer13a()(text.lower()).split()


def bleu1(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
          lowercase: bool = True) -> float:
  """Corpus-level BLEU-1 as MS-MARCO's ms_marco_eval.py computes it, in [0, 1].

  hypotheses [N]; references [N][n_refs_i] (any number of references per hypothesis). The
  script lower-cases and tokenizes both sides (msmarco_tokens: punctuation tokens kept) and runs
  coco-caption's corpus BLEU: clipped unigram matches and lengths summed over the corpus before
  dividing, brevity penalty exp(1 - r/c) when the total length c is under r, the sum of each
  hypothesis's closest reference length. Here sacrebleu computes it (max_ngram_order=1,
  smooth_method="none", tokenizer "13a", lowercase); sacrebleu's own default is 4-gram BLEU with
  exponential smoothing. lowercase=False keeps case (not the script's rule).
  """
  from sacrebleu.metrics import BLEU  # deferred: only the generation metrics need it

  _check_lengths(hypotheses, references, "reference lists", ("hypotheses", "references"))
  metric = BLEU(max_ngram_order=1, smooth_method="none", lowercase=lowercase, tokenize="13a")
  return metric.corpus_score(list(hypotheses), _transpose_references(references)).score / 100.0


class _MsMarcoTokenizer:
  """msmarco_tokens as a rouge-score tokenizer (its `tokenize` interface)."""

  def tokenize(self, text: str) -> list[str]:
    return msmarco_tokens(text)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
            beta: float = 1.2) -> float:
  """ROUGE-L as MS-MARCO's ms_marco_eval.py computes it (coco-caption's Rouge), averaged.

  hypotheses [N]; references [N][n_refs_i]. Both sides are msmarco_tokens (lower-cased,
  punctuation kept). For each reference, P = LCS/|hypothesis| and R = LCS/|reference| (the LCS
  from rouge-score); the script then takes the largest P and the largest R over the references,
  possibly from different ones, and scores F = (1 + beta^2) P R / (R + beta^2 P) with beta = 1.2
  (0 when P or R is 0). The result is the mean over hypotheses. beta=1 gives the F1 that
  rouge-score reports, still with the script's tokens and combination of references.
  """
  from rouge_score import rouge_scorer  # deferred: only the generation metrics need it

  _check_lengths(hypotheses, references, "reference lists", ("hypotheses", "references"))
  scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_MsMarcoTokenizer())
  scores = []
  for hyp, refs in zip(hypotheses, references, strict=True):
    if not refs:
      raise ValueError("a hypothesis has no reference")
    per_ref = [scorer.score(ref, hyp)["rougeL"] for ref in refs]
    p, r = max(s.precision for s in per_ref), max(s.recall for s in per_ref)
    scores.append((1 + beta**2) * p * r / (r + beta**2 * p) if p > 0 and r > 0 else 0.0)
  return float(np.mean(scores))


def distinct_trigram_ratio(generations: Sequence[str],
                           tokenize: Callable[[str], list[str]] = str.split) -> float:
  """Distinct tri-grams / total tri-grams over all generations together (paper §4.5, Table 5).

  Tri-grams never span two generations. Tokens are whitespace-split by default (the paper does
  not say how it tokenized). NaN when no generation has three tokens.
  """
  _refuse_str(generations, "generations", "a list of generated texts")
  grams: list[tuple[str, ...]] = []
  for text in generations:
    tokens = tokenize(text)
    grams.extend(tuple(tokens[i:i + 3]) for i in range(len(tokens) - 2))
  return len(set(grams)) / len(grams) if grams else float("nan")


def label_accuracy(predictions: Sequence[str], labels: Sequence[str],
                   label_set: Collection[str] | None = None) -> float:
  """Fraction of predictions equal (after strip()) to their gold label (FEVER's label accuracy).

  label_set: when given (FEVER 3-way: supports/refutes/not-enough-info targets; 2-way: the first
  two), a gold label outside it is an error; a prediction outside it simply counts as wrong.
  """
  _check_lengths(predictions, labels, "labels", ("predictions", "labels"), nested=False)
  if label_set is not None:
    bad = sorted({g for g in labels if g.strip() not in label_set})
    if bad:
      raise ValueError(f"gold labels {bad} are not in the label set {sorted(label_set)}")
  return float(np.mean([p.strip() == g.strip()
                        for p, g in zip(predictions, labels, strict=True)]))


# ------------------------------------------------------------------------------------------------
# Q-BLEU-1 (Nema & Khapra, EMNLP 2018, "Towards a Better Metric for Evaluating Question
# Generation Systems"; the rule of PrekshaNema25/Answerability-Metric answerability_score.py).

QUESTION_WORDS = frozenset({"what", "which", "why", "who", "whom", "whose", "where", "when", "how"})
STOP_WORDS = frozenset("""
did have ourselves hers between yourself but again there about once during out very having with
they own an be some for do its yours such into of most itself other off is s am or as from him each
the themselves until below are we these your his through don nor me were her more himself this down
should our their while above both up to ours had she all no at any before them same and been in will
on does yourselves then that because over so can not now under he you herself has just too only
myself those i after few t being if theirs my against a by doing it further was here than
""".split())
_PTB_PUNCTUATION = frozenset("''  ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;".split())


def capitalized_entities(tokens: Sequence[str]) -> list[str]:
  """Default entity tagger: the capitalized tokens, after dropping a leading question word.

  This is the Answerability-Metric reference's own NER rule (`NER_line`), not a trained tagger.
  """
  if tokens and tokens[0].lower() in QUESTION_WORDS:
    tokens = tokens[1:]
  return [t for t in tokens if t[:1].isupper()]


def _question_type_words(tokens: Sequence[str]) -> list[str]:
  """Question words (either case), each "what"/"which" with the word after it (`questiontype`)."""
  out = []
  for i, t in enumerate(tokens):
    if t.lower() in QUESTION_WORDS and (t.islower() or t == t.capitalize()):
      out.append(t)
      if t.lower() in ("what", "which") and i + 1 < len(tokens):
        out.append(tokens[i + 1])
  return out


def _relevant_words(tokens: Sequence[str]) -> list[str]:
  """Content words: not question-type words, not capitalized, not stop words."""
  qt = set(_question_type_words(tokens))
  return [t for t in tokens if t not in qt and not t[:1].isupper() and t not in STOP_WORDS]


def _ptb_like(words: Iterable[str]) -> list[str]:
  """Lowercased tokens with punctuation split off and dropped (approximates the Stanford PTB
  tokenizer + punctuation filter of coco-caption that the reference runs through Java)."""
  out = []
  for w in words:
    for t in re.findall(r"\w+(?:'\w+)?|[^\w\s]+", w.lower()):
      if t not in _PTB_PUNCTUATION and not all(c in _PUNCTUATION for c in t):
        out.append(t)
  return out


def sentence_bleu1(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
  """Sentence BLEU-1 of token lists: clipped unigram precision x brevity penalty.

  The brevity penalty exp(1 - r/c) applies when c = len(hypothesis) < r = len(reference). Empty
  hypothesis or reference -> 0 (coco-caption's smoothing constants give ~1e-6 there).
  """
  if not hypothesis or not reference:
    return 0.0
  ref_counts = Counter(reference)
  clipped = sum(min(c, ref_counts[w]) for w, c in Counter(hypothesis).items())
  precision = clipped / len(hypothesis)
  c, r = len(hypothesis), len(reference)
  return precision * (math.exp(1 - r / c) if c < r else 1.0)


def _bleu1_f(a: Sequence[str], b: Sequence[str]) -> float:
  """Harmonic mean of BLEU-1(a vs b) and BLEU-1(b vs a); 0 when both are 0."""
  p, r = sentence_bleu1(a, b), sentence_bleu1(b, a)
  return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def answerability_components(
    hypothesis: str, reference: str,
    entity_tagger: Callable[[Sequence[str]], Sequence[str]] = capitalized_entities,
) -> dict[str, float]:
  """The four answerability F-scores and the fluency BLEU-1 of one generated question.

  Both questions are whitespace-split and, for each component, the component's words are taken
  from each (ner: entity_tagger; qt: question words; re: relevant content words; sw: stop words,
  lowercased), PTB-like tokenized, and compared by the harmonic mean of BLEU-1 in both
  directions. "bleu1" is sentence BLEU-1 of the whole (tokenized) hypothesis vs the reference.
  """
  hyp, ref = hypothesis.split(), reference.split()
  parts = {
      "ner": lambda t: list(entity_tagger(t)),
      "qt": _question_type_words,
      "re": _relevant_words,
      "sw": lambda t: [w.lower() for w in t if w.lower() in STOP_WORDS],
  }
  out = {name: _bleu1_f(_ptb_like(fn(hyp)), _ptb_like(fn(ref))) for name, fn in parts.items()}
  out["bleu1"] = sentence_bleu1(_ptb_like(hyp), _ptb_like(ref))
  return out


def qbleu1(hypotheses: Sequence[str], references: Sequence[str], ner_weight: float = 0.6,
           qt_weight: float = 0.2, re_weight: float = 0.1, delta: float = 0.7,
           entity_tagger: Callable[[Sequence[str]], Sequence[str]] = capitalized_entities,
           ) -> float:
  """Q-BLEU-1 (Nema & Khapra, 2018): answerability-weighted sentence BLEU-1, averaged.

  hypotheses [N] generated questions; references [N] gold questions (one each, as the reference
  script reads them). Per question:
    answerability = ner_weight*F_ner + qt_weight*F_qt + re_weight*F_re
                    + (1 - ner_weight - qt_weight - re_weight)*F_sw
    Q-BLEU-1      = delta*answerability + (1 - delta)*BLEU-1(hypothesis, reference)
  with the F's from answerability_components. The defaults are the reference script's
  `--data_type squad` settings used for "SQuAD-tuned" Q-BLEU (Zhang & Bansal 2019, as the paper
  cites). Our own implementation of the published rule, not the script: its Java PTB tokenizer is
  approximated (_ptb_like), and named entities come from `entity_tagger` (a function from a
  question's whitespace tokens to its entity tokens); the default, capitalized_entities, is the
  script's own capitalization rule, so pass a real NER tagger to get "NER" in the paper's sense.
  """
  _check_lengths(hypotheses, references, "references", ("hypotheses", "references"),
                 nested=False)
  sw_weight = 1.0 - ner_weight - qt_weight - re_weight
  scores = []
  for hyp, ref in zip(hypotheses, references, strict=True):
    c = answerability_components(hyp, ref, entity_tagger)
    answerability = (ner_weight * c["ner"] + qt_weight * c["qt"] + re_weight * c["re"]
                     + sw_weight * c["sw"])
    scores.append(delta * answerability + (1 - delta) * c["bleu1"])
  return float(np.mean(scores))


def qgen_bleu1(hypotheses: Sequence[str], references: Sequence[str]) -> float:
  """BLEU-1 of generated questions as the Q-BLEU script reports it (its n-gram score).

  hypotheses [N]; references [N] (one gold question each, as the script reads them). The
  Answerability-Metric script (answerability_score.py, --ngram_metric Bleu_1) lower-cases and
  PTB-tokenizes both sides, drops punctuation tokens, and averages coco-caption's sentence BLEU-1
  over questions: the "bleu1" of answerability_components, whose PTB tokenizer is approximated.
  """
  _check_lengths(hypotheses, references, "references", ("hypotheses", "references"),
                 nested=False)
  return float(np.mean([sentence_bleu1(_ptb_like(h.split()), _ptb_like(r.split()))
                        for h, r in zip(hypotheses, references, strict=True)]))
