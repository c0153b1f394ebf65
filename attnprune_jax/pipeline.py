"""Layer-sequential pruning of a model's linear layers, resumable layer by layer.

As the baselines' reference code does: for each layer (decoder block) in order, take the inputs
of its target linears from the current (already pruned) model, prune them, write the new weights
back, and run the pruned block so the next one sees pruned inputs. q_proj and k_proj are pruned
with a method of `methods` (attention-aware or a baseline); the other targets (v/o_proj, the
MLP's gate/up/down_proj) with a baseline. By default every target's inputs come from one forward
of the block with its dense weights (Wanda's protocol); with `true_sequential` the block's groups
q/k/v, o, gate/up, down are pruned in that order, each from the block with the groups before it
already pruned (SparseGPT's `--true-sequential`). Along the way it measures, per layer, the
attention error on held-out windows:

- `attention_error`: Σ_h ‖A_h(pruned q/k) − A_h(dense q/k)‖²_F on the layer's held-out inputs
  as the pruned model produces them (what the attention-aware methods optimize), mean over
  held-out windows;
- `attention_error_end_to_end`: the same against the dense model's attention on its own inputs
  (upstream errors included).

Only the layers up to the last pruned one are run: nothing after it changes. The model itself
is never modified: the result holds replacement weights for `Llama.weights`. With a `RunFolder`
the state after every pruned layer is saved there, and a rerun resumes after the last finished
one with identical results.
"""

import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attnprune_jax import allocation, numerics, sharding
from attnprune_jax.baselines import input_stats
from attnprune_jax.baselines.wanda import wanda_score
from attnprune_jax.errors import DivergenceError, InputError
from attnprune_jax.layer_masks import LayerPruning
from attnprune_jax.methods import Method
from attnprune_jax.models.llama import (LINEAR_INPUTS, Llama, LlamaConfig, attention_block,
                                        attention_input, check_token_ids, decoder_layer, embed,
                                        layer_attention_args, layer_weights, linear_inputs,
                                        mlp_block)
from attnprune_jax.objective import layer_attention_error
from attnprune_jax.reporting import Reporter
from attnprune_jax.results import fingerprint, model_fingerprint
from attnprune_jax.run_folder import RunFolder
from attnprune_jax.settings import QK, TARGETS, PruneSettings
from attnprune_jax.solver import default_block


class PrunedModel(NamedTuple):
  """Result of `prune_model`.

  Attributes:
    weights: replacements {target: (layers, out, in)} for `Llama.weights`, one per name of
      `TARGETS[settings.targets]`.
    layers: one record per layer, in order: {"layer", "pruned", "attention_error",
      "attention_error_end_to_end", "prune_time_s", "kept", "kept_q", "kept_k", "loss_first",
      "loss_last"} (the last six only for pruned layers; "kept" is {target: entries kept},
      "kept_q"/"kept_k" the fractions kept of q/k; the losses are the solver's minibatch
      losses at its first and last optimizer step, None for the baselines; prune_time_s
      includes compilation, which falls on the first pruned layer).
  """
  weights: dict
  layers: list[dict]


_embed = jax.jit(embed, static_argnames="config")


_run_layer = jax.jit(decoder_layer, static_argnames="config")


@functools.partial(jax.jit, static_argnames="config")
def _teacher(hidden, layer: dict, config: LlamaConfig, index):
  """The dense block's residual stream (after its attention half, after the block)."""
  mid = attention_block(hidden, layer, config, index)[0]
  return mid, mlp_block(mid, layer, config)[0]
_attention_input = jax.jit(attention_input, static_argnames="config")
_linear_inputs = jax.jit(linear_inputs, static_argnames="config")
_attention_error = jax.jit(layer_attention_error, static_argnames=(
    "head_dim", "rope", "block", "window", "scale", "norm_eps"))


def sparsity_summary(config: LlamaConfig, records: list[dict]) -> dict:
  """Fractions of entries removed, from `PrunedModel.layers`.

  Returns:
    {"per_target": {target: removed / entries of that target in the pruned layers},
     "linear": removed / entries of all decoder linears (every layer, every family),
     "model": removed / every parameter (embeddings, norms and LM head included)}.
  """
  shapes = config.weight_shapes()
  size = lambda name: int(np.prod(shapes[name][1:]))
  pruned = [record for record in records if record["pruned"]]
  targets = sorted({t for record in pruned for t in record["kept"]},
                   key=list(TARGETS["all"]).index)
  removed = {t: sum(size(t) - record["kept"][t] for record in pruned) for t in targets}
  linears = config.num_layers * sum(size(name) for name in TARGETS["all"])
  total = sum(int(np.prod(shape)) for shape in shapes.values())
  return {"per_target": {t: removed[t] / (size(t) * len(pruned)) for t in targets},
          "linear": sum(removed.values()) / linears, "model": sum(removed.values()) / total}


def prune_linear(method: Method, w, stats, sparsity: float,
                 n_m: tuple[int, int] | None) -> tuple[jax.Array, jax.Array]:
  """Prunes one linear w (out, in) with a "linear" method from its inputs' statistics.

  Returns:
    (new weight in w's dtype, mask (out, in), True = kept).
  """
  new, keep = method.prune(w, stats, sparsity, n_m)
  return new.astype(w.dtype), keep


def prune_qk(method: Method, q_proj, k_proj, x, *, sparsity: float,
             n_m: tuple[int, int] | None, config: LlamaConfig, attention: dict, solver=None,
             stats=None, devices=None) -> LayerPruning:
  """Prunes one layer's q_proj (heads·hd, d) and k_proj (kv_heads·hd, d) from its calibration
  attention inputs x (windows, t, d): a "qk" method solves the two together (sharded over
  `devices`, if given); a "linear" one prunes each on its own from `stats` (the statistics of
  x, computed if None). `attention`: the layer's `layer_attention_args`. Returns a
  `LayerPruning`, whose loss is empty for a linear method."""
  if method.kind == "qk":
    mesh = None if devices is None else sharding.problem_mesh(
        config.num_kv_heads, solver.windows_per_step, devices)
    return method.prune(q_proj, k_proj, x, sparsity=sparsity, n_m=n_m, config=config,
                        solver=solver, mesh=mesh, attention=attention)
  if stats is None:
    stats = input_stats(x.reshape(-1, x.shape[-1]), gram=method.needs_gram)
  new_q, keep_q = prune_linear(method, q_proj, stats, sparsity, n_m)
  new_k, keep_k = prune_linear(method, k_proj, stats, sparsity, n_m)
  return LayerPruning(new_q, new_k, keep_q, keep_k, jnp.zeros((0,), jnp.float32))


def layer_sparsities(dense: dict, config: LlamaConfig, settings: PruneSettings,
                     calibration) -> dict[int, float]:
  """The sparsity of each layer of `settings.layers` (resolved for the model) under
  `settings.allocation`; for "owl", from the Wanda scores of the targets on the dense model's
  calibration inputs (see `allocation`)."""
  if settings.allocation == "uniform":
    return {index: settings.sparsity_of(index) for index in settings.layers}
  targets = TARGETS[settings.targets]
  hidden, ratios = _embed(dense, jnp.asarray(calibration), config), []
  for index in range(settings.layers[-1] + 1):
    layer = layer_weights(dense, index)
    if index in settings.layers:
      inputs = _linear_inputs(hidden, layer, config, index)
      stats = {source: input_stats(inputs[source].reshape(-1, inputs[source].shape[-1]),
                                   gram=False) for source in {LINEAR_INPUTS[t] for t in targets}}
      ratios.append(allocation.outlier_ratio(
          [wanda_score(layer[t], stats[LINEAR_INPUTS[t]]) for t in targets]))
    if index < settings.layers[-1]:
      hidden, _, _ = _run_layer(hidden, layer, config, index)
  shapes = config.weight_shapes()
  sparsities = allocation.quantized_sparsities(
      allocation.owl_densities(ratios, settings.sparsity), settings.sparsity,
      [shapes[t][-1] for t in targets])
  return dict(zip(settings.layers, sparsities))


def _prune_block(settings: PruneSettings, index: int, block: dict, hidden, config: LlamaConfig,
                 devices, sparsity: float, teacher=None):
  """Prunes layer `index`'s targets at `sparsity` from calibration `hidden` (b, t, d)
  entering its block.

  Each group's inputs come from one forward of the block; the statistics of each input (with
  the Gram matrix if one of its linears needs it) are computed once per group.

  A "block" method prunes every target at once from `hidden` (with the dense model's stream
  `teacher` after each half, if its solver fits to it).

  Returns (pruned targets by name, entries kept by name, the solver's losses).
  """
  method = settings.method_of(QK[0])
  if method.kind == "block":
    result = method.prune(block, hidden, targets=TARGETS[settings.targets], sparsity=sparsity,
                          n_m=settings.n_m, config=config, solver=settings.solver,
                          teacher=teacher, index=index)
    return ({name: w.astype(block[name].dtype) for name, w in result.weights.items()},
            result.keep, result.loss)
  new, kept, losses = {}, {}, jnp.zeros((0,))
  for group in settings.groups():
    if {LINEAR_INPUTS[target] for target in group} == {"attention"}:  # no need of the rest
      inputs = {"attention": _attention_input(hidden, block, config)}
    else:
      inputs = _linear_inputs(hidden, block, config, index)
    linear = [t for t in group if settings.method_of(t).kind == "linear"]
    stats = {}
    for source in dict.fromkeys(LINEAR_INPUTS[t] for t in linear):
      x = inputs[source]
      gram = any(settings.method_of(t).needs_gram for t in linear if LINEAR_INPUTS[t] == source)
      stats[source] = input_stats(x.reshape(-1, x.shape[-1]), gram=gram)
    if QK[0] in group:
      result = prune_qk(settings.method_of(QK[0]), block["q_proj"], block["k_proj"],
                        inputs["attention"], sparsity=sparsity, n_m=settings.n_m, config=config,
                        solver=settings.solver, stats=stats.get("attention"), devices=devices,
                        attention=layer_attention_args(block, config, index))
      losses = result.loss
      new |= {"q_proj": result.q_proj.astype(block["q_proj"].dtype),
              "k_proj": result.k_proj.astype(block["k_proj"].dtype)}
      kept |= {"q_proj": result.keep_q, "k_proj": result.keep_k}
    for target in (t for t in group if t not in QK):
      new[target], kept[target] = prune_linear(settings.method_of(target), block[target],
                                               stats[LINEAR_INPUTS[target]], sparsity,
                                               settings.n_m)
    block = block | new
  return new, kept, losses


def checkpoint_key(settings: PruneSettings, calibration, heldout, model_key: str) -> dict:
  """What a layer checkpoint is reused for: the same settings, windows, model (`model_key`,
  `results.model_fingerprint`) and numerics version."""
  return {"settings": settings.to_json(), "data": fingerprint(calibration, heldout),
          "model": model_key, "numerics": numerics.PRUNING}


def prune_model(model: Llama, settings: PruneSettings, calibration, heldout, *,
                folder: RunFolder | None = None, model_key: str | None = None,
                reporter: Reporter = Reporter(quiet=True), devices=None) -> PrunedModel:
  """Prunes the targets of `settings.layers`, layer after layer, with re-propagation.

  Args:
    model: the dense model (left unchanged).
    settings: methods, sparsity, pattern, layers, targets, solver settings.
    calibration: (windows, t) int tokens the methods see.
    heldout: (windows, t) int tokens for the attention errors (never given to a method).
    folder: if given, the state after every pruned layer is saved there (`RunFolder`) and a
      rerun of the same run resumes after the last finished layer, with identical results.
    model_key: `results.model_fingerprint(model)`, if the caller has it (it takes a second).
    reporter: a progress bar per layer.
    devices: devices that share each layer's attention-aware solve (`prune_qk`); the layers
      stay in order. None: one device.
  Returns:
    a `PrunedModel` (replacement weights and per-layer records, up to the last pruned layer).
  """
  config: LlamaConfig = model.config
  if devices is not None:
    devices = sharding.check_devices(devices)
  settings = settings.for_model(config)
  for name, windows in (("calibration", calibration), ("heldout", heldout)):
    windows = np.asarray(windows)
    if windows.ndim != 2 or 0 in windows.shape or not np.issubdtype(windows.dtype, np.integer):
      raise InputError(f"{name} must be integer token windows (windows >= 1, t >= 1), got "
                       f"{windows.dtype} {windows.shape}")
    check_token_ids(name, windows, config.vocab_size)
  settings.check_windows(len(calibration))
  targets = TARGETS[settings.targets]
  dense = model.weights()
  # Host copies written layer by layer in place (a JAX `.at[].set` would copy each stack).
  weights = {name: np.array(dense[name]) for name in targets}
  sparsities = layer_sparsities(dense, config, settings, calibration)
  records: list[dict] = []
  if folder is not None:
    key = checkpoint_key(settings, calibration, heldout,
                         model_key or model_fingerprint(model))
    resumed = folder.resume(key, {name: (weights[name].shape[1:], weights[name].dtype)
                                  for name in targets}, reporter)
    if resumed is not None:
      records, layers = resumed
      for index, layer in layers.items():
        for name, value in layer.items():
          weights[name][index] = value
      reporter.info(f"resuming after layer {len(records) - 1} from {folder.state}")
  calibration, heldout = jnp.asarray(calibration), jnp.asarray(heldout)
  hidden = _embed(dense, calibration, config)
  # The dense model's calibration stream, for the methods that fit blocks to it.
  fits_teacher = getattr(settings.solver, "target", None) == "teacher"
  teacher_hidden = hidden if fits_teacher else None
  heldout_hidden = _embed(dense, heldout, config)
  dense_hidden = heldout_hidden
  block = default_block(heldout.shape[1])
  last = settings.layers[-1] + 1  # nothing after the last pruned layer changes
  bar = reporter.progress(range(last), total=last, desc=f"{settings.name} layers")
  for index in bar:
    layer = layer_weights(dense, index)
    done = index < len(records)
    record = records[index] if done else {"layer": index, "pruned": index in settings.layers}
    if record["pruned"] and not done:
      start = time.perf_counter()
      try:
        teacher = (None if teacher_hidden is None
                   else _teacher(teacher_hidden, layer, config, index))
        new, kept, losses = _prune_block(settings, index, layer, hidden, config, devices,
                                         sparsities[index], teacher)
      except DivergenceError as err:
        raise DivergenceError(f"layer {index}: {err}; nothing was written for this layer, "
                              "the layers before it are in the checkpoint") from None
      jax.block_until_ready(new)
      if not all(bool(jnp.isfinite(a).all()) for a in (*new.values(), losses)):
        # Inputs are finite and the solver checks itself: this is a bug, not bad input.
        raise RuntimeError(f"{settings.name} produced NaN or Inf weights or losses in layer "
                           f"{index} from finite inputs; nothing was written for this layer")
      new = {name: np.asarray(value) for name, value in new.items()}
      for name in targets:
        weights[name][index] = new[name]
      record |= {"prune_time_s": time.perf_counter() - start,
                 "sparsity": sparsities[index],
                 "kept": {name: int(np.sum(kept[name])) for name in targets},
                 "kept_q": float(np.mean(kept["q_proj"])),
                 "kept_k": float(np.mean(kept["k_proj"])),
                 "loss_first": float(losses[0]) if losses.size else None,
                 "loss_last": float(losses[-1]) if losses.size else None}
    pruned_layer = layer | {name: jnp.asarray(weights[name][index]) for name in targets}
    if index + 1 < last:  # the next layer's calibration inputs
      new_hidden, _, _ = _run_layer(hidden, pruned_layer, config, index)
      if teacher_hidden is not None:  # equal to the pruned stream before the first pruned layer
        teacher_hidden = (new_hidden if index < settings.layers[0]
                          else _run_layer(teacher_hidden, layer, config, index)[0])
      hidden = new_hidden
    new_heldout, heldout_inputs, heldout_probs = _run_layer(heldout_hidden, pruned_layer, config,
                                                            index)
    if index < settings.layers[0]:  # nothing pruned yet: the pruned model's pass is the dense one
      dense_hidden, dense_probs = new_heldout, heldout_probs
    else:
      dense_hidden, _, dense_probs = _run_layer(dense_hidden, layer, config, index)
    if not done:
      # An unpruned layer keeps its dense q/k: its local error is 0 by definition.
      local = 0.0 if not record["pruned"] else float(jnp.mean(_attention_error(
          pruned_layer["q_proj"], pruned_layer["k_proj"], layer["q_proj"], layer["k_proj"],
          heldout_inputs, block=block, **layer_attention_args(layer, config, index))))
      record |= {"attention_error": local,
                 "attention_error_end_to_end": float(jnp.mean(
                     jnp.sum((heldout_probs - dense_probs)**2, axis=(-3, -2, -1))))}
      records.append(record)
      if folder is not None and record["pruned"]:
        folder.save_layer(key, index, {name: weights[name][index] for name in targets}, records)
    heldout_hidden = new_heldout
  return PrunedModel({name: jnp.asarray(value) for name, value in weights.items()}, records)
