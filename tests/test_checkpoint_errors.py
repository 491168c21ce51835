"""Bad checkpoints give errors that name the file and the tensor; failures write nothing."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from rag_jax.checkpoints import CheckpointError, load_pretrained, save_pretrained
from tests import torch_reference as ref


@pytest.fixture
def bart_dir(tmp_path):
  return ref.bart(tmp_path)[1]


def _rewrite_weights(path, edit):
  file = path / "model.safetensors"
  tensors = load_file(str(file))
  edit(tensors)
  save_file(tensors, str(file), metadata={"format": "pt"})


def test_missing_directory_and_config(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nowhere/config\.json"):
    load_pretrained(tmp_path / "nowhere")


def test_invalid_config_json_names_file_and_line(bart_dir):
  (bart_dir / "config.json").write_text('{\n  "model_type": "bart",\n  oops\n}\n')
  with pytest.raises(CheckpointError, match=r"config\.json:3: invalid JSON"):
    load_pretrained(bart_dir)


def test_unsupported_model_type(bart_dir):
  cfg = json.loads((bart_dir / "config.json").read_text())
  cfg["model_type"] = "t5"
  (bart_dir / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="unsupported model_type 't5'"):
    load_pretrained(bart_dir)


def test_missing_weights_file(bart_dir):
  (bart_dir / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match="no weights found"):
    load_pretrained(bart_dir)


def test_missing_tensor_names_tensor_and_file(bart_dir):
  _rewrite_weights(bart_dir, lambda t: t.pop("model.decoder.layers.1.fc2.bias"))
  with pytest.raises(CheckpointError, match=r"missing tensor model\.decoder\.layers\.1\.fc2"
                     r"\.bias.*model\.safetensors"):
    load_pretrained(bart_dir)


def test_unexpected_tensor_names_tensor_and_file(bart_dir):
  _rewrite_weights(bart_dir, lambda t: t.update(
      {"model.encoder.layers.7.fc1.weight": np.zeros((4, 4), np.float32)}))
  with pytest.raises(CheckpointError,
                     match=r"model\.safetensors: unexpected tensor model\.encoder\.layers\.7"):
    load_pretrained(bart_dir)


def test_shape_that_does_not_fit_the_config(bart_dir):
  cfg = json.loads((bart_dir / "config.json").read_text())
  cfg["encoder_ffn_dim"] = 41
  (bart_dir / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.encoder\.layers"
                     r"\.0\.fc1\.bias has shape \(40,\) but config\.json implies \(41,\)"):
    load_pretrained(bart_dir)


def test_shard_missing_from_index(tmp_path):
  torch_model, _ = ref.bart(tmp_path)
  sharded = tmp_path / "sharded"
  torch_model.save_pretrained(sharded, max_shard_size="20KB")
  victim = sorted(sharded.glob("model-*.safetensors"))[1]
  victim.unlink()
  with pytest.raises(FileNotFoundError, match=victim.name):
    load_pretrained(sharded)


def test_truncated_safetensors_file(bart_dir):
  file = bart_dir / "model.safetensors"
  file.write_bytes(file.read_bytes()[:1000])
  with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable"):
    load_pretrained(bart_dir)


def test_failed_save_leaves_the_existing_checkpoint_untouched(tmp_path, bart_dir, monkeypatch):
  model, params = load_pretrained(bart_dir)
  target = save_pretrained(model, params, tmp_path / "out" / "export")
  (target / "tokenizer.json").write_text("{}")  # A user's file beside the weights.
  before = {p.name: p.read_bytes() for p in target.iterdir()}

  broken = jax.tree.map(lambda x: x, params)
  del broken["decoder"]["layers_1"]
  with pytest.raises(CheckpointError, match="params lack parameter decoder/layers_1"):
    save_pretrained(model, broken, target)
  misshapen = jax.tree.map(lambda x: x, params)
  misshapen["final_logits_bias"] = np.zeros((1, 3), np.float32)
  with pytest.raises(CheckpointError, match="final_logits_bias has shape"):
    save_pretrained(model, misshapen, target)
  assert {p.name: p.read_bytes() for p in target.iterdir()} == before
  assert sorted(p.name for p in target.parent.iterdir()) == ["export"]  # No temp dirs left.

  # A crash in the middle of writing (disk full, kill) also leaves the old checkpoint whole.
  import safetensors.numpy

  def crash(tensors, filename, metadata=None):
    with open(filename, "wb") as f:
      f.write(b"partial")
    raise OSError("No space left on device")

  monkeypatch.setattr(safetensors.numpy, "save_file", crash)
  with pytest.raises(OSError, match="No space left"):
    save_pretrained(model, params, target)
  monkeypatch.undo()
  assert {p.name: p.read_bytes() for p in target.iterdir()} == before
  assert sorted(p.name for p in target.parent.iterdir()) == ["export"]

  # A successful save in place keeps the user's file.
  save_pretrained(model, params, target)
  assert (target / "tokenizer.json").read_text() == "{}"


def test_dpr_architecture_prefix_mismatch(tmp_path):
  _, path = ref.dpr(tmp_path, "question")
  cfg = json.loads((path / "config.json").read_text())
  cfg["architectures"] = ["DPRContextEncoder"]
  (path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(CheckpointError, match="unexpected tensor question_encoder.bert_model"):
    load_pretrained(path)
