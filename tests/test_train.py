"""The generator trainer (python train.py's current default job) on 8 CPU devices: it learns,
a killed run resumes to bit-identical parameters, the export loads in transformers, and a workdir
holding another config is refused."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from configs import reversal as default
from rag_jax.checkpoints import load_pretrained
from rag_jax.experiments import reversal


def _config(steps=40):
  config = default.get_config()
  config.num_train_steps = steps
  config.warmup_steps = 5
  config.batch_size = 16
  config.log_every = 10
  config.eval_every = 20
  config.eval_batches = 2
  config.checkpoint_every = 10
  config.task.max_length = 6
  return config


def test_learns_and_resumes_exactly(tmp_path):
  assert jax.device_count() == 8
  full = reversal.train_and_evaluate(_config(), str(tmp_path / "full"))
  lines = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().split("\n")
           if x]
  assert lines[-1]["loss"] < 0.9 * lines[0]["loss"]
  assert full["token_accuracy"] > 5 / 37  # Chance is 1/37 symbols.
  assert full["steps"] == 40 and full["devices"] == 8

  assert reversal.train_and_evaluate(_config(), str(tmp_path / "killed"), stop_after=20) is None
  resumed = reversal.train_and_evaluate(_config(), str(tmp_path / "killed"))
  assert resumed["loss_per_token"] == full["loss_per_token"]
  _, a = load_pretrained(tmp_path / "full" / "export")
  _, b = load_pretrained(tmp_path / "killed" / "export")
  jax.tree.map(np.testing.assert_array_equal, a, b)

  # The export is a transformers checkpoint giving the same logits.
  model, params = load_pretrained(tmp_path / "full" / "export")
  torch_model = transformers.BartForConditionalGeneration.from_pretrained(
      tmp_path / "full" / "export").eval()
  batch = reversal.reversal_task(_config()).eval_batches()[0]
  kw = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}
  with torch.no_grad():
    expected = torch_model(**{k: torch.from_numpy(v).long() for k, v in kw.items()}).logits
  np.testing.assert_allclose(model.apply({"params": params}, **kw).logits, expected.numpy(),
                             atol=1e-5, rtol=0)


def test_refuses_a_workdir_with_another_config(tmp_path):
  reversal.train_and_evaluate(_config(steps=2), str(tmp_path))
  other = _config(steps=2)
  other.learning_rate = 1.0
  with pytest.raises(ValueError, match=r"another config \(config.learning_rate: 0.002 in the "
                                       r"workdir, 1.0 now\)"):
    reversal.train_and_evaluate(other, str(tmp_path))
