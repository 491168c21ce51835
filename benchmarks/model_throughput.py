"""Generator throughput and bf16 accuracy: rag_jax's Flax BART against transformers' PyTorch BART.

Same random weights (built by transformers, loaded through rag_jax.checkpoints), same inputs, same
device. Measures one teacher-forced training step (forward + backward of the summed token NLL,
no optimizer) at RAG's shapes (batch x n_docs contexts of `--src` tokens, `--tgt` target tokens),
in fp32 and in bf16 (ours: bf16 compute with fp32 params; torch: autocast bf16), plus the bf16
logit error against fp32. Prints one JSON line per measurement.

  python benchmarks/model_throughput.py --preset large --batch 8 --n_docs 5 --src 128 --tgt 25
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.timing import median_seconds  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--preset", default="large", choices=["tiny", "base", "large"])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--n_docs", type=int, default=5)
  parser.add_argument("--src", type=int, default=128)
  parser.add_argument("--tgt", type=int, default=25)
  parser.add_argument("--iters", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--skip_torch", action="store_true")
  args = parser.parse_args()

  import torch
  import transformers

  from rag_jax.checkpoints import load_pretrained
  from rag_jax.models import presets

  ours_cfg = presets.generator_config(args.preset, dropout=0.0)
  hf = ours_cfg.to_hf()
  hf.pop("architectures"), hf.pop("model_type"), hf.pop("is_encoder_decoder")
  torch.manual_seed(0)
  torch_model = transformers.BartForConditionalGeneration(transformers.BartConfig(**hf)).eval()
  with tempfile.TemporaryDirectory() as d:
    torch_model.save_pretrained(d)
    model32, params = load_pretrained(d)
    model16, _ = load_pretrained(d, dtype=jnp.bfloat16)

  rows = args.batch * args.n_docs
  rng = np.random.default_rng(0)
  ids = rng.integers(3, ours_cfg.vocab_size, (rows, args.src)).astype(np.int32)
  mask = np.ones_like(ids)
  dec = rng.integers(3, ours_cfg.vocab_size, (rows, args.tgt)).astype(np.int32)
  device = jax.devices()[0]
  params = jax.device_put(params, device)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  base = {"preset": args.preset, "params": n_params, "rows": rows, "src": args.src,
          "tgt": args.tgt, "device": device.device_kind}

  def jax_step(model):
    def loss(p, ids, mask, dec):
      logits = model.apply({"params": p}, input_ids=ids, attention_mask=mask,
                           decoder_input_ids=dec).logits
      logp = jax.nn.log_softmax(logits, -1)
      return -jnp.take_along_axis(logp[:, :-1], dec[:, 1:, None], -1).sum()
    return jax.jit(jax.value_and_grad(loss))

  results = []
  for name, model in (("fp32", model32), ("bf16", model16)):
    step = jax_step(model)
    args_dev = [jax.device_put(x, device) for x in (ids, mask, dec)]
    t = median_seconds(lambda s=step, a=args_dev: jax.block_until_ready(s(params, *a)),
                     args.iters, args.warmup)
    results.append({**base, "impl": "rag_jax", "dtype": name, "step_s": t,
                    "questions_per_s": args.batch / t})
    print(json.dumps(results[-1]), flush=True)

  # bf16 accuracy against fp32, on the same inputs.
  fwd = {n: jax.jit(lambda p, m=m: m.apply({"params": p}, input_ids=ids[:8],
                                            attention_mask=mask[:8],
                                            decoder_input_ids=dec[:8]).logits)
         for n, m in (("fp32", model32), ("bf16", model16))}
  l32, l16 = (np.asarray(fwd[n](params)) for n in ("fp32", "bf16"))
  acc = {**base, "measure": "bf16_vs_fp32_logits", "max_abs_diff": float(np.abs(l16 - l32).max()),
         "logit_std": float(l32.std()),
         "argmax_agreement": float((l16.argmax(-1) == l32.argmax(-1)).mean())}
  print(json.dumps(acc), flush=True)

  if args.skip_torch:
    return
  cuda = torch.cuda.is_available()
  tdev = torch.device("cuda" if cuda else "cpu")
  torch_model = torch_model.to(tdev).train(False)
  tids, tmask, tdec = (torch.from_numpy(x.astype(np.int64)).to(tdev) for x in (ids, mask, dec))
  for name in ("fp32", "bf16"):
    def torch_step(name=name):
      torch_model.zero_grad(set_to_none=True)
      with torch.autocast(tdev.type, dtype=torch.bfloat16, enabled=name == "bf16"):
        logits = torch_model(input_ids=tids, attention_mask=tmask, decoder_input_ids=tdec).logits
      logp = torch.log_softmax(logits.float(), -1)
      loss = -logp[:, :-1].gather(-1, tdec[:, 1:, None]).sum()
      loss.backward()
      if cuda:
        torch.cuda.synchronize()
    t = median_seconds(torch_step, args.iters, args.warmup)
    results.append({**base, "impl": "transformers_torch", "dtype": name, "step_s": t,
                    "questions_per_s": args.batch / t})
    print(json.dumps(results[-1]), flush=True)
  for name in ("fp32", "bf16"):
    ours = next(r for r in results if r["impl"] == "rag_jax" and r["dtype"] == name)
    peer = next(r for r in results if r["impl"] != "rag_jax" and r["dtype"] == name)
    print(json.dumps({"dtype": name, "speedup_vs_transformers": peer["step_s"] / ours["step_s"]}))


if __name__ == "__main__":
  main()
