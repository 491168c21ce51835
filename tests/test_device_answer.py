"""Answering as one device program (rag_jax.answer with retrieval="device") against the host path
(exact index searched from the host, generator inputs from the reference's strings,
rag_jax.decoding.generate; itself equal to transformers' generate in tests/test_answer.py): the
same retrieved rows and doc scores, the same generator input rows (rows truncated to
max_combined_length included), the same answer ids, texts and scores, on 1 and 8 devices, for
RAG-Token and RAG-Sequence."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from rag_jax import answer as answer_lib
from rag_jax.decoding import generate, plan_generation
from tests.test_answer import N_DOCS, QUESTIONS, world  # noqa: F401  (the fixture)

# Greedy and beam search; RAG-Sequence thorough (per-passage beams, then rescoring) and fast.
CASES = [(kind, options, devices) for devices in (1, 8)
         for kind, options in [("token", dict(num_beams=2, max_length=10)),
                               ("sequence", dict(num_beams=2, max_length=10))]]
CASES.append(("sequence", dict(num_beams=1, max_length=10, decoding="fast"), 1))


# The answer test's questions and one whose passage (row 2, '"Cora"') fills the generator row.
ASKED = [*QUESTIONS, "what does cora make ?"]


def mesh_of(n):
  return Mesh(np.array(jax.devices()[:n]), ("data",))


@pytest.mark.parametrize("kind,options,devices", CASES)
def test_device_answering_equals_the_host_path(world, kind, options, devices):  # noqa: F811
  root, *_, models = world
  path = models[kind][1]
  host = answer_lib.RagAnswerer(path, root / "kb")
  dev = answer_lib.RagAnswerer(path, root / "kb", retrieval="device", mesh=mesh_of(devices))
  assert (host.retrieval, dev.retrieval) == ("host", "device")
  hits, ctx, ctx_mask, scores = host.generator_inputs(ASKED)
  inputs, out = dev.answer_on_devices(ASKED, **options)

  np.testing.assert_array_equal(inputs["doc_ids"], [[h.row for h in row] for row in hits])
  np.testing.assert_allclose(inputs["doc_scores"], scores, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(inputs["context_input_ids"], ctx)
  np.testing.assert_array_equal(inputs["context_attention_mask"], ctx_mask)
  # Every row meets max_combined_length (passage parts of 26-30 tokens, room 30): the question
  # is cut short, to nothing after '"Cora"' (row 2, a part of exactly 30 tokens). Padded rows:
  # tests/test_device_retrieval.py.
  assert ctx_mask.all() and (inputs["doc_ids"] == 2).any()

  expected = generate(host.model, host.params, context_input_ids=ctx,
                      context_attention_mask=ctx_mask, doc_scores=scores, n_docs=N_DOCS,
                      **options)
  np.testing.assert_array_equal(out.sequences, expected.sequences)
  np.testing.assert_allclose(out.sequences_scores, expected.sequences_scores, rtol=1e-5,
                             atol=1e-5)
  assert out.decoder == expected.decoder

  got, want = dev(ASKED, **options), host(ASKED, **options)
  assert [a.text for a in got] == [a.text for a in want]
  assert [[h.id for h in a.passages] for a in got] == [[h.id for h in a.passages] for a in want]
  np.testing.assert_allclose([a.passage_probs for a in got], [a.passage_probs for a in want],
                             rtol=1e-5, atol=1e-6)
  # Two calls with the same shapes: one compilation.
  plan = plan_generation(dev.model, n_docs=dev.n_docs, **options)
  assert dev.device_program(plan)._cache_size() == 1


@pytest.mark.parametrize("kind", ["token", "sequence"])
def test_decoding_is_split_over_the_devices(world, kind):  # noqa: F811
  """On 8 devices each device decodes its eighth of the questions: XLA's per-device FLOPs of the
  answering program are about an eighth of the one-device program's (a replicated decode
  would be about the same as one device's)."""
  root, *_, models = world
  path = models[kind][1]
  questions = ASKED * 2  # 8 questions
  flops = {}
  for devices in (1, 8):
    dev = answer_lib.RagAnswerer(path, root / "kb", retrieval="device", mesh=mesh_of(devices))
    plan = plan_generation(dev.model, n_docs=dev.n_docs, num_beams=2, max_length=10)
    ids, mask = dev.retriever.tokenize(questions)
    q_tokens, q_lengths = answer_lib.question_parts(
        dev.assembler, answer_lib.contexts.decode_questions(dev.tokenizers.question_encoder, ids))
    compiled = dev.device_program(plan).lower(
        dev.params, plan.search_params, ids, mask, q_tokens, q_lengths, dev.device.arrays
    ).compile()
    flops[devices] = compiled.cost_analysis()["flops"]
  assert flops[8] < 0.25 * flops[1], flops


def test_an_index_re_placed_for_the_devices_is_held_once(world):  # noqa: F811
  """Device retrieval in bf16 over an index loaded in float32: the index's embeddings are on the
  devices once (re-placed in bf16), and the host-side search runs on that same copy."""
  root, *_, models = world
  dev = answer_lib.RagAnswerer(models["token"][1], root / "kb", retrieval="device",
                               device_index_dtype="bfloat16", mesh=mesh_of(8))
  index = dev.retriever.index
  db = dev.device.arrays["embeddings"]
  assert db is index.db and db.dtype == np.dtype("bfloat16") and dev.search == "exact bfloat16"
  alive = [a for a in jax.live_arrays() if a.shape == db.shape and a.ndim == 2
           and not a.is_deleted()]
  assert len(alive) == 1, [a.dtype for a in alive]
  ids, mask = dev.retriever.tokenize(ASKED)
  inputs, _ = dev.answer_on_devices(ASKED, num_beams=1, max_length=4)
  scores, rows = dev.retriever.search(ids, mask, dev.n_docs)
  np.testing.assert_array_equal(rows, inputs["doc_ids"])
  np.testing.assert_allclose(scores, inputs["doc_scores"], rtol=1e-6)
