"""Memory and time of a 1B-parameter Hugging Face checkpoint on this machine: load, prune one
layer, evaluate one window, save the pruned model.

Writes (once, reused afterwards) a random checkpoint of Llama 3.2-1B's shape and layout: 16
layers, d = 2048, FFN 8192, 32 query / 8 KV heads of 64, llama3 RoPE scaling (factor 32, θ = 5e5),
tied embeddings, vocabulary 128,256, bfloat16 tensors in one model.safetensors (2.5 GB), with
SmolLM2's tokenizer standing in for Llama's (token ids < 49,152). Then, in a fresh process
whose peak resident memory (Linux VmHWM) is read after each phase:
  1. `models.load(folder)`;
  2. `pipeline.prune_model` with one pruned layer (the middle one) on `attnprune prune`'s
     default calibration (8 Emma windows × 512, 4 held-out): the whole layer-sequential pass,
     with all 16 layers re-propagated and their held-out attention errors measured;
  3. `evaluate.perplexity` on one 512-token window;
  4. `models.save` of the pruned model (what `--save-weights` writes), then deleted.
Ratios: peaks against the float32 model's size, load time against safetensors' own whole-file
load of the same file (with a float32 cast), timed afterwards in the parent process. A
whole-model prune costs about the one-layer solve time × 16 plus the propagation.

  python benchmarks/large_checkpoint.py [--folder /tmp/attnprune-llama-1b] [--method wanda]
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

GIB = 2**30
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
    "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 64, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "vocab_size": 128256,
    "tie_word_embeddings": True, "hidden_act": "silu", "torch_dtype": "bfloat16",
    "bos_token_id": 1, "eos_token_id": 2,
}


def peak() -> float:
  """This process's peak resident memory so far (VmHWM), GiB."""
  status = Path("/proc/self/status").read_text()
  return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024 / GIB


def write_checkpoint(folder: Path) -> None:
  """The random bfloat16 checkpoint, written into a temporary sibling and renamed."""
  import ml_dtypes
  import safetensors.numpy

  from attnprune_jax import models
  from attnprune_jax.models.huggingface import tensor_name
  from attnprune_jax.models.llama import LAYER_WEIGHTS
  config = LLAMA_3_2_1B
  d, f, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
  q, kv = config["num_attention_heads"] * 64, config["num_key_value_heads"] * 64
  shapes = {"input_layernorm": (d,), "q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d),
            "o_proj": (d, q), "post_attention_layernorm": (d,), "gate_proj": (f, d),
            "up_proj": (f, d), "down_proj": (d, f)}
  rng = np.random.default_rng(0)

  def draw(shape, norm=False):
    values = 1 + 0.1 * rng.standard_normal(shape, np.float32) if norm else \
        0.02 * rng.standard_normal(shape, np.float32)
    return values.astype(ml_dtypes.bfloat16)

  tensors = {tensor_name("embed_tokens"): draw((config["vocab_size"], d)),
             tensor_name("norm"): draw((d,), norm=True)}
  for layer in range(layers):
    for name in LAYER_WEIGHTS:
      tensors[tensor_name(name, layer)] = draw(shapes[name], norm=name.endswith("norm"))
  staging = folder.with_name(folder.name + ".tmp")
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir(parents=True)
  (staging / "config.json").write_text(json.dumps(config, indent=2))
  safetensors.numpy.save_file(tensors, staging / "model.safetensors", metadata={"format": "pt"})
  tokenizer = models.load("smollm2").tokenizer
  (staging / "tokenizer.json").write_text(tokenizer.to_json_str())
  staging.rename(folder)


def measure(folder: Path, method: str) -> dict:
  """The three phases in this process; times in s, peaks in GiB."""
  import jax

  from attnprune_jax import data, evaluate, models
  from attnprune_jax.pipeline import prune_model
  from attnprune_jax.runs import token_windows as windows
  from attnprune_jax.settings import DataConfig, PruneSettings
  result = {"method": method, "start_peak_gib": peak()}
  start = time.perf_counter()
  model = models.load(folder)
  jax.block_until_ready(model.weights())
  result |= {"load_s": time.perf_counter() - start, "load_peak_gib": peak()}
  token_windows = windows(model, DataConfig())
  layer = model.config.num_layers // 2
  start = time.perf_counter()
  pruned = prune_model(model, PruneSettings(method, 0.5, None, (layer,)),
                       token_windows["calibration"], token_windows["heldout"])
  jax.block_until_ready(pruned.weights)
  record = pruned.layers[layer]
  result |= {"prune_s": time.perf_counter() - start, "layer": layer,
             "layer_solve_s": record["prune_time_s"], "prune_peak_gib": peak()}
  window = data.evaluation_windows(model.tokenizer, count=1, ctx=512)
  start = time.perf_counter()
  ppl = evaluate.perplexity(model, window, weights=pruned.weights)
  result |= {"eval_s": time.perf_counter() - start, "perplexity": ppl["perplexity"],
             "eval_peak_gib": peak()}
  saved = folder.with_name(folder.name + "-pruned")
  shutil.rmtree(saved, ignore_errors=True)
  start = time.perf_counter()
  models.save(model, saved, weights=pruned.weights)
  result |= {"save_s": time.perf_counter() - start, "save_peak_gib": peak(),
             "saved_files": sorted(path.name for path in saved.iterdir())}
  shutil.rmtree(saved)
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--folder", type=Path, default=Path("/tmp/attnprune-llama-1b"))
  parser.add_argument("--method", default="attn-progressive")
  parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.measure:
    print(json.dumps(measure(args.folder, args.method)))
    return
  if not (args.folder / "model.safetensors").is_file():
    if args.folder.exists():
      parser.error(f"--folder {args.folder} exists but holds no model.safetensors")
    start = time.perf_counter()
    write_checkpoint(args.folder)
    print(f"wrote {args.folder} in {time.perf_counter() - start:.0f} s")
  size = (args.folder / "model.safetensors").stat().st_size / GIB
  run = subprocess.run([sys.executable, __file__, "--measure", "--folder", str(args.folder),
                        "--method", args.method], stdout=subprocess.PIPE, text=True)
  if run.returncode:
    sys.exit(f"the measuring process failed (exit {run.returncode}); its output is above")
  r = json.loads(run.stdout.strip().splitlines()[-1])
  print(json.dumps(r))  # the raw figures first, whatever happens below
  # Reference, in this process after the measured one has ended: the whole file read at once
  # by safetensors and converted to float32 (what a loader without per-tensor reads does).
  import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", which load_file asks for)
  import safetensors.numpy
  start = time.perf_counter()
  whole = {name: value.astype(np.float32) for name, value in
           safetensors.numpy.load_file(args.folder / "model.safetensors").items()}
  reference_s = time.perf_counter() - start
  model_gib = sum(value.nbytes for value in whole.values()) / GIB
  del whole
  print(f"Llama 3.2-1B-shaped random checkpoint, bfloat16, {size:.2f} GiB on disk; "
        f"method {r['method']} at 50 %")
  print(f"  load:     {r['load_s']:6.1f} s ({r['load_s'] / reference_s:.2f}x safetensors' "
        f"whole-file load + float32 cast, {reference_s:.1f} s), peak {r['load_peak_gib']:.2f} "
        f"GiB = {r['load_peak_gib'] / model_gib:.2f}x the float32 model ({model_gib:.2f} GiB; "
        f"process before: {r['start_peak_gib']:.2f} GiB)")
  print(f"  prune:    {r['prune_s']:6.1f} s for the 16-layer pass pruning layer {r['layer']} "
        f"(its solve {r['layer_solve_s']:.1f} s), peak {r['prune_peak_gib']:.2f} GiB = "
        f"{r['prune_peak_gib'] / model_gib:.2f}x the model")
  print(f"  evaluate: {r['eval_s']:6.1f} s for one 512-token window, peak "
        f"{r['eval_peak_gib']:.2f} GiB (perplexity {r['perplexity']:.0f}: random weights)")
  print(f"  save:     {r['save_s']:6.1f} s (models.save, as --save-weights), peak "
        f"{r['save_peak_gib']:.2f} GiB; files {', '.join(r['saved_files'])}")
  whole = r["prune_s"] + 15 * r["layer_solve_s"]
  print(f"  a whole-model q/k prune: about {whole / 60:.0f} min (one pass + 15 more solves)")


if __name__ == "__main__":
  main()
