"""Passage encoding against transformers' PyTorch DPRContextEncoder, sharding and resumption."""

import jax
import numpy as np
import pytest
import torch
from jax.sharding import Mesh
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import BertTokenizerFast, DPRConfig, DPRContextEncoder

import rag_jax.retrieval.encode as encode_mod
from rag_jax.retrieval.corpus import Passage
from rag_jax.retrieval.embeddings import EmbeddingFormatError, EmbeddingStore
from rag_jax.retrieval.encode import EncodeConfig, encode_from_checkpoint
from rag_jax.retrieval.store import write_store
from rag_jax.utils.atomic import atomic_file

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho "
         "sigma tau upsilon phi chi psi omega river mountain city king queen war peace music art "
         "science paris london rome 1815 1944 the of and in a is was").split()


def make_passages(n: int, seed: int = 0) -> list[Passage]:
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    length = int(rng.choice([3, 10, 40, 90]))  # 90 words overflow max_length=64: truncation
    title = "" if i % 7 == 3 else " ".join(rng.choice(WORDS, int(rng.integers(1, 4))))
    out.append(Passage(str(i), title.title(), " ".join(rng.choice(WORDS, length))))
  return out


def save_tokenizer(path, passages) -> BertTokenizerFast:
  """A BERT WordPiece tokenizer trained offline on the test corpus, saved as transformers does."""
  tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.train_from_iterator([p.title + " " + p.text for p in passages], trainers.WordPieceTrainer(
      vocab_size=160, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
  fast = BertTokenizerFast(vocab=tok.get_vocab(), do_lower_case=True)
  fast.save_pretrained(path)
  # Words must come out as word pieces, not [UNK]: otherwise every passage looks alike.
  assert fast.unk_token_id not in fast(passages[0].text)["input_ids"]
  return fast


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("encode")
  passages = make_passages(45)
  tokenizer = save_tokenizer(root / "encoder", passages)
  torch.manual_seed(0)
  config = DPRConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
                     projection_dim=16)
  model = DPRContextEncoder(config).eval()
  model.save_pretrained(root / "encoder")
  store = write_store(passages, root / "store", progress=False)
  # Reference: torch on [CLS] title [SEP] text [SEP], all-zero token_type_ids, fp32.
  enc = tokenizer([p.title for p in passages], [p.text for p in passages], truncation=True,
                  max_length=64, padding=True, return_tensors="pt")
  with torch.no_grad():
    ref = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                token_type_ids=torch.zeros_like(enc["input_ids"])).pooler_output.numpy()
  assert (enc["attention_mask"].sum(1) == 64).any()  # some passages really are truncated
  return root, store, ref


def mesh_of(n):
  return Mesh(np.array(jax.devices()[:n]), ("data",))


CONFIG = EncodeConfig(batch_size=8, max_length=64, shard_size=10, length_bucket=16)


@pytest.mark.parametrize("num_devices", [1, 8])
def test_embeddings_equal_torch_dpr_context_encoder(tmp_path, setup, num_devices):
  root, store, ref = setup
  out = encode_from_checkpoint(store, tmp_path / "emb", str(root / "encoder"), config=CONFIG,
                               mesh=mesh_of(num_devices), progress=False)
  assert out.manifest["complete"] and out.count == 45 and out.dim == 16
  assert len(out.bounds) == 5 and out.bounds[-1] == (40, 45)
  assert out.encoder["token_type_ids"] == "zeros" and len(out.encoder["encoder"]["sha256"]) == 64
  np.testing.assert_allclose(out.to_array(), ref, rtol=1e-5, atol=1e-5)


def test_float16_storage(tmp_path, setup):
  root, store, ref = setup
  cfg = EncodeConfig(batch_size=16, max_length=64, shard_size=20, dtype="float16")
  out = encode_from_checkpoint(store, tmp_path / "emb", str(root / "encoder"), config=cfg,
                               mesh=mesh_of(8), progress=False)
  assert out.shard(0).dtype == np.float16
  np.testing.assert_allclose(out.to_array(), ref, rtol=2e-3, atol=2e-3)


def test_resume_after_kill_keeps_finished_shards(tmp_path, setup, monkeypatch):
  root, store, ref = setup
  emb = tmp_path / "emb"
  kw = dict(config=CONFIG, mesh=mesh_of(8), progress=False)
  assert encode_from_checkpoint(store, emb, str(root / "encoder"), max_new_shards=2, **kw) is None
  assert not EmbeddingStore(emb, require_complete=False).manifest["complete"]
  with pytest.raises(EmbeddingFormatError, match="complete=false"):
    EmbeddingStore(emb)
  first = (emb / "shard-00000.npy").stat()

  # A kill in the middle of writing shard 2: the half-written file never takes the shard's name.
  def dying_write(directory, index, array, dtype):
    with atomic_file(directory / f"shard-{index:05d}.npy") as f:
      f.write(b"\x93NUMPY half a shard")
      raise KeyboardInterrupt

  monkeypatch.setattr(encode_mod, "write_shard", dying_write)
  with pytest.raises(KeyboardInterrupt):
    encode_from_checkpoint(store, emb, str(root / "encoder"), **kw)
  monkeypatch.undo()
  assert not (emb / "shard-00002.npy").exists()
  (emb / ".shard-00002.npy.tmp-leftover").write_bytes(b"junk from a SIGKILL")  # never renamed

  # Another encoder or tokenization is refused, and nothing is touched.
  with pytest.raises(EmbeddingFormatError, match="max_length"):
    encode_from_checkpoint(store, emb, str(root / "encoder"), config=EncodeConfig(
        batch_size=8, max_length=32, shard_size=10), mesh=mesh_of(8), progress=False)

  done = encode_from_checkpoint(store, emb, str(root / "encoder"), **kw)
  assert (emb / "shard-00000.npy").stat().st_mtime_ns == first.st_mtime_ns  # not recomputed
  assert not list(emb.glob(".shard-*"))
  np.testing.assert_allclose(done.to_array(), ref, rtol=1e-5, atol=1e-5)
