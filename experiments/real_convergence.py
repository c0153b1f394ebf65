"""The convergence theory on real weights: Algorithm 1 on every query head of chosen layers of a
real model, measured with the synthetic experiment's core (`experiments.convergence`).

For layer l and query head h the merged problem is W_h = W_Q^h (W_K^{g(h)})ᵀ/√d_h (d × d, rank
≤ d_h; g(h) the KV head of h) with X the layer's post-RMSNorm attention inputs on calibration
windows of Emma, both taken from the dense model's own forward pass. Per layer: the grid of λ and
step sizes on all heads at once, binary masks scored on held-out Emma windows, how far the merged
attention f(W_h) (no RoPE) is from the attention the model computes, and a float64 cross-check.

Runs in float32, the model's precision; the checks use float32's rounding thresholds
(`convergence.ROUNDING`). Every finished layer is written atomically to DIR/layers/ with the
settings, the model and windows it came from and the numerics version (`numerics.REAL_CONVERGENCE`):
a rerun skips it.
All settings are our choice.
"""

import dataclasses
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import attnprune_jax as ap
from attnprune_jax import data, numerics
from attnprune_jax.attention import layer_attention
from attnprune_jax.errors import InputError
from attnprune_jax.models import Llama
from attnprune_jax.reporting import Reporter
from attnprune_jax.results import cached_result, fingerprint, model_fingerprint, reuse_record
from experiments import convergence
from experiments.configs import RealConfig


def default_layers(num_layers: int, count: int = 6) -> tuple[int, ...]:
  """`count` layers evenly spaced from the first to the last (fewer if the model has fewer)."""
  return tuple(sorted({round(i * (num_layers - 1) / max(count - 1, 1)) for i in range(count)}))


def merged_heads(q_proj, k_proj, *, num_heads: int, num_kv_heads: int, head_dim: int):
  """W_h = W_Q^h (W_K^{g(h)})ᵀ/√head_dim for every query head: (heads, d, d).

  X W_h Xᵀ are head h's attention scores without RoPE. Weights are (out, in) with rows in the
  Hugging Face order; query head h reads KV head g(h) = h // (num_heads / num_kv_heads).
  """
  q = jnp.asarray(q_proj).reshape(num_heads, head_dim, -1)
  k = jnp.repeat(jnp.asarray(k_proj).reshape(num_kv_heads, head_dim, -1),
                 num_heads // num_kv_heads, axis=0)
  return jnp.einsum("hed,hef->hdf", q, k) / jnp.sqrt(jnp.asarray(head_dim, q.dtype))


def token_windows(model: Llama, config: RealConfig) -> dict[str, np.ndarray]:
  """Calibration and held-out windows: consecutive, disjoint windows from the start of Emma."""
  emma = data.calibration_windows(model.tokenizer, count=config.windows + config.heldout_windows,
                                  ctx=config.ctx)
  return {"calibration": emma[:config.windows], "heldout": emma[config.windows:]}


def merged_vs_model(w, x, attention) -> list[dict]:
  """How far the merged attention f(W_h) is from the model's own (RoPE) attention A_h, per head.

  Args:
    w: (heads, d, d) merged weights; x: (b, n, d) the layer's attention inputs; attention:
      (b, heads, n, n) the model's attention probabilities on the same windows.
  Returns:
    per head: "gap" Σ_b‖f_b(W_h) − A_h‖²_F, "gap_relative" gap / Σ_b‖A_h‖²_F, and "row_tv", the
    mean over rows of the total-variation distance ½Σ_j|f − A| (0: same, 1: disjoint).
  """
  records = []
  for h, head in enumerate(w):
    merged, model = np.asarray(ap.attention_matrix(x, head)), np.asarray(attention[:, h])
    gap = float(np.sum((merged - model)**2))
    records.append({"head": h, "gap": gap, "gap_relative": gap / float(np.sum(model**2)),
                    "row_tv": float(np.mean(0.5 * np.abs(merged - model).sum(axis=-1)))})
  return records


def float64_check(w, x, runs: list[dict], *, steps: int) -> list[dict]:
  """The first `steps` steps of float32 `runs` (records of `convergence.convergence_runs`)
  solved again in float64: how far apart the recorded loss histories are.

  Args:
    w: (heads, d, d) merged weights; x: (b, n, d) their inputs; runs: the records to check
      ("head", "lam", "lr", "loss", "history_stride"), all of one λ.
  """
  heads = np.array([r["head"] for r in runs])
  with jax.enable_x64(True), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    solution = ap.solve_mask(jnp.asarray(w[heads], jnp.float64), jnp.asarray(x, jnp.float64),
                             lam=runs[0]["lam"], steps=steps,
                             lr=np.array([r["lr"] for r in runs]))
    loss64 = np.asarray(solution.loss)
  records = []
  for r, history in zip(runs, loss64):
    history = history[::r["history_stride"]]  # the steps the float32 record kept
    float32 = np.asarray(r["loss"][:history.size])
    records.append({"head": r["head"], "lam": r["lam"], "lr": r["lr"], "steps": steps,
                    "loss_max_relative_difference": float(
                        np.max(np.abs(float32 - history)) / abs(history[0]))})
  return records


def run_layer(config: RealConfig, model: Llama, layer: int, inputs: dict) -> dict:
  """Every measurement of one layer.

  Args:
    inputs: "x" (b, n, d) calibration attention inputs of this layer, "attention" (b, heads,
      n, n) the model's attention on them, "heldout" (b', n, d) held-out attention inputs.
  """
  start = time.perf_counter()
  c = model.config
  weights = model.weights()
  w = merged_heads(weights["q_proj"][layer], weights["k_proj"][layer], num_heads=c.num_heads,
                   num_kv_heads=c.num_kv_heads, head_dim=c.head_dim)
  x, key = inputs["x"], jax.random.key(layer)
  group = c.num_heads // c.num_kv_heads
  runs = []
  for lam in config.lams:
    for fraction in config.step_fractions:
      records = convergence.convergence_runs(
          w, x, lam=lam, step_fraction=fraction, causal=True, steps=config.steps,
          segments=config.segments, power_iters=config.power_iters,
          history_points=config.history_points, key=key)
      runs += [{"layer": layer, "head": h, "kv_head": h // group, **record}
               for h, record in enumerate(records)]
  sweep = convergence.sparsity_comparison(
      w, x, inputs["heldout"], sparsities=config.sparsities, attn_lam=config.attn_lam,
      attn_steps=config.attn_steps, progressive_lam=config.progressive_lam,
      progressive_rounds=config.progressive_rounds, progressive_steps=config.progressive_steps,
      power_iters=config.power_iters, key=key)
  # The float64 check re-solves the first setting of the grid on some heads.
  checked = [r for r in runs if (r["lam"], r["step_fraction"]) == (config.lams[0],
                                                                  config.step_fractions[0])
             and r["head"] in config.float64_heads]
  return {
      "layer": layer, "runs": runs, "sparsity_sweep": [{"layer": layer, **r} for r in sweep],
      "merged_vs_model": [{"layer": layer, **r}
                          for r in merged_vs_model(w, x, inputs["attention"])],
      "float64_check": [{"layer": layer, **r} for r in float64_check(
          w, x, checked, steps=min(config.float64_steps, config.steps))] if checked else [],
      "wall_time_s": time.perf_counter() - start,
  }


_layer_attention = jax.jit(layer_attention, static_argnames=("head_dim", "rope"))


def attention_inputs(model: Llama, windows: dict) -> dict[str, jax.Array]:
  """Every layer's attention inputs in the dense model's forward pass on the "calibration" and
  "heldout" windows, (layers, b, n, d) each."""
  return {kind: model(tokens, return_attention_inputs=True)[1]["attention_inputs"]
          for kind, tokens in windows.items()}


def layer_inputs(model: Llama, inputs: dict, layer: int) -> dict:
  """Layer `layer`'s problem from `attention_inputs`: "x" (b, n, d) and "heldout" (b', n, d), and
  "attention" (b, heads, n, n), the model's attention on the calibration windows (computed by
  `attention.layer_attention`, the function its layers call)."""
  c = model.config
  weights = model.weights()
  x = inputs["calibration"][layer]
  return {"x": x, "heldout": inputs["heldout"][layer],
          "attention": _layer_attention(x, weights["q_proj"][layer], weights["k_proj"][layer],
                                        head_dim=c.head_dim, rope=c.rope)}


def _layer_settings(config: RealConfig, model: Llama, windows: dict) -> dict:
  """What a stored layer depends on besides the numerics: the settings, the model, the windows."""
  settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "layers"}
  return settings | {"model": model_fingerprint(model),
                     "data": fingerprint(windows["calibration"], windows["heldout"])}


def run(model: Llama, config: RealConfig, out: Path, reporter: Reporter, *,
        windows: dict | None = None) -> dict:
  """Runs (or resumes) every layer of `config`; returns all records, the summary and, under
  "provenance", the numerics version and the stored layers reused, by the commit that made them.

  Args:
    windows: {"calibration", "heldout"} token windows; None takes them from Emma
      (`token_windows`), which needs the model's tokenizer.
  """
  out = Path(out)
  c = model.config
  layers = config.layers if config.layers is not None else default_layers(c.num_layers)
  for name, values, count in (("layers", layers, c.num_layers),
                              ("float64_heads", config.float64_heads, c.num_heads)):
    if not all(isinstance(v, int) and 0 <= v < count for v in values):
      raise InputError(f"{name} must be integers in [0, {count}), got {tuple(values)}")
  windows = token_windows(model, config) if windows is None else windows
  settings = _layer_settings(config, model, windows)
  inputs = {}  # the dense forward pass, run once if a layer is computed

  def compute(layer):
    if not inputs:
      inputs.update(attention_inputs(model, windows))
    return run_layer(config, model, layer, layer_inputs(model, inputs, layer))

  stored, origins = [], []
  for layer in reporter.progress(layers, desc="layers"):
    result, origin = cached_result(out / "layers" / f"layer{layer}.json", settings,
                                   numerics.REAL_CONVERGENCE, lambda: compute(layer))
    stored.append(result)
    origins.append(origin)
    reporter.info(f"layer {layer}: {len(result['runs'])} runs"
                  + (" (stored)" if origin is not None else
                     f" in {result['wall_time_s']:.0f} s"))
  results = {key: [record for layer in stored for record in layer[key]]
             for key in ("runs", "sparsity_sweep", "merged_vs_model", "float64_check")}
  return {"config": dataclasses.asdict(config) | {"layers": list(layers)},
          "golden": golden_sample(results["runs"]),
          "model": {"layers": c.num_layers, "heads": c.num_heads, "kv_heads": c.num_kv_heads,
                    "head_dim": c.head_dim, "hidden_size": c.hidden_size},
          **results, "summary": summarize(results),
          "provenance": {"numerics": numerics.REAL_CONVERGENCE,
                         "reused_layers": reuse_record(origins)}}


def golden_sample(runs: list[dict]) -> dict:
  """Head 0 of the first layer at the first setting of the grid: its coordinates and
  measurements, the sample of the committed figures that the tests recompute."""
  first = runs[0]
  return {key: first[key] for key in ("layer", "head", "lam", "step_fraction",
                                      "smoothness_measured", "smoothness_bound", "pl_xi",
                                      "rate_measured")} | {
      "loss_first": first["loss"][0], "loss_last": first["loss"][-1]}


def summarize(results: dict) -> dict:
  """The synthetic experiment's checks over all runs and per layer, the merged-vs-model gap and
  the float64 cross-check."""
  by_layer = {}
  for key in ("runs", "sparsity_sweep", "merged_vs_model"):
    for record in results[key]:
      by_layer.setdefault(record["layer"], {}).setdefault(key, []).append(record)
  per_layer = {}
  for layer, records in sorted(by_layer.items()):
    gaps = records.get("merged_vs_model", [])
    per_layer[str(layer)] = convergence.summarize(records.get("runs", []),
                                                  records.get("sparsity_sweep", [])) | {
        "heads": len(gaps),
        "smoothness_measured": convergence.value_range(
            [r["smoothness_measured"] for r in records.get("runs", [])]),
        "merged_vs_model_gap_relative": convergence.value_range(
            [r["gap_relative"] for r in gaps]),
        "merged_vs_model_row_tv_mean": float(np.mean([r["row_tv"] for r in gaps])) if gaps
                                       else None}
  checks = results["float64_check"]
  return convergence.summarize(results["runs"], results["sparsity_sweep"]) | {
      "heads": len(results["merged_vs_model"]),
      "merged_vs_model_row_tv": convergence.value_range(
          [r["row_tv"] for r in results["merged_vs_model"]]),
      "float64_loss_max_relative_difference": max(
          (r["loss_max_relative_difference"] for r in checks), default=None),
      "per_layer": per_layer,
  }
