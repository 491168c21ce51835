"""Hugging Face checkpoint directories <-> (Flax module, params pytree).

    model, params = load_pretrained("path/to/facebook-rag-sequence-nq")
    save_pretrained(model, params, "path/to/export")    # transformers' from_pretrained reads it

Supported architectures (dispatch on config.json's model_type / architectures):
  bart: BartForConditionalGeneration (also BartModel checkpoints, keys without "model.")
  dpr:  DPRQuestionEncoder, DPRContextEncoder
  rag:  RagSequenceForGeneration, RagTokenForGeneration, RagModel (nested encoder + generator)
Weights: model.safetensors, sharded safetensors with model.safetensors.index.json, or
pytorch_model.bin (+ index) when torch is installed (torch is imported only then).

The conversion is a rename: our parameter trees mirror transformers' module names, so
`model.encoder.layers.0.fc1.weight` is `encoder/layers_0/fc1/kernel` (transposed: torch Linear
stores [out, in], Flax Dense [in, out]), embeddings and LayerNorm weights map to `embedding` and
`scale`. The model's own abstract parameter tree (jax.eval_shape of init) is the schema: every
leaf must be found with the right shape, every stored tensor must land somewhere (a short list
of known buffers and unused heads is skipped), or a CheckpointError names the file and tensor.
Nothing is written on failure; saving writes a temporary directory renamed into place.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from absl import logging
from flax import traverse_util
from safetensors import SafetensorError
from transformers import AutoConfig, AutoTokenizer
from transformers import RagConfig as HfRagConfig
from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING, tokenizer_class_from_name

from rag_jax.models.bart import BartConfig, BartForConditionalGeneration
from rag_jax.models.bert import BertConfig, DPREncoder
from rag_jax.models.rag import RagConfig, RagModel
from rag_jax.utils.atomic import atomic_directory
from rag_jax.utils.errors import UserError

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
_WEIGHT_FILE = re.compile(
    r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")

Model = BartForConditionalGeneration | DPREncoder | RagModel
Path_ = tuple[str, ...]


class CheckpointError(UserError, ValueError):
  """A checkpoint that does not fit the model: names the file and the tensor."""


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """A checkpoint directory, or a file it needs, that is not there (named)."""


class PickleNotAllowedError(CheckpointError):
  """A pytorch_model.bin that torch's safe loader refuses: reading it would unpickle Python
  objects, which runs code from the file (opt in with allow_pickle=True)."""


# ----------------------------------------------------------------------------- reading files


def read_config(path: str | os.PathLike) -> dict[str, Any]:
  """Reads <path>/config.json; errors name the file (and the line for bad JSON)."""
  file = Path(path) / CONFIG_NAME
  if not file.is_file():
    raise CheckpointNotFoundError(
        f"{file}: no such file (a checkpoint directory needs {CONFIG_NAME})")
  try:
    return json.loads(file.read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None


def _read_safetensors(file: Path) -> dict[str, np.ndarray]:
  if not file.is_file():
    raise CheckpointNotFoundError(f"{file}: no such file")
  try:
    return safetensors.numpy.load_file(str(file))
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None


def _read_torch_bin(file: Path, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """A pytorch_model.bin's tensors, read by torch's safe loader (weights_only=True): a file that
  holds other Python objects is refused, since unpickling them runs code from the file, unless
  `allow_pickle` (for files from a source you trust)."""
  if not file.is_file():
    raise CheckpointNotFoundError(f"{file}: no such file")
  try:
    import torch  # optional: only this legacy format needs it (a test dependency)
  except ImportError:
    raise CheckpointError(f"{file}: reading pytorch_model.bin needs torch (pip install "
                          "torch), or convert the checkpoint to safetensors") from None
  try:
    state = torch.load(str(file), map_location="cpu", weights_only=not allow_pickle)
  except pickle.UnpicklingError as e:
    detail = _unpickler_detail(str(e))
    if not detail.startswith("Unsupported global"):
      raise CheckpointError(f"{file}: unreadable pytorch_model.bin ({detail})") from None
    raise PickleNotAllowedError(
        f"{file}: refused: it holds Python objects beyond tensors, which torch's safe loader "
        f"(weights_only=True) does not read ({detail}), and unpickling them runs code from the "
        "file. If you trust its source, convert it once to model.safetensors beside it (then "
        "read in its place): python -c \"import torch, safetensors.torch as st; st.save_file({k: "
        f"v.clone() for k, v in torch.load('{file}', weights_only=False).items()}}, "
        f"'{file.parent / SAFE_WEIGHTS}', metadata={{'format': 'pt'}})\", or pass "
        "allow_pickle=True to rag_jax.checkpoints.load_pretrained") from None
  except (RuntimeError, EOFError, OSError) as e:
    reason = str(e).strip("'\" \n").splitlines()[0] if str(e).strip() else repr(e)
    raise CheckpointError(f"{file}: unreadable pytorch_model.bin ({reason})") from None
  if bad := sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor)):
    raise CheckpointError(f"{file}: entry {bad[0]} is a {type(state[bad[0]]).__name__}, not "
                          "a tensor")
  return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in state.items()}


def _unpickler_detail(message: str) -> str:
  """The reason in torch's weights_only error (its line after 'WeightsUnpickler error:')."""
  _, found, rest = message.partition("WeightsUnpickler error:")
  lines = [line.strip() for line in rest.splitlines() if line.strip()] if found else []
  if not lines:
    return "torch's safe loader refused it"
  return lines[0].split(" was not an allowed global")[0].rstrip(".")


def read_weights(path: str | os.PathLike, allow_pickle: bool = False
                 ) -> dict[str, tuple[np.ndarray, str]]:
  """All tensors of a checkpoint directory: {name: (array, file it came from)}.
  allow_pickle: read pytorch_model.bin files that hold Python objects beyond tensors (runs
  code from them; only for a source you trust)."""
  path = Path(path)
  read_bin = functools.partial(_read_torch_bin, allow_pickle=allow_pickle)
  for index_name, reader in ((SAFE_INDEX, _read_safetensors), (TORCH_INDEX, read_bin)):
    index = path / index_name
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: not a weight index ({e!r})") from None
      out = {}
      for shard in sorted(set(weight_map.values())):
        tensors = reader(path / shard)
        listed = {k for k, v in weight_map.items() if v == shard}
        if missing := sorted(listed - set(tensors)):
          raise CheckpointError(f"{path / shard}: tensor {missing[0]} listed in {index_name} "
                                "is not in the shard")
        out.update({k: (v, shard) for k, v in tensors.items()})
      return out
  for name, reader in ((SAFE_WEIGHTS, _read_safetensors), (TORCH_WEIGHTS, read_bin)):
    if (path / name).is_file():
      return {k: (v, name) for k, v in reader(path / name).items()}
  raise CheckpointNotFoundError(
      f"{path}: no weights found (expected {SAFE_WEIGHTS}, {SAFE_INDEX}, {TORCH_WEIGHTS} or "
      f"{TORCH_INDEX})")


# ----------------------------------------------------------------------------- name mapping

# Leaf names: transformers -> candidates in our tree (the first that exists wins).
_HF_LEAF = {"weight": ("kernel", "embedding", "scale"), "gamma": ("scale",),
            "beta": ("bias",), "bias": ("bias",)}
_OUR_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
_LAYER_LIST = re.compile(r"^(layers|layer)_(\d+)$")


def _hf_module_path(dotted: str) -> Path_:
  """'encoder.layers.0.self_attn' -> ('encoder', 'layers_0', 'self_attn')."""
  parts = dotted.split(".") if dotted else []
  out: list[str] = []
  for p in parts:
    if p.isdigit() and out:
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  return tuple(out)


def _our_module_path(path: Path_) -> str:
  """('encoder', 'layers_0', 'self_attn') -> 'encoder.layers.0.self_attn'."""
  return ".".join(_LAYER_LIST.sub(r"\1.\2", p) for p in path)


_TIED = "tied"  # A copy of the shared embedding (BART's encoder/decoder embed_tokens).
_UNEXPECTED = "unexpected"


def _bart_to_ours(key: str, tied: bool) -> Path_ | str | None:
  """BART key -> our leaf path, a dotted module key to resolve, _TIED, or None (skip)."""
  if key == "final_logits_bias":
    return ("final_logits_bias",)
  if key == "lm_head.weight":
    return None if tied else ("lm_head", "kernel")
  rest = key[len("model."):] if key.startswith("model.") else key
  if tied and rest in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
    return _TIED  # Used only if model.shared.weight itself is absent.
  return rest


def _bart_to_hf(path: Path_) -> str:
  if path == ("final_logits_bias",):
    return "final_logits_bias"
  if path[0] == "lm_head":
    return "lm_head.weight"
  return f"model.{_module_to_hf(path)}"


def _module_to_hf(path: Path_) -> str:
  """('encoder', 'layers_0', 'fc1', 'kernel') -> 'encoder.layers.0.fc1.weight'."""
  return f"{_our_module_path(path[:-1])}.{_OUR_LEAF[path[-1]]}"


def _is_skipped(key: str) -> bool:
  """Buffers and heads transformers ignores when loading these classes."""
  if key.endswith("position_ids"):
    return True
  if ".pooler." in key:  # DPR's bert_model has no pooler (add_pooling_layer=False).
    logging.warning("skipping %s: DPR encoders do not use the BERT pooler", key)
    return True
  return False


def _dpr_prefix(architecture: str) -> str:
  prefixes = {"DPRQuestionEncoder": "question_encoder.", "DPRContextEncoder": "ctx_encoder."}
  if architecture not in prefixes:
    raise CheckpointError(f"unsupported DPR architecture {architecture!r} "
                          f"(supported: {sorted(prefixes)})")
  return prefixes[architecture]


def _resolve(scope: Path_, dotted: str, abstract: dict[Path_, Any]) -> Path_ | None:
  """'encoder.layers.0.fc1.weight' under `scope` -> our leaf path if the model has it."""
  module_key, _, leaf = dotted.rpartition(".")
  module = scope + _hf_module_path(module_key)
  for cand in _HF_LEAF.get(leaf, ()):
    if module + (cand,) in abstract:
      return module + (cand,)
  return None


def _mapping(model: Model, abstract: dict[Path_, Any]
             ) -> tuple[Callable[[str], Path_ | str | None], Callable[[Path_], str]]:
  """(HF key -> our leaf path | _TIED | _UNEXPECTED | None=skip, our leaf path -> HF key)."""

  def bart(key: str, scope: Path_, tied: bool) -> Path_ | str | None:
    mapped = _bart_to_ours(key, tied)
    if mapped is None or mapped == _TIED:
      return mapped
    if isinstance(mapped, tuple):
      return scope + mapped if scope + mapped in abstract else _UNEXPECTED
    return _resolve(scope, mapped, abstract) or _UNEXPECTED

  if isinstance(model, BartForConditionalGeneration):
    return (lambda key: bart(key, (), model.config.tie_word_embeddings)), _bart_to_hf

  if isinstance(model, DPREncoder):
    prefix = _dpr_prefix(model.config.architecture)

    def dpr_to_ours(key: str) -> Path_ | str | None:
      if not key.startswith(prefix):
        return _UNEXPECTED
      return _resolve((), key[len(prefix):], abstract) or _UNEXPECTED

    return dpr_to_ours, lambda path: f"{prefix}{_module_to_hf(path)}"

  rag_prefix = "" if model.config.architecture == "RagModel" else "rag."
  q_prefix = "question_encoder.question_encoder."

  def rag_to_ours(key: str) -> Path_ | str | None:
    rest = key[len("rag."):] if key.startswith("rag.") else key
    if rest.startswith(q_prefix):
      return _resolve(("question_encoder",), rest[len(q_prefix):], abstract) or _UNEXPECTED
    if rest.startswith("generator."):
      return bart(rest[len("generator."):], ("generator",),
                  model.config.generator.tie_word_embeddings)
    return _UNEXPECTED

  def rag_to_hf(path: Path_) -> str:
    if path[0] == "question_encoder":
      return f"{rag_prefix}{q_prefix}{_module_to_hf(path[1:])}"
    return f"{rag_prefix}generator.{_bart_to_hf(path[1:])}"

  return rag_to_ours, rag_to_hf


# ----------------------------------------------------------------------------- model building


def model_from_config(hf_config: dict[str, Any], dtype=jnp.float32,
                      param_dtype=jnp.float32) -> Model:
  """The Flax module for a transformers config.json dict."""
  model_type = hf_config.get("model_type")
  if model_type == "bart":
    return BartForConditionalGeneration(BartConfig.from_hf(hf_config), dtype, param_dtype)
  if model_type == "dpr":
    arch = (hf_config.get("architectures") or ["DPRQuestionEncoder"])[0]
    _dpr_prefix(arch)
    return DPREncoder(BertConfig.from_hf(hf_config, arch), dtype, param_dtype)
  if model_type == "rag":
    return RagModel(RagConfig.from_hf(hf_config), dtype, param_dtype)
  raise CheckpointError(f"unsupported model_type {model_type!r} (supported: bart, dpr, rag)")


def abstract_params(model: Model) -> dict[str, Any]:
  """The model's parameter tree as ShapeDtypeStructs (no memory, no compute)."""
  ids = jnp.zeros((1, 2), jnp.int32)
  if isinstance(model, RagModel):
    args = dict(context_input_ids=ids, context_attention_mask=ids, decoder_input_ids=ids,
                input_ids=ids, retrieved_doc_embeds=jnp.zeros(
                    (1, 1, model.config.question_encoder.embedding_dim), jnp.float32))
  else:
    args = dict(input_ids=ids)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), **args))
  return variables["params"]


# ----------------------------------------------------------------------------- public API


def load_pretrained(path: str | os.PathLike, dtype=jnp.float32, param_dtype=jnp.float32,
                    allow_pickle: bool = False) -> tuple[Model, dict[str, Any]]:
  """Loads a transformers checkpoint directory as (Flax module, params pytree).

  Args:
    path: a directory with config.json and weights (see the module docstring).
    dtype: compute dtype of the module (jnp.bfloat16 on accelerators).
    param_dtype: dtype the parameters are stored in (float32 recommended).
    allow_pickle: read a pytorch_model.bin that torch's safe loader refuses (unpickling runs
      code from the file: only for a source you trust). By default such a file raises
      PickleNotAllowedError, which says how to convert it once to model.safetensors.
  Raises:
    FileNotFoundError: missing directory, config.json or weights file (named).
    CheckpointError: unsupported architecture; a missing, unexpected or misshapen tensor (the
      error names the file and the tensor).
  """
  path = Path(path)
  model = model_from_config(read_config(path), dtype, param_dtype)
  weights = read_weights(path, allow_pickle)
  abstract = traverse_util.flatten_dict(abstract_params(model))
  to_ours, to_hf = _mapping(model, abstract)

  params: dict[Path_, np.ndarray] = {}
  tied: dict[Path_, tuple[np.ndarray, str, str]] = {}
  for key, (array, file) in sorted(weights.items()):
    mapped = to_ours(key)
    if mapped is None or _is_skipped(key):
      continue
    if mapped == _TIED:
      scope = ("generator",) if isinstance(model, RagModel) else ()
      tied[scope + ("shared", "embedding")] = (array, file, key)
      continue
    ours = mapped
    if ours == _UNEXPECTED:
      raise CheckpointError(f"{path / file}: unexpected tensor {key} {tuple(array.shape)} "
                            f"(no such parameter in {type(model).__name__})")
    params[ours] = _check_shape(array, ours, abstract[ours], path / file, key)
  for ours, (array, file, key) in tied.items():
    if ours not in params:  # Only the encoder/decoder copy of the shared embedding was saved.
      params[ours] = _check_shape(array, ours, abstract[ours], path / file, key)
  for ours in abstract:
    if ours not in params:
      if ours[-1] == "final_logits_bias":  # A buffer: transformers registers zeros if absent.
        params[ours] = np.zeros(abstract[ours].shape, np.float32)
        continue
      raise CheckpointError(f"{path}: missing tensor {to_hf(ours)} (parameter "
                            f"{'/'.join(ours)}) in {sorted({f for _, f in weights.values()})}")
  tree = traverse_util.unflatten_dict(
      {k: jnp.asarray(v, dtype=param_dtype) for k, v in params.items()})
  return model, tree


def _check_shape(array: np.ndarray, ours: Path_, spec: Any, file: Path, key: str) -> np.ndarray:
  """Transposes Linear weights and checks the shape against the config's."""
  if ours[-1] == "kernel":
    array = array.T
  if tuple(array.shape) != tuple(spec.shape):
    got = tuple(array.T.shape) if ours[-1] == "kernel" else tuple(array.shape)
    want = tuple(spec.shape)[::-1] if ours[-1] == "kernel" else tuple(spec.shape)
    raise CheckpointError(f"{file}: tensor {key} has shape {got} but config.json implies "
                          f"{want}")
  return np.asarray(array, np.float32) if array.dtype != np.float32 else array


def to_hf_state_dict(model: Model, params: dict[str, Any],
                     dtype: np.dtype | type = np.float32) -> dict[str, np.ndarray]:
  """Our params (or any tree shaped like them, e.g. gradients) -> transformers state dict
  (numpy arrays of `dtype`, torch layouts and names)."""
  abstract = traverse_util.flatten_dict(abstract_params(model))
  flat = traverse_util.flatten_dict(params)
  if missing := sorted(set(abstract) - set(flat)):
    raise CheckpointError(f"params lack parameter {'/'.join(missing[0])}")
  if extra := sorted(set(flat) - set(abstract)):
    raise CheckpointError(f"params have unexpected parameter {'/'.join(extra[0])}")
  _, to_hf = _mapping(model, abstract)
  out = {}
  for ours, value in flat.items():
    if tuple(value.shape) != tuple(abstract[ours].shape):
      raise CheckpointError(f"parameter {'/'.join(ours)} has shape {tuple(value.shape)}, the "
                            f"config implies {tuple(abstract[ours].shape)}")
    array = np.asarray(jax.device_get(value), dtype)
    out[to_hf(ours)] = np.ascontiguousarray(array.T if ours[-1] == "kernel" else array)
  return out


def save_pretrained(model: Model, params: dict[str, Any], path: str | os.PathLike,
                    max_shard_bytes: int | None = None, tokenizer: Any = None) -> Path:
  """Writes a transformers checkpoint directory (config.json + safetensors) atomically.

  Args:
    model, params: as returned by load_pretrained (or a model built from our configs).
    path: target directory. If it exists, files other than config and weights (tokenizer files,
      generation_config.json) are kept; the directory is replaced only once the new one is
      complete.
    max_shard_bytes: split the weights into shards of about this size, with an index file.
    tokenizer: optional transformers tokenizer saved into the same directory (RagTokenizers:
      question_encoder_tokenizer/ and generator_tokenizer/ as transformers' RagTokenizer does).
  """
  path = Path(path)
  state = to_hf_state_dict(model, params)
  hf_config = model.config.to_hf()
  hf_config["dtype"] = "float32"

  with atomic_directory(path) as tmp:
    if path.is_dir():
      for old in path.iterdir():
        if old.is_file() and old.name != CONFIG_NAME and not _WEIGHT_FILE.match(old.name):
          shutil.copy2(old, tmp / old.name)
        elif old.is_dir() and old.name.endswith("_tokenizer") and tokenizer is None:
          shutil.copytree(old, tmp / old.name)
    (tmp / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    shards = _shard(state, max_shard_bytes)
    if len(shards) == 1:
      safetensors.numpy.save_file(shards[0], str(tmp / SAFE_WEIGHTS), metadata={"format": "pt"})
    else:
      weight_map = {}
      for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors.numpy.save_file(shard, str(tmp / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
      total = sum(a.nbytes for a in state.values())
      (tmp / SAFE_INDEX).write_text(json.dumps(
          {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    if isinstance(tokenizer, RagTokenizers):  # transformers' RagTokenizer layout
      tokenizer.question_encoder.save_pretrained(str(tmp / "question_encoder_tokenizer"))
      tokenizer.generator.save_pretrained(str(tmp / "generator_tokenizer"))
    elif tokenizer is not None:
      tokenizer.save_pretrained(str(tmp))
  return path


def _shard(state: dict[str, np.ndarray], max_bytes: int | None) -> list[dict[str, np.ndarray]]:
  if not max_bytes:
    return [state]
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for key in sorted(state):
    if shards[-1] and size + state[key].nbytes > max_bytes:
      shards.append({})
      size = 0
    shards[-1][key] = state[key]
    size += state[key].nbytes
  return shards


class RagTokenizers(NamedTuple):
  """transformers' RagTokenizer layout: questions are encoded by one, targets by the other."""
  question_encoder: Any
  generator: Any


TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def load_tokenizer(path: str | os.PathLike) -> Any:
  """The tokenizer saved beside a checkpoint (RagTokenizers for a RAG directory), chosen by
  transformers' own rule.

  A RAG directory (question_encoder_tokenizer/ and generator_tokenizer/) loads as
  transformers' RagTokenizer.from_pretrained loads it: each sub-tokenizer by AutoTokenizer with
  the matching sub-model config of config.json, so that a tokenizer_config.json without
  `tokenizer_class` (older hub uploads: vocab.txt, or vocab.json + merges.txt, no
  tokenizer.json) gets its model type's class (DPR: DPRQuestionEncoderTokenizer; BART:
  RobertaTokenizer, BART's in transformers 5). Any other directory loads with
  AutoTokenizer.from_pretrained, which reads the model config beside it (a DPR encoder's).

  Raises CheckpointNotFoundError naming the missing file where the directory lacks what its
  tokenizer class reads (transformers would build an empty vocabulary there, every word
  unknown), CheckpointError where transformers cannot load it otherwise.
  """
  path = Path(path)
  if (path / "question_encoder_tokenizer").is_dir():
    config = _rag_config(path)
    return RagTokenizers(
        _auto_tokenizer(path / "question_encoder_tokenizer",
                        None if config is None else config.question_encoder),
        _auto_tokenizer(path / "generator_tokenizer",
                        None if config is None else config.generator))
  if not path.is_dir():
    raise CheckpointNotFoundError(f"{path}: no such directory")
  return _auto_tokenizer(path, None)


def _rag_config(path: Path) -> Any:
  """transformers' RagConfig of a RAG directory's config.json (None without one, or for
  another model type: the sub-tokenizers then name their class themselves)."""
  if not (path / CONFIG_NAME).is_file():
    return None
  hf_config = read_config(path)
  if hf_config.get("model_type") != "rag":
    return None
  return HfRagConfig.from_dict(hf_config)


def _tokenizer_class(directory: Path, model_config: Any) -> Any:
  """The tokenizer class AutoTokenizer picks for `directory` (None where it cannot tell):
  tokenizer_config.json's tokenizer_class, else the model config's tokenizer_class, else its
  model type's (the config given, or the config.json in the directory)."""
  tokenizer_config = directory / TOKENIZER_CONFIG
  name = None
  if tokenizer_config.is_file():
    try:
      name = json.loads(tokenizer_config.read_text()).get("tokenizer_class")
    except (json.JSONDecodeError, AttributeError) as e:
      raise CheckpointError(f"{tokenizer_config}: not a tokenizer config ({e})") from None
  if model_config is None and (directory / CONFIG_NAME).is_file():
    try:
      model_config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError):  # a model type transformers does not know: no class from it
      model_config = None
  name = name or getattr(model_config, "tokenizer_class", None)
  if name:
    return tokenizer_class_from_name(name) or tokenizer_class_from_name(
        name.removesuffix("Fast"))
  return None if model_config is None else TOKENIZER_MAPPING.get(type(model_config), None)


def _auto_tokenizer(directory: Path, model_config: Any) -> Any:
  """AutoTokenizer.from_pretrained(directory, config=model_config), offline, with the files
  its class reads checked first and any failure named by the directory."""
  if not directory.is_dir():
    raise CheckpointNotFoundError(f"{directory}: no such directory")
  if not (directory / TOKENIZER_FILE).is_file():
    cls = _tokenizer_class(directory, model_config)
    files = [f for key, f in getattr(cls, "vocab_files_names", {}).items()
             if key != "tokenizer_file"]
    if missing := [f for f in files if not (directory / f).is_file()]:
      raise CheckpointNotFoundError(
          f"{directory / missing[0]}: no such file (a {cls.__name__} reads {TOKENIZER_FILE}, "
          f"or {' and '.join(files)})")
    if cls is None:
      raise CheckpointNotFoundError(
          f"{directory}: no {TOKENIZER_FILE}, and neither a tokenizer_class in "
          f"{TOKENIZER_CONFIG} nor a {CONFIG_NAME} says which tokenizer reads its files")
  try:
    return AutoTokenizer.from_pretrained(str(directory), config=model_config,
                                         local_files_only=True)
  except (OSError, ValueError) as e:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CheckpointError(f"{directory}: transformers cannot load this tokenizer ({reason})"
                          ) from None


def replace_config(model: Model, **changes: Any) -> Model:
  """A copy of `model` whose config has `changes` (e.g. dropout=0.0)."""
  return model.clone(config=dataclasses.replace(model.config, **changes))


__all__ = ["CheckpointError", "CheckpointNotFoundError", "PickleNotAllowedError",
           "load_pretrained", "save_pretrained", "load_tokenizer", "read_config", "read_weights",
           "to_hf_state_dict", "model_from_config", "replace_config", "RagTokenizers"]
