"""Fine-tune RAG on your question-answer data (the paper's recipe, finetune_rag.sh's values).

    python -m rag_jax.commands.build_index ... --out /data/kb        # passages -> index
    python train.py --config=configs/rag_finetune.py --workdir=/runs/rag_nq \\
        --config.rag_checkpoint=/ckpt/rag-sequence-nq --config.index_dir=/data/kb \\
        --config.data_dir=/data/nq        # {train,val}.{source,target}, one example per line

Either `rag_checkpoint` (a transformers RAG directory with its tokenizers), or
`question_encoder_checkpoint` (DPRQuestionEncoder) + `generator_checkpoint` (BART), each with its
tokenizer saved beside it. The paths are empty here: train.py names every one left to set, in one
line, before any work.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.trainer = "rag"  # train.py dispatch: the RAG fine-tuning loop.
  # rag_sequence | rag_token: the loss's marginalisation and the class trained, exported and
  # decoded (RagSequenceForGeneration / RagTokenForGeneration), whatever rag_checkpoint's class.
  config.model_type = "rag_sequence"
  config.rag_checkpoint = ""  # transformers RAG checkpoint directory (with tokenizers).
  config.question_encoder_checkpoint = ""  # Or: DPRQuestionEncoder directory ...
  config.generator_checkpoint = ""  # ... and BART directory.
  config.index_dir = ""  # A directory written by python -m rag_jax.commands.build_index.
  config.data_dir = ""  # {train,val}.{source,target} (the research example's format).
  config.dtype = "float32"  # Compute dtype; "bfloat16" on accelerators. Params stay fp32.
  config.seed = 42  # Data order and dropout keys (finetune_rag's default seed).

  config.n_docs = 5  # Passages retrieved per question (paper: 5 or 10 for training; <= index).
  config.retrieval = "auto"  # auto | device (exact search in the jitted step) | host.
  # dense: DPR, p(z|x) from q(x).d(z), the question encoder trained (unless frozen below);
  # bm25: a fixed BM25 retriever (index_dir holds a bm25 index) whose scores are the logits of
  # p(z|x), the question encoder unused and frozen (the paper's "RAG-*-BM25" rows, Table 6).
  config.retriever_kind = "dense"
  # Also train the DPR context encoder (transformers' set_context_encoder_for_training): the
  # retrieved passages re-encoded in every step, doc scores from the fresh embeddings; the index
  # itself stays as built. Its own rate: group_learning_rates.ctx_encoder (else learning_rate).
  config.train_context_encoder = False
  config.context_encoder_checkpoint = ""  # The DPRContextEncoder (+ tokenizer) of the index.
  config.context_encoder_max_length = 256  # Passage tokens, as build_index's --max_length.
  # Refreshing the index with the trained context encoder (needs train_context_encoder; all but
  # scheduled need retrieval on the devices): none (the index stays as built) | rolling (each step
  # re-encodes refresh_rows_per_step rows of every device's shard, in the step) | scheduled (the
  # whole index re-encoded between steps at refresh_schedule's steps; also a host-searched
  # index, saved to WORKDIR/refreshed_index/) | rerank (the stale index searched for
  # rerank_candidates passages, rescored with fresh encodings, n_docs kept).
  config.index_refresh = "none"
  config.refresh_rows_per_step = 64  # rolling: rows of each device's shard per step (<= its rows).
  # scheduled: Atlas's --refresh_index, START-END:EVERY,... (or N: every N steps; -1: never).
  config.refresh_schedule = "0-1000:500,1000-10000:2000"
  config.rerank_candidates = 20  # rerank: candidates L > n_docs searched in the stale index.
  # With train_context_encoder: export/index/, every passage re-encoded by the trained context
  # encoder (an index of index_dir's kind, the store linked), which evaluate.py then searches.
  config.export_index = True
  config.device_index_dtype = "auto"  # Device copy of the index: auto = bf16 on GPU/TPU.
  config.device_index_memory_fraction = 0.5  # auto: device if index + table fit this share.
  config.max_source_length = 128  # Question tokens (question encoder).
  config.max_target_length = 25  # Answer tokens (generator).
  config.max_combined_length = 300  # Passage + question tokens fed to the generator.
  config.label_smoothing = 0.1  # Epsilon of the marginal-likelihood losses.
  config.exclude_bos_score = False  # RAG-Sequence: drop the BOS position's log-prob.
  config.prepend_decoder_start = False  # Start-token-prefixed labels (False: the reference's).

  config.batch_size = 8  # Global batch of questions (split over all devices).
  config.num_train_steps = 10_000  # Optimizer steps (the schedule's length).
  config.learning_rate = 3e-5  # Peak AdamW learning rate.
  # e.g. question_encoder=1e-5 (and ctx_encoder=... with train_context_encoder).
  config.group_learning_rates = ml_collections.ConfigDict()
  # Top-level parameters never updated, e.g. ("question_encoder",): the paper's "-Frozen" rows.
  config.frozen_groups = ()
  config.warmup_steps = 500  # Linear warm-up from 0.
  config.lr_end = 1e-7  # Polynomial decay target.
  config.lr_power = 1.0  # Polynomial decay power.
  config.weight_decay = 0.001  # AdamW weight decay (not on biases / BERT LayerNorms).
  config.max_grad_norm = 0.1  # Global-norm clipping.
  config.adam_b1 = 0.9  # AdamW beta1.
  config.adam_b2 = 0.999  # AdamW beta2.
  config.adam_eps = 1e-8  # AdamW epsilon.

  config.log_every = 50  # Steps between metric lines.
  config.eval_every = 1000  # Steps between held-out evaluations.
  config.checkpoint_every = 500  # Steps between orbax checkpoints.
  config.keep_checkpoints = 3  # Checkpoints kept on disk.
  return config
