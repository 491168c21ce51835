#!/usr/bin/env bash
# benchmark.py at the paper's shapes (BERT-base + BART-large, 8 questions x 5 passages x 300
# tokens, bf16) on one GPU, in parts of five to seven minutes each on an H100 / H200,
# ordered by what they decide (docs/benchmarks.md, "On an accelerator"):
#
#   bash benchmarks/accelerator.sh OUT 1           # the RAG-Sequence training step with XLA's and
#                                                  # cuDNN's attention against transformers: MFU
#   bash benchmarks/accelerator.sh OUT 2 [ATTN]    # generation against transformers (thorough at
#                                                  # the default rescoring calls and at one call
#                                                  # each); the largest training batch, rag_jax
#                                                  # and torch
#   bash benchmarks/accelerator.sh OUT 3 [ATTN]    # where the time goes, CUDA graphs off: the
#                                                  # step's and the exact device search's profiles
#
# ATTN (xla or cudnn, default cudnn) is rag_jax's attention for parts 2 and 3: the faster of part
# 1's two rows. Each part writes OUT/partN/paper.json (after every finished group, so a part
# stopped early keeps what finished) and OUT/partN/benchmark.log, and starts no group past its
# time budget. The BART-large step takes about two minutes to compile; the parts share a
# persistent compilation cache (RAG_JAX_BENCH_CACHE, default /tmp/rag_jax_benchmark_cache), so
# part 2, run on the same machine after part 1, loads part 1's step (for the largest-batch
# prediction) instead of compiling it again. Part 3 turns CUDA graphs off (XLA_FLAGS) so that
# the profile attributes every kernel to its HLO instruction; its timings are therefore not the
# speed figures (the step is ~15 % slower without CUDA graphs). RAG_JAX_BENCH_PRESET=tiny runs
# the same parts at the tiny preset, e.g. to try the script on a CPU in a minute.
set -euo pipefail

usage="usage: bash benchmarks/accelerator.sh OUT_DIR {1|2|3} [xla|cudnn]"
out=${1:?$usage}
part=${2:?$usage}
attention=${3:-cudnn}
case $attention in xla|cudnn) ;; *) echo "$usage" >&2; exit 2 ;; esac

cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${RAG_JAX_BENCH_CACHE:-/tmp/rag_jax_benchmark_cache}
python=${PYTHON:-python3}
preset=${RAG_JAX_BENCH_PRESET:-paper}
common=(--preset="$preset" --repeats=3 --warmup=1)
if [[ $preset == paper ]]; then common+=(--n_docs=5); fi

case $part in
  1)
    "$python" benchmark.py "${common[@]}" --workloads=train --train_kinds=rag_sequence \
      --attention=xla,cudnn --time_budget_s=400 --workdir="$out/part1"
    ;;
  2)
    "$python" benchmark.py "${common[@]}" --workloads=generate --rescore=auto:auto,all:all \
      --max_batch --attention="$attention" --time_budget_s=360 --workdir="$out/part2"
    ;;
  3)
    XLA_FLAGS=--xla_gpu_enable_command_buffer= "$python" benchmark.py "${common[@]}" \
      --workloads=train,retrieval --train_kinds=rag_sequence --attention="$attention" \
      --profile=2 --time_budget_s=300 --workdir="$out/part3"
    ;;
  *)
    echo "$usage" >&2
    exit 2
    ;;
esac
