"""Throughput of a real model (SmolLM2-135M, Gemma 3 270M) on evaluation windows, against a
dense matmul, and the LM head's share of it.

Times the jitted next-token NLL (forward + log-softmax) on `--batch` windows of `--ctx` tokens
(best of `--repeats` after a compiling call), reports tokens/s, and the achieved FLOP rate as a
fraction of a jitted float32 matmul's on this machine (FLOPs counted analytically: 2 per weight
per token for every matmul including the tied LM head, plus 4·t·d per layer for attention).
The head's share: the same model with its vocabulary cut to `CUT_VOCAB` rows (token ids taken
modulo it) timed in the same run; 1 − its time / the full time.

  python benchmarks/model_throughput.py [--model smollm2|gemma3-270m] [--batch 4] [--ctx 512]
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp

from attnprune_jax import data, models
from attnprune_jax.evaluate import next_token_nll
from timing import best_time

CUT_VOCAB = 4096


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="smollm2")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--ctx", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  start = time.perf_counter()
  model = models.load(args.model)
  load_s = time.perf_counter() - start
  c = model.config
  windows = jnp.asarray(data.evaluation_windows(model.tokenizer, count=args.batch, ctx=args.ctx))
  weights = model.weights()
  run = lambda: next_token_nll(weights, windows, c)
  start = time.perf_counter()
  jax.block_until_ready(run())
  compile_s = time.perf_counter() - start
  seconds = best_time(run, args.repeats, warmup=False)
  tokens = args.batch * args.ctx

  d, hd = c.hidden_size, c.head_dim
  per_layer = (c.num_heads * hd * d * 2 + c.num_kv_heads * hd * d * 2
               + 3 * c.intermediate_size * d)
  flops_per_token = 2 * (c.num_layers * per_layer + c.vocab_size * d) \
      + c.num_layers * 4 * args.ctx * c.num_heads * hd // 2  # causal: half the t×t work
  rate = flops_per_token * tokens / seconds
  a = jnp.ones((args.ctx * args.batch, d), jnp.float32)
  b = jnp.ones((d, c.intermediate_size), jnp.float32)
  cut = dataclasses.replace(c, vocab_size=CUT_VOCAB)
  cut_weights = weights | {"embed_tokens": weights["embed_tokens"][:CUT_VOCAB]}
  cut_seconds = best_time(lambda: next_token_nll(cut_weights, windows % CUT_VOCAB, cut),
                          args.repeats)
  matmul = jax.jit(jnp.matmul)
  matmul_seconds = best_time(lambda: matmul(a, b), args.repeats)
  matmul_rate = 2 * a.shape[0] * d * b.shape[1] / matmul_seconds

  print(f"{args.model}, {args.batch} windows x {args.ctx} tokens, devices {jax.devices()}")
  print(f"  load {load_s:.1f} s, first call (compile + run) {compile_s:.1f} s")
  print(f"  {seconds:.2f} s per batch: {tokens / seconds:.0f} tokens/s")
  print(f"  {rate / 1e9:.1f} GFLOP/s vs. matmul ({a.shape[0]}x{d})@({d}x{b.shape[1]}) "
        f"{matmul_rate / 1e9:.1f} GFLOP/s: ratio {rate / matmul_rate:.2f}")
  print(f"  vocabulary cut to {CUT_VOCAB}: {cut_seconds:.2f} s per batch; the {c.vocab_size}-row "
        f"head and its softmax take {1 - cut_seconds / seconds:.0%} of the time")


if __name__ == "__main__":
  main()
