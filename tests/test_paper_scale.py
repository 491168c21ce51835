"""The paper's recipe at scale (configs/paper_scale.py, rag_jax/experiments/paper_scale.py): the
full config's shapes and memory plan without allocating (jax.eval_shape), a random device index
searched exactly against numpy, and a reduced variant (tiny model, 2,000 rows) run end to end on
8 CPU devices (train steps with retrieval in the step, answering as one device program)."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from configs import paper_scale as paper_config
from rag_jax.experiments import paper_scale
from rag_jax.retrieval.device import DeviceRetrieval
from rag_jax.training import config_check

# BERT-base without a pooler (DPR's encoder) and BART-large (the shared embedding once), the
# transformers models' sizes; rag_jax keeps BART's final_logits_bias (a buffer in torch, 50,265
# values) with the parameters.
BERT_BASE, BART_LARGE = 108_891_648, 406_291_456 + 50_265


def test_full_config_has_the_papers_shapes_and_plan():
  config = paper_config.get_config()
  config_check.validate(config)
  model = paper_scale.model_of(config)
  q, g = model.config.question_encoder, model.config.generator
  assert (q.hidden_size, q.num_hidden_layers, g.d_model, g.encoder_layers, g.decoder_layers,
          g.vocab_size) == (768, 12, 1024, 12, 12, 50265)
  b, n, length = config.batch_size, config.n_docs, config.max_combined_length
  assert (b, n, length, config.index_rows) == (8, 5, 300, 21_015_300)
  assert (config.eval.n_docs, paper_config.get_config("rag_token").eval.n_docs) == (50, 15)
  abstract = jax.eval_shape(lambda k: model.init(
      k, np.zeros((b * n, length), np.int32), np.ones((b * n, length), np.int32),
      np.zeros((b, 4), np.int32), input_ids=np.zeros((b, 8), np.int32),
      retrieved_doc_embeds=np.zeros((b, n, 768), np.float32))["params"], jax.random.key(0))
  counts = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v))
            for k, v in abstract.items()}
  assert counts == {"question_encoder": BERT_BASE, "generator": BART_LARGE}
  spec = paper_scale.table_spec(model, length)
  config.device_index_dtype = "bfloat16"
  plan = paper_scale.memory_plan(config, BERT_BASE + BART_LARGE, 768, spec)
  devices = jax.device_count()
  assert plan["index_embeddings"] * devices == pytest.approx(21_015_300 * 768 * 2 / 2**30)
  assert plan["passage_table"] * devices == pytest.approx(21_015_300 * (298 * 2 + 4) / 2**30)
  assert plan["adamw_moments_fp32"] == pytest.approx(2 * (BERT_BASE + BART_LARGE) * 4 / 2**30)


def test_random_index_is_searched_exactly():
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  config = paper_config.get_config()
  config.model.preset = "tiny"
  spec = paper_scale.table_spec(paper_scale.model_of(config), 40)
  rows, dim = 1000, 16
  retrieval = DeviceRetrieval.random(mesh, spec, rows, dim, 4, dtype="float32", chunk_size=64,
                                     matmul="float32")
  emb = np.asarray(jax.device_get(retrieval.arrays["embeddings"]))[:rows]
  tokens = np.asarray(jax.device_get(retrieval.arrays["tokens"]))[:rows]
  lengths = np.asarray(jax.device_get(retrieval.arrays["lengths"]))[:rows]
  assert tokens.dtype == np.uint16 and tokens.min() >= 4 and tokens.max() < spec.vocab_size
  assert lengths.min() >= 1 and lengths.max() <= spec.width and len(np.unique(emb[:, 0])) == rows
  queries = np.random.default_rng(0).standard_normal((5, dim)).astype(np.float32)
  scores, ids = jax.device_get(jax.jit(retrieval.search)(queries,
                                                         retrieval.arrays["embeddings"]))
  truth = np.argsort(-(queries @ emb.T), axis=1, kind="stable")[:, :4]
  np.testing.assert_array_equal(ids, truth)
  np.testing.assert_allclose(scores, np.take_along_axis(queries @ emb.T, truth, 1), rtol=1e-5)


def test_reduced_variant_trains_and_answers_on_the_devices(tmp_path):
  config = paper_config.get_config("rag_sequence")
  config.model.preset = "tiny"
  config.update_from_flattened_dict({
      "index_rows": 2000, "chunk_size": 256, "max_combined_length": 48,
      "max_source_length": 16, "max_target_length": 8, "num_train_steps": 2,
      "eval.batch_size": 3, "eval.max_length": 6, "eval.n_docs": 4})
  config_check.validate(config)
  result = paper_scale.train_and_evaluate(config, tmp_path)
  report = json.loads((tmp_path / "report.json").read_text())
  assert result["index_rows"] == report["index_rows"] == 2000
  assert np.isfinite(report["train_loss"]).all() and len(report["train_loss"]) == 2
  answer = report["answer"]
  assert answer["doc_ids_in_range"] and answer["sequences_shape"][0] == 3
  assert answer["decoder"] == "RAG-Sequence thorough, greedy, 4 docs, max_length 6"
  assert report["memory_plan_gib"]["step_temporaries_xla"] > 0
