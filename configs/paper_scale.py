"""The paper's recipe on one accelerator, on random weights and a random 21M-passage index.

    python train.py --config=configs/paper_scale.py --workdir=/tmp/paper_scale          # device
    python train.py --config=configs/paper_scale.py --workdir=/tmp/paper_scale_cpu \\
        --config.index_rows=20000 --config.num_train_steps=2 --config.eval.batch_size=2  # CPU

BERT-base question encoder + BART-large generator (presets "large"), bf16 compute with fp32
parameters and AdamW state, the paper's training batch (8 questions x 5 passages x 300 tokens)
and its open-domain QA test settings (RAG-Sequence: 50 docs, Thorough Decoding, greedy;
`--config.model_type=rag_token`: 15 docs, greedy), with retrieval on the device: a random index
of `index_rows` x 768 (bf16 on accelerators) and a random passage table. Reports the memory plan,
peak memory and step / answering times (rag_jax/experiments/paper_scale.py; docs/training.md).
"""

import ml_collections

from configs import rag_finetune

PAPER_QA_TEST = {"rag_sequence": 50, "rag_token": 15}  # Paper, Appendix A: test-time docs.


def get_config(model_type: str = "rag_sequence") -> ml_collections.ConfigDict:
  config = rag_finetune.get_config()
  config.trainer = "paper_scale"  # train.py dispatch: rag_jax.experiments.paper_scale.
  for field in ("train_context_encoder", "context_encoder_checkpoint",
                "context_encoder_max_length", "index_refresh", "refresh_rows_per_step",
                "refresh_schedule", "rerank_candidates", "export_index"):
    del config[field]  # The RAG trainer's alone: a random index has no context encoder.
  config.model_type = model_type
  config.model = ml_collections.ConfigDict()
  config.model.preset = "large"  # BERT-base question encoder + BART-large generator.
  config.model.question_encoder = ml_collections.ConfigDict()  # Preset field overrides.
  config.model.generator = ml_collections.ConfigDict()  # e.g. decoder_layers=2 (tests).
  config.dtype = "bfloat16"  # Compute dtype; parameters and AdamW state stay fp32.
  config.index_rows = 21_015_300  # DPR's Wikipedia passages (psgs_w100); 20_000 on CPU.
  config.device_index_dtype = "auto"  # bf16 on GPU/TPU, float32 on CPU.
  config.chunk_size = 131_072  # Exact search: rows per scan step per device.
  config.num_train_steps = 5  # Timed train steps (the first compiles).
  config.warmup_steps = 0
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 8  # Questions per answering program (transformers' eval_rag.py).
  config.eval.n_docs = PAPER_QA_TEST[model_type]
  config.eval.num_beams = 1  # Paper: greedy for open-domain QA.
  config.eval.max_length = 20  # Answer tokens, the decoder start included.
  config.eval.decoding = "thorough"  # RAG-Sequence: the paper's QA test decoding.
  # RAG-Sequence thorough rescoring: distinct candidates G of each question per teacher-forced
  # pass (0: a quarter of C = n_docs x num_beams), W decoder positions per call of a pass (0: a
  # quarter of the max_length - 1 scored positions, here 5); a call holds batch x G x docs x W x
  # vocab logits: 8 x 1 x 50 x 5 x 50265 x 4 B = 0.4 GiB at G = 1.
  config.eval.rescore_candidates = 1
  config.eval.rescore_positions = 0
  return config
