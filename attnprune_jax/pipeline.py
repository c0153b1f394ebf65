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

The model itself is never modified: the result holds replacement weights for `Llama.weights`.
"""

import dataclasses
import hashlib
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attnprune_jax import sharding, validation
from attnprune_jax.baselines import BASELINES, input_stats
from attnprune_jax.errors import DivergenceError, InputError
from attnprune_jax.layer_masks import DEFAULTS, MaskSolverConfig
from attnprune_jax.masks import check_n_m, kept_count
from attnprune_jax.methods import METHODS, prune_linear, prune_qk
from attnprune_jax.models.llama import (LINEAR_INPUTS, Llama, LlamaConfig, attention_input,
                                        check_token_ids, decoder_layer, layer_weights,
                                        linear_inputs)
from attnprune_jax.objective import layer_attention_error
from attnprune_jax.reporting import Reporter
from attnprune_jax.results import code_fingerprint
from attnprune_jax.solver import BLOCKED_ABOVE, DEFAULT_BLOCK

QK = ("q_proj", "k_proj")
# The linears each `--targets` prunes in every chosen layer; embeddings and LM head stay dense.
TARGETS = {"qk": QK, "attention": QK + ("v_proj", "o_proj"),
           "all": QK + ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
# SparseGPT's --true-sequential order of a block's linears.
SEQUENTIAL_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"),
                     ("down_proj",))
CHECKPOINT = "checkpoint.json"
# The modules a pruned layer depends on: a checkpoint of other code is not resumed.
CODE = tuple(f"attnprune_jax.{name}" for name in (
    "attention", "objective", "solver", "masks", "layer_masks", "methods", "baselines", "models",
    "validation")) + (__name__,)


@dataclasses.dataclass(frozen=True)
class PruneSettings:
  """What to prune and how.

  Attributes:
    method: one of `methods.METHODS`, for q_proj and k_proj (and for the other targets if
      `rest` is None: then it must be a baseline).
    sparsity: fraction of every target's entries removed per output row, in [0, 1) (n/m for
      N:M).
    n_m: (n, m) structure along the input axis, or None for unstructured.
    layers: indices of the layers to prune (in increasing order).
    solver: settings of the attention-aware methods; None stands for `layer_masks.DEFAULTS`
      of the method and is replaced by them (baselines: None).
    targets: a key of `TARGETS`: "qk", "attention" (+ v/o_proj) or "all" (+ gate/up/down_proj).
    rest: the baseline (`baselines.BASELINES`) for the targets other than q/k, or None for
      `method` itself.
    true_sequential: prune a block's groups (`SEQUENTIAL_GROUPS`) one after the other, each
      from the inputs of the block with the groups before it pruned.
  """
  method: str
  sparsity: float
  n_m: tuple[int, int] | None = None
  layers: tuple[int, ...] = ()
  solver: MaskSolverConfig | None = None
  targets: str = "qk"
  rest: str | None = None
  true_sequential: bool = False

  def __post_init__(self):
    if self.method not in METHODS:
      raise InputError(f"method must be one of {METHODS}, got {self.method!r}")
    if self.solver is None and self.method in DEFAULTS:
      # Record the settings actually used, so results and checkpoints say what ran.
      object.__setattr__(self, "solver", DEFAULTS[self.method])
    validation.check_sparsity(self.sparsity)
    if list(self.layers) != sorted(set(self.layers)) or not self.layers:
      raise InputError(f"layers must be distinct indices in increasing order, got {self.layers}")
    if self.targets not in TARGETS:
      raise InputError(f"targets must be one of {tuple(TARGETS)}, got {self.targets!r}")
    if self.rest is not None and self.rest not in BASELINES:
      raise InputError(f"rest must be one of {tuple(BASELINES)}, got {self.rest!r}")
    if self.rest is not None and self.targets == "qk":
      raise InputError(f"rest={self.rest!r} prunes the targets beyond q/k; with targets 'qk' "
                       "there are none (choose targets 'attention' or 'all')")
    if self.targets != "qk" and self.rest is None and self.method not in BASELINES:
      raise InputError(f"{self.method} prunes only q_proj and k_proj: targets {self.targets!r} "
                       f"need a baseline for the other linears, one of {tuple(BASELINES)} (rest=; "
                       "prune --rest; reproduce --methods METHOD+BASELINE, e.g. "
                       "attn-progressive+wanda)")
    validation.check_bool("true_sequential", self.true_sequential)
    if self.true_sequential and self.targets == "qk":
      raise InputError("true_sequential orders a block's groups of linears; targets 'qk' are "
                       "one group (choose targets 'attention' or 'all')")

  @property
  def name(self) -> str:
    """The method, or 'method+rest' when the other targets have their own."""
    return self.method if self.rest is None else f"{self.method}+{self.rest}"

  def method_of(self, target: str) -> str:
    """The method that prunes `target` (a weight name of `TARGETS`)."""
    return self.method if target in QK or self.rest is None else self.rest

  def groups(self) -> tuple[tuple[str, ...], ...]:
    """The targets of a block in the order they are pruned, one group per forward."""
    targets = TARGETS[self.targets]
    if not self.true_sequential:
      return (targets,)
    return tuple(kept for group in SEQUENTIAL_GROUPS
                 if (kept := tuple(t for t in group if t in targets)))

  def check_shapes(self, config: LlamaConfig) -> None:
    """InputError unless every target's rows can take the pattern (M divides the input width;
    unstructured: a row keeps at least one entry)."""
    shapes = config.weight_shapes()
    for target in TARGETS[self.targets]:
      cols = shapes[target][-1]
      if self.n_m is not None:
        try:
          check_n_m(self.n_m, self.sparsity, cols)
        except InputError as err:
          raise InputError(f"{target}: {err}") from None
      elif kept_count(cols, self.sparsity) == 0:
        raise InputError(f"sparsity {self.sparsity:g} keeps none of the {cols} entries of a "
                         f"{target} row; a row must keep at least one")

  def to_json(self) -> dict:
    return {"method": self.method, "sparsity": self.sparsity,
            "n_m": None if self.n_m is None else list(self.n_m), "layers": list(self.layers),
            "solver": None if self.solver is None else dataclasses.asdict(self.solver),
            "targets": self.targets, "rest": self.rest,
            "true_sequential": self.true_sequential}


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


@jax.jit
def _embed(weights: dict, tokens):
  return weights["embed_tokens"][tokens]


_run_layer = jax.jit(decoder_layer, static_argnames="config")
_attention_input = jax.jit(attention_input, static_argnames="config")
_linear_inputs = jax.jit(linear_inputs, static_argnames="config")
_attention_error = jax.jit(layer_attention_error,
                           static_argnames=("head_dim", "rope", "block"))


def fingerprint(*arrays) -> str:
  """A SHA-256 of arrays' shapes, dtypes and bytes: what a checkpoint was computed from."""
  digest = hashlib.sha256()
  for array in arrays:
    array = np.ascontiguousarray(np.asarray(array))
    digest.update(f"{array.shape}{array.dtype}".encode())
    digest.update(array.reshape(-1).view(np.uint8))  # the bytes, hashed in place: no copy
  return digest.hexdigest()


def model_fingerprint(model: Llama) -> str:
  """A SHA-256 of a model's architecture (its `LlamaConfig`, RoPE scaling included) and
  weights: what a stored result was computed from."""
  weights = model.weights()
  return fingerprint(np.frombuffer(repr(model.config).encode(), np.uint8),
                     *(weights[name] for name in sorted(weights)))


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


def _layer_file(folder: Path, index: int) -> Path:
  return folder / f"layer-{index:03d}.npz"


def _write_atomic(path: Path, write) -> None:
  """Calls write(handle) on a temporary file beside `path`, then renames it to `path`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                   delete=False) as handle:
    write(handle)
    handle.flush()
    os.fsync(handle.fileno())
  os.replace(handle.name, path)


def _write_checkpoint(folder: Path, key: dict, index: int, layer: dict, records: list):
  """Saves layer `index`'s pruned targets, then the per-layer records (the state that makes
  them count): each file atomic."""
  _write_atomic(_layer_file(folder, index), lambda handle: np.savez(handle, **layer))
  _write_atomic(folder / CHECKPOINT, lambda handle: handle.write(
      json.dumps({"key": key, "layers": records}).encode()))


def _read_state(folder: Path, reporter: Reporter):
  """(key, records) of the checkpoint in `folder`, or None."""
  path = folder / CHECKPOINT
  if not path.is_file():
    return None
  try:
    state = json.loads(path.read_text())
    return state.get("key") or {}, state["layers"]
  except (OSError, UnicodeDecodeError, ValueError, KeyError, AttributeError, TypeError) as err:
    reporter.info(f"ignoring the unreadable checkpoint {path}: {err}")
    return None


# What a missing, truncated or foreign layer file raises in np.load.
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def _read_layers(folder: Path, records: list, targets) -> dict[int, dict]:
  """The pruned targets of every finished pruned layer, by layer index."""
  layers = {}
  for record in records:
    if record["pruned"]:
      with np.load(_layer_file(folder, record["layer"])) as stored:
        layers[record["layer"]] = {name: stored[name] for name in targets}
  return layers


def _put_layers(weights: dict, layers: dict[int, dict]) -> None:
  """Writes stored layers' targets into the stacked host arrays `weights`, in place."""
  for index, layer in layers.items():
    for name, value in layer.items():
      weights[name][index] = value


def checkpoint_weights(folder: str | os.PathLike, model: Llama) -> dict | None:
  """The replacement weights (its targets, the unpruned layers dense) of a checkpoint of
  `prune_model` in `folder` that finished every layer it was asked for, from `model`; None if
  there is none, it is unfinished, of another model, or cannot be read."""
  folder = Path(folder)
  state = _read_state(folder, Reporter(quiet=True))
  if state is None:
    return None
  key, records = state
  settings = key.get("settings") or {}
  finished = {record["layer"] for record in records if record.get("pruned")}
  if (not set(settings.get("layers") or [None]) <= finished
      or key.get("model") != model_fingerprint(model)):
    return None
  targets = TARGETS[settings.get("targets", "qk")]
  dense = model.weights()
  weights = {name: np.array(dense[name]) for name in targets}
  try:
    _put_layers(weights, _read_layers(folder, records, targets))
  except _UNREADABLE:
    return None
  return weights


def _resume(folder: Path, key: dict, targets, reporter: Reporter):
  """(records, {layer: pruned targets}) of a finished prefix of layers, or None to start
  afresh."""
  state = _read_state(folder, reporter)
  if state is None:
    return None
  stored_key, records = state
  path = folder / CHECKPOINT
  if stored_key.get("code") != key["code"]:
    # Never resumable, whatever else it was made with (other code may also fingerprint the
    # model or the data differently): an old checkpoint in the folder is replaced.
    reporter.info(f"the checkpoint {path} was made by other code (fingerprint "
                  f"{stored_key.get('code')}, now {key['code']}); starting afresh")
    return None
  if stored_key != key:
    raise InputError(f"the checkpoint {path} was made with other settings, calibration data or "
                     f"model ({stored_key}); use another output folder or delete it")
  try:
    return records, _read_layers(folder, records, targets)
  except _UNREADABLE as err:
    reporter.info(f"ignoring the checkpoint {path}: a layer file cannot be read ({err}); "
                  "starting afresh")
    return None


def _prune_block(settings: PruneSettings, block: dict, hidden, config: LlamaConfig, devices):
  """Prunes one block's targets from calibration `hidden` (b, t, d) entering it.

  Returns (pruned targets by name, entries kept by name, the q/k solver's losses).
  """
  new, kept, losses = {}, {}, jnp.zeros((0,))
  for group in settings.groups():
    if {LINEAR_INPUTS[target] for target in group} == {"attention"}:  # no need of the rest
      inputs = {"attention": _attention_input(hidden, block, config)}
    else:
      inputs = _linear_inputs(hidden, block, config)
    stats = {}
    if QK[0] in group:
      result = prune_qk(settings.method, block["q_proj"], block["k_proj"], inputs["attention"],
                        sparsity=settings.sparsity, n_m=settings.n_m, config=config,
                        solver=settings.solver, devices=devices)
      losses = result.loss
      new |= {"q_proj": result.q_proj.astype(block["q_proj"].dtype),
              "k_proj": result.k_proj.astype(block["k_proj"].dtype)}
      kept |= {"q_proj": result.keep_q, "k_proj": result.keep_k}
    for target in (t for t in group if t not in QK):
      method = settings.method_of(target)
      gram = BASELINES[method].needs_gram
      source = LINEAR_INPUTS[target]
      if source not in stats or (gram and stats[source].gram is None):
        x = inputs[source]
        stats[source] = input_stats(x.reshape(-1, x.shape[-1]), gram=gram)
      new[target], kept[target] = prune_linear(method, block[target], stats[source],
                                               settings.sparsity, settings.n_m)
    block = block | new
  return new, kept, losses


def prune_model(model: Llama, settings: PruneSettings, calibration, heldout, *,
                checkpoint_dir: str | os.PathLike | None = None,
                reporter: Reporter = Reporter(quiet=True), devices=None) -> PrunedModel:
  """Prunes the targets of `settings.layers`, layer after layer, with re-propagation.

  Args:
    model: the dense model (left unchanged).
    settings: methods, sparsity, pattern, layers, targets, solver settings.
    calibration: (windows, t) int tokens the methods see.
    heldout: (windows, t) int tokens for the attention errors (never given to a method).
    checkpoint_dir: if given, the state after every layer is saved there and a rerun with the
      same settings resumes after the last finished layer, with identical results; a
      checkpoint of other code (`CODE`'s fingerprint) is discarded, one of the same code but
      other settings, windows or model is an error.
    reporter: a progress bar per layer.
    devices: devices that share each layer's attention-aware solve (`methods.prune_qk`); the
      layers stay in order. None: one device.
  Returns:
    a `PrunedModel` (replacement weights and per-layer records).
  """
  config: LlamaConfig = model.config
  if devices is not None:
    devices = sharding.check_devices(devices)
  if settings.layers[-1] >= config.num_layers or settings.layers[0] < 0:
    raise InputError(f"layers must be in [0, {config.num_layers}), got {settings.layers}")
  settings.check_shapes(config)
  for name, windows in (("calibration", calibration), ("heldout", heldout)):
    windows = np.asarray(windows)
    if windows.ndim != 2 or 0 in windows.shape or not np.issubdtype(windows.dtype, np.integer):
      raise InputError(f"{name} must be integer token windows (windows >= 1, t >= 1), got "
                       f"{windows.dtype} {windows.shape}")
    check_token_ids(name, windows, config.vocab_size)
  targets = TARGETS[settings.targets]
  dense = model.weights()
  # Host copies written layer by layer in place (a JAX `.at[].set` would copy each stack).
  weights = {name: np.array(dense[name]) for name in targets}
  records: list[dict] = []
  folder = None if checkpoint_dir is None else Path(checkpoint_dir)
  # A checkpoint is reused only for the same settings, windows, dense model and code.
  key = {"settings": settings.to_json(),
         "data": fingerprint(calibration, heldout),
         "model": model_fingerprint(model),
         "code": code_fingerprint(CODE)}
  if folder is not None:
    resumed = _resume(folder, key, targets, reporter)
    if resumed is not None:
      records, layers = resumed
      _put_layers(weights, layers)
      reporter.info(f"resuming after layer {len(records) - 1} from {folder / CHECKPOINT}")
  calibration, heldout = jnp.asarray(calibration), jnp.asarray(heldout)
  hidden = _embed(dense, calibration)
  heldout_hidden = _embed(dense, heldout)
  dense_hidden = heldout_hidden
  bar = reporter.progress(range(config.num_layers), total=config.num_layers,
                          desc=f"{settings.name} layers")
  for index in bar:
    layer = layer_weights(dense, index)
    done = index < len(records)
    record = records[index] if done else {"layer": index, "pruned": index in settings.layers}
    if record["pruned"] and not done:
      start = time.perf_counter()
      try:
        new, kept, losses = _prune_block(settings, layer, hidden, config, devices)
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
                 "kept": {name: int(np.sum(kept[name])) for name in targets},
                 "kept_q": float(np.mean(kept["q_proj"])),
                 "kept_k": float(np.mean(kept["k_proj"])),
                 "loss_first": float(losses[0]) if losses.size else None,
                 "loss_last": float(losses[-1]) if losses.size else None}
    pruned_layer = layer | {name: jnp.asarray(weights[name][index]) for name in targets}
    hidden, _, _ = _run_layer(hidden, pruned_layer, config)
    new_heldout, heldout_inputs, heldout_probs = _run_layer(heldout_hidden, pruned_layer, config)
    dense_hidden, _, dense_probs = _run_layer(dense_hidden, layer, config)
    if not done:
      # An unpruned layer keeps its dense q/k: its local error is 0 by definition.
      local = 0.0 if not record["pruned"] else float(jnp.mean(_attention_error(
          pruned_layer["q_proj"], pruned_layer["k_proj"], layer["q_proj"], layer["k_proj"],
          heldout_inputs, head_dim=config.head_dim, rope=config.rope,
          block=DEFAULT_BLOCK if heldout.shape[1] > BLOCKED_ABOVE else None)))
      record |= {"attention_error": local,
                 "attention_error_end_to_end": float(jnp.mean(
                     jnp.sum((heldout_probs - dense_probs)**2, axis=(-3, -2, -1))))}
      records.append(record)
      if folder is not None and record["pruned"]:
        _write_checkpoint(folder, key, index, {name: weights[name][index] for name in targets},
                          records)
    heldout_hidden = new_heldout
  return PrunedModel({name: jnp.asarray(value) for name, value in weights.items()}, records)
