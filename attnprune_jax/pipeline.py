"""Layer-sequential pruning of a model's q_proj and k_proj, resumable layer by layer.

As the baselines' reference code does: for each layer in order, take its attention inputs from
the current (already pruned) model, prune the layer's q/k with a method of `methods`, write the
new weights back, and run the pruned layer so the next one sees pruned inputs. Along the way it
measures, per layer, the attention error on held-out windows:

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
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from attnprune_jax import sharding, validation
from attnprune_jax.errors import DivergenceError, InputError
from attnprune_jax.layer_masks import DEFAULTS, MaskSolverConfig
from attnprune_jax.methods import METHODS, prune_qk
from attnprune_jax.models.llama import (Llama, LlamaConfig, attention_input, check_token_ids,
                                        decoder_layer, layer_weights)
from attnprune_jax.objective import layer_attention_error
from attnprune_jax.reporting import Reporter
from attnprune_jax.results import code_fingerprint
from attnprune_jax.solver import BLOCKED_ABOVE, DEFAULT_BLOCK

CHECKPOINT = "checkpoint.npz"
# The modules a pruned layer depends on: a checkpoint of other code is not resumed.
CODE = tuple(f"attnprune_jax.{name}" for name in (
    "attention", "objective", "solver", "masks", "layer_masks", "methods", "baselines", "models",
    "validation")) + (__name__,)


@dataclasses.dataclass(frozen=True)
class PruneSettings:
  """What to prune and how.

  Attributes:
    method: one of `methods.METHODS`.
    sparsity: fraction of q/k entries removed per output row, in [0, 1) (n/m for N:M).
    n_m: (n, m) structure along the input axis, or None for unstructured.
    layers: indices of the layers to prune (in increasing order).
    solver: settings of the attention-aware methods; None stands for `layer_masks.DEFAULTS`
      of the method and is replaced by them (baselines: None).
  """
  method: str
  sparsity: float
  n_m: tuple[int, int] | None = None
  layers: tuple[int, ...] = ()
  solver: MaskSolverConfig | None = None

  def __post_init__(self):
    if self.method not in METHODS:
      raise InputError(f"method must be one of {METHODS}, got {self.method!r}")
    if self.solver is None and self.method in DEFAULTS:
      # Record the settings actually used, so results and checkpoints say what ran.
      object.__setattr__(self, "solver", DEFAULTS[self.method])
    validation.check_sparsity(self.sparsity)
    if list(self.layers) != sorted(set(self.layers)) or not self.layers:
      raise InputError(f"layers must be distinct indices in increasing order, got {self.layers}")

  def to_json(self) -> dict:
    return {"method": self.method, "sparsity": self.sparsity,
            "n_m": None if self.n_m is None else list(self.n_m), "layers": list(self.layers),
            "solver": None if self.solver is None else dataclasses.asdict(self.solver)}


class PrunedModel(NamedTuple):
  """Result of `prune_model`.

  Attributes:
    weights: replacements {"q_proj": (layers, ·, d), "k_proj": ...} for `Llama.weights`.
    layers: one record per layer, in order: {"layer", "pruned", "attention_error",
      "attention_error_end_to_end", "prune_time_s", "kept_q", "kept_k", "loss_first",
      "loss_last"} (the last five only for pruned layers; the losses are the solver's
      minibatch losses at its first and last optimizer step, None for the baselines;
      prune_time_s includes compilation, which falls on the first pruned layer).
  """
  weights: dict
  layers: list[dict]


@jax.jit
def _embed(weights: dict, tokens):
  return weights["embed_tokens"][tokens]


_run_layer = jax.jit(decoder_layer, static_argnames="config")
_attention_input = jax.jit(attention_input, static_argnames="config")


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


def _write_checkpoint(folder: Path, key: dict, weights: dict, records: list):
  """Saves the pruned q/k so far and the per-layer records in one atomic file."""
  folder.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{CHECKPOINT}.", suffix=".tmp",
                                   delete=False) as handle:
    np.savez(handle, q_proj=np.asarray(weights["q_proj"]), k_proj=np.asarray(weights["k_proj"]),
             state=np.asarray(json.dumps({"key": key, "layers": records})))
    handle.flush()
    os.fsync(handle.fileno())
  os.replace(handle.name, folder / CHECKPOINT)


def _read_checkpoint(folder: Path, key: dict, reporter: Reporter):
  """(weights, records) of a finished prefix of layers, or None to start afresh."""
  path = folder / CHECKPOINT
  if not path.is_file():
    return None
  try:
    with np.load(path) as stored:
      state = json.loads(str(stored["state"]))
      weights = {"q_proj": jnp.asarray(stored["q_proj"]), "k_proj": jnp.asarray(stored["k_proj"])}
  except (OSError, ValueError, KeyError) as err:
    reporter.info(f"ignoring the unreadable checkpoint {path}: {err}")
    return None
  stored_key = state.get("key") or {}
  if stored_key.get("code") != key["code"]:
    # Never resumable, whatever else it was made with (other code may also fingerprint the
    # model or the data differently): an old checkpoint in the folder is replaced.
    reporter.info(f"the checkpoint {path} was made by other code (fingerprint "
                  f"{stored_key.get('code')}, now {key['code']}); starting afresh")
    return None
  if stored_key != key:
    raise InputError(f"the checkpoint {path} was made with other settings, calibration data or "
                     f"model ({state.get('key')}); use another output folder or delete it")
  return weights, state["layers"]


def prune_model(model: Llama, settings: PruneSettings, calibration, heldout, *,
                checkpoint_dir: str | os.PathLike | None = None,
                reporter: Reporter = Reporter(quiet=True), devices=None) -> PrunedModel:
  """Prunes q_proj and k_proj of `settings.layers`, layer after layer, with re-propagation.

  Args:
    model: the dense model (left unchanged).
    settings: method, sparsity, pattern, layers, solver settings.
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
  for name, windows in (("calibration", calibration), ("heldout", heldout)):
    windows = np.asarray(windows)
    if windows.ndim != 2 or 0 in windows.shape or not np.issubdtype(windows.dtype, np.integer):
      raise InputError(f"{name} must be integer token windows (windows >= 1, t >= 1), got "
                       f"{windows.dtype} {windows.shape}")
    check_token_ids(name, windows, config.vocab_size)
  dense = model.weights()
  weights = {"q_proj": dense["q_proj"], "k_proj": dense["k_proj"]}
  records: list[dict] = []
  folder = None if checkpoint_dir is None else Path(checkpoint_dir)
  # A checkpoint is reused only for the same settings, windows, dense model and code.
  key = {"settings": settings.to_json(),
         "data": fingerprint(calibration, heldout),
         "model": model_fingerprint(model),
         "code": code_fingerprint(CODE)}
  if folder is not None:
    resumed = _read_checkpoint(folder, key, reporter)
    if resumed is not None:
      weights, records = resumed
      reporter.info(f"resuming after layer {len(records) - 1} from {folder / CHECKPOINT}")
  calibration, heldout = jnp.asarray(calibration), jnp.asarray(heldout)
  hidden = _embed(dense, calibration)
  heldout_hidden = _embed(dense, heldout)
  dense_hidden = heldout_hidden
  bar = reporter.progress(range(config.num_layers), total=config.num_layers,
                          desc=f"{settings.method} layers")
  for index in bar:
    layer = layer_weights(dense, index)
    done = index < len(records)
    record = records[index] if done else {"layer": index, "pruned": index in settings.layers}
    if record["pruned"] and not done:
      x = _attention_input(hidden, layer, config)
      start = time.perf_counter()
      try:
        result = prune_qk(settings.method, layer["q_proj"], layer["k_proj"], x,
                          sparsity=settings.sparsity, n_m=settings.n_m, config=config,
                          solver=settings.solver, devices=devices)
      except DivergenceError as err:
        raise DivergenceError(f"layer {index}: {err}; nothing was written for this layer, "
                              "the layers before it are in the checkpoint") from None
      jax.block_until_ready(result.q_proj)
      if not all(bool(jnp.isfinite(a).all()) for a in (result.q_proj, result.k_proj, result.loss)):
        # Inputs are finite and the solver checks itself: this is a bug, not bad input.
        raise RuntimeError(f"{settings.method} produced NaN or Inf weights or losses in layer "
                           f"{index} from finite inputs; nothing was written for this layer")
      record |= {"prune_time_s": time.perf_counter() - start,
                 "kept_q": float(np.mean(result.keep_q)), "kept_k": float(np.mean(result.keep_k)),
                 "loss_first": float(result.loss[0]) if result.loss.size else None,
                 "loss_last": float(result.loss[-1]) if result.loss.size else None}
      weights = {"q_proj": weights["q_proj"].at[index].set(result.q_proj),
                 "k_proj": weights["k_proj"].at[index].set(result.k_proj)}
    pruned_layer = layer | {"q_proj": weights["q_proj"][index], "k_proj": weights["k_proj"][index]}
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
        _write_checkpoint(folder, key, weights, records)
    heldout_hidden = new_heldout
  return PrunedModel(weights, records)
