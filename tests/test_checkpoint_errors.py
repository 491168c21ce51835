"""Bad checkpoints give errors that name the file and the tensor; failures write nothing."""

import json
import re
import shutil

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


class PickledState(dict):
  """A state dict of a class of its own: torch's safe loader (weights_only=True) refuses it, as
  it refuses the Python objects (argparse namespaces, numpy arrays) of some older
  pytorch_model.bin files."""


def test_a_pytorch_model_bin_the_safe_loader_refuses_is_named_with_how_to_opt_in(bart_dir,
                                                                                tmp_path):
  """Refused in one line that names the file and torch's reason and says how to opt in;
  allow_pickle=True reads it, and the conversion the message gives writes a model.safetensors
  that loads the same parameters without any opt-in."""
  import torch  # deferred: only the legacy format needs it

  _, params = load_pretrained(bart_dir)
  path = tmp_path / "legacy"
  path.mkdir()
  shutil.copy(bart_dir / "config.json", path)
  state = load_file(str(bart_dir / "model.safetensors"))
  file = path / "pytorch_model.bin"
  torch.save(PickledState({k: torch.from_numpy(v) for k, v in state.items()}), file)
  with pytest.raises(CheckpointError, match=rf"^{file}: refused: .* safe loader "
                     r"\(weights_only=True\) does not read \(Unsupported global: GLOBAL "
                     r"tests\.test_checkpoint_errors\.PickledState\).* If you trust its source, "
                     r"convert it once") as refused:
    load_pretrained(path)
  assert "\n" not in str(refused.value)

  def assert_same(tree):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 tree, params)

  assert_same(load_pretrained(path, allow_pickle=True)[1])
  conversion = re.search(r'python -c "([^"]+)"', str(refused.value)).group(1)
  exec(conversion, {})  # the command the message gives, on the test's own file
  assert_same(load_pretrained(path)[1])


def test_an_unreadable_pytorch_model_bin_is_named(bart_dir):
  (bart_dir / "model.safetensors").unlink()
  (bart_dir / "pytorch_model.bin").write_bytes(b"not a torch file")
  with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: unreadable pytorch_model\.bin "
                     r"\("):
    load_pretrained(bart_dir)
