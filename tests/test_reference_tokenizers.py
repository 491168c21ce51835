"""The tests' offline tokenizers are the same in every process.

Seeded random encoders only give the same outputs (and fixtures the same retrieval order) across
test runs if the token ids they see are the same; `tokenizers`' WordPieceTrainer assigned ids in
Rust's per-process hash order, which made fixtures built on it differ from run to run.
"""

import json
import subprocess
import sys
from pathlib import Path

from tests import torch_reference as ref

CORPUS = ["Cora makes figs near the river.", "Brio is south of Alba.", "what does cora make ?",
          "Dune and Gale trade goods; Elm makes nets.", "where is brio ?"]

PROGRAM = """
import json
from tests import torch_reference as ref
q, g = ref.train_tokenizers({corpus!r}, question_vocab=60, generator_vocab=300)
print(json.dumps([sorted(q.get_vocab().items()), sorted(g.get_vocab().items())]))
"""


def test_tokenizers_are_identical_across_processes():
  root = str(Path(__file__).resolve().parents[1])
  runs = []
  for hash_seed in ("1", "2"):  # Python's hash seed too, though Rust's hashing is its own
    proc = subprocess.run([sys.executable, "-c", PROGRAM.format(corpus=CORPUS)],
                          capture_output=True, text=True, check=True, cwd=root,
                          env={"PYTHONHASHSEED": hash_seed, "PYTHONPATH": root,
                               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                               "PATH": ""})
    runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  assert runs[0] == runs[1]


def test_wordpiece_covers_the_corpus_words_in_a_fixed_order():
  q_tok, _ = ref.train_tokenizers(CORPUS, question_vocab=100)
  vocab = q_tok.get_vocab()
  assert [token for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])][:5] == [
      "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  ids = q_tok("What does Cora make ?")["input_ids"]
  assert q_tok.convert_ids_to_tokens(ids) == ["[CLS]", "what", "does", "cora", "make", "?", "[SEP]"]
  assert vocab["[UNK]"] not in q_tok(" ".join(CORPUS))["input_ids"]
  # An unseen word falls back to characters and "##" continuations, as WordPiece does.
  assert q_tok.convert_ids_to_tokens(q_tok("fig")["input_ids"])[1:-1] == ["f", "##i", "##g"]
