"""The output folder of one pruning run, and its one writer.

    OUT/results.json      the run's row with provenance (written when the run is done)
    OUT/checkpoint.json   the layer checkpoint: its key and the finished layers' records
    OUT/layer-NNN.npz     the pruned targets of each finished layer
    OUT/model/            the pruned model as a Hugging Face folder (`--save-weights`)

Every file is written atomically (a reader sees the old file or the new one, never half); a
layer file is written before the state that makes it count. The checkpoint's key names the run:
its settings, token windows, model and numerics version (`numerics.PRUNING`); every layer file
carries the key's digest. A rerun with the same key resumes after its last finished layer; a
checkpoint of another numerics version is discarded (the layers would differ); one of other
settings, windows or model is an error: the folder belongs to another run. What is read is
checked piece by piece (each record's fields, each layer file's key, names, shapes, dtypes and
finiteness): a checkpoint that fails is ignored with a message and its layers computed again.
One run at a time writes a folder: the command holds its lock (`locks.exclusive`).
"""

import hashlib
import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np

from attnprune_jax import numerics
from attnprune_jax.errors import InputError
from attnprune_jax.reporting import Reporter
from attnprune_jax.results import (check_output_path, read_json, write_atomic,
                                   write_json_atomic)
from attnprune_jax.settings import TARGETS

# What a missing, truncated or foreign layer file raises in np.load.
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)
# The fields of a layer's record (`pipeline.prune_model`): every layer's, and a pruned layer's.
RECORD_FIELDS = frozenset({"layer", "pruned", "attention_error", "attention_error_end_to_end"})
PRUNED_RECORD_FIELDS = RECORD_FIELDS | {"prune_time_s", "sparsity", "kept", "kept_q", "kept_k",
                                        "loss_first", "loss_last"}
_RUN = "run_key"  # the entry of a layer file that holds its run's key digest


class _Malformed(ValueError):
  """A checkpoint piece that parses but is not what this run wrote."""


def key_digest(key: dict) -> str:
  """The SHA-256 of a checkpoint key, stored in each of its layer files."""
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _number(value, *, optional: bool = False) -> bool:
  if value is None:
    return optional
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_records(records: list, targets) -> None:
  """A _Malformed error unless `records` are layer records 0, 1, ... with their fields."""
  for position, record in enumerate(records):
    if not isinstance(record, dict) or record.get("layer") != position:
      raise _Malformed(f"record {position} is not the record of layer {position}")
    if not isinstance(record.get("pruned"), bool):
      raise _Malformed(f"layer {position}'s record has no boolean 'pruned'")
    fields = PRUNED_RECORD_FIELDS if record["pruned"] else RECORD_FIELDS
    if set(record) != fields:
      raise _Malformed(f"layer {position}'s record has the fields {sorted(record)}, not "
                       f"{sorted(fields)}")
    numbers = ["attention_error", "attention_error_end_to_end"]
    if record["pruned"]:
      numbers += ["prune_time_s", "sparsity", "kept_q", "kept_k"]
      kept = record["kept"]
      if not (isinstance(kept, dict) and set(kept) == set(targets)
              and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                      for v in kept.values())):
        raise _Malformed(f"layer {position}'s record counts kept entries of other targets")
      if not all(_number(record[f], optional=True) for f in ("loss_first", "loss_last")):
        raise _Malformed(f"layer {position}'s record has a loss that is not a finite number")
    if not all(_number(record[f]) for f in numbers):
      raise _Malformed(f"layer {position}'s record has a field that is not a finite number")


class RunFolder:
  """The files of one run in `path` (created when first written)."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)

  @property
  def results(self) -> Path:
    return self.path / "results.json"

  @property
  def model(self) -> Path:
    return self.path / "model"

  @property
  def state(self) -> Path:
    return self.path / "checkpoint.json"

  def layer_file(self, index: int) -> Path:
    return self.path / f"layer-{index:03d}.npz"

  def check(self, option: str = "--out", *, save_model: bool = False) -> None:
    """Before any work: an InputError naming `option` unless the folder can be written (and,
    with `save_model`, holds no model yet)."""
    check_output_path(option, self.path, folder=True)
    for path in (self.results, self.state, *sorted(self.path.glob("layer-*.npz"))):
      check_output_path(f"{option} ({path.name})", path)
    if save_model and (self.model.exists() or self.model.is_symlink()):
      raise InputError(f"the model folder {self.model} exists already; remove it or choose "
                       f"another {option}", argument="save_weights")

  def write_results(self, document: dict) -> Path:
    write_json_atomic(self.results, document)
    return self.results

  def save_model(self, model, weights: dict) -> Path:
    """Writes `model` with `weights` in place of its own (`models.save`) to OUT/model."""
    from attnprune_jax.models import save
    save(model, self.model, weights=weights)
    return self.model

  def save_layer(self, key: dict, index: int, arrays: dict, records: list[dict]) -> None:
    """Stores layer `index`'s pruned targets with the run's key digest, then the state that
    makes them count."""
    arrays = arrays | {_RUN: np.array(key_digest(key))}
    write_atomic(self.layer_file(index), lambda handle: np.savez(handle, **arrays))
    state = json.dumps({"key": key, "layers": records}).encode()
    write_atomic(self.state, lambda handle: handle.write(state))

  def _read_state(self, reporter: Reporter):
    """(key, records) of the checkpoint, or None."""
    if not self.state.is_file():
      return None
    try:
      state = read_json(self.state)
      key, records = state.get("key") or {}, state["layers"]
      if not isinstance(key, dict):
        raise TypeError("its key is not an object")
      if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise TypeError("its layers are not a list of records")
      return key, records
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as err:
      reporter.info(f"ignoring the unreadable checkpoint {self.state}: {err}; starting afresh")
      return None

  def _read_layers(self, key: dict, records: list[dict], layout: dict) -> dict[int, dict]:
    """The pruned targets of every finished pruned layer, by layer index; `layout` maps each
    target to its (shape, dtype) in one layer. A _Malformed error for a file of another run,
    with other entries, shapes or dtypes, or values that are not finite."""
    check_records(records, layout)
    layers, digest = {}, key_digest(key)
    for record in records:
      if record["pruned"]:
        path = self.layer_file(record["layer"])
        with np.load(path) as stored:
          # Files written before layer files carried the digest count by the checkpoint's key.
          if (set(stored.files) - {_RUN} != set(layout)
              or (_RUN in stored.files and str(stored[_RUN]) != digest)):
            raise _Malformed(f"{path.name} was not written by this run")
          arrays = {name: stored[name] for name in layout}
        for name, (shape, dtype) in layout.items():
          if arrays[name].shape != tuple(shape) or arrays[name].dtype != dtype:
            raise _Malformed(f"{path.name}'s {name} is {arrays[name].dtype} "
                             f"{arrays[name].shape}, not {np.dtype(dtype)} {tuple(shape)}")
          if not np.isfinite(arrays[name]).all():
            raise _Malformed(f"{path.name}'s {name} holds NaN or Inf")
        layers[record["layer"]] = arrays
    return layers

  def resume(self, key: dict, layout: dict, reporter: Reporter):
    """(records, {layer: pruned targets}) of the layers finished by the run `key`, or None to
    start afresh; `layout` maps each target to its (shape, dtype) in one layer. An InputError
    if the folder holds another run's checkpoint."""
    state = self._read_state(reporter)
    if state is None:
      return None
    stored_key, records = state
    if stored_key.get("numerics") != key["numerics"]:
      reporter.info(f"the checkpoint {self.state} was made with numerics version "
                    f"{stored_key.get('numerics')}, now {key['numerics']}; starting afresh")
      return None
    if stored_key != key:
      raise InputError(f"the checkpoint {self.state} was made with other settings, calibration "
                       f"data or model ({stored_key}); use another output folder or delete it")
    try:
      return records, self._read_layers(key, records, layout)
    except _UNREADABLE as err:  # _Malformed included
      reason = err if isinstance(err, _Malformed) else f"a layer file cannot be read ({err})"
      reporter.info(f"ignoring the checkpoint {self.state}: {reason}; starting afresh")
      return None

  def finished_weights(self, model, model_fingerprint: str) -> dict | None:
    """The replacement weights (its targets, the layers it did not prune dense) of a checkpoint
    that finished every layer it was asked for, from `model` (whose fingerprint is given);
    None if there is none, it is unfinished, of another model or numerics version, or cannot be
    read."""
    state = self._read_state(Reporter(quiet=True))
    if state is None:
      return None
    key, records = state
    settings = key.get("settings") or {}
    finished = {record.get("layer") for record in records if record.get("pruned")}
    if (not set(settings.get("layers") or [None]) <= finished
        or key.get("model") != model_fingerprint or key.get("numerics") != numerics.PRUNING):
      return None
    targets = TARGETS.get(settings.get("targets", "qk"), ())
    dense = model.weights()
    weights = {name: np.array(dense[name]) for name in targets}
    layout = {name: (value.shape[1:], value.dtype) for name, value in weights.items()}
    try:
      for index, layer in self._read_layers(key, records, layout).items():
        for name, value in layer.items():
          weights[name][index] = value
    except _UNREADABLE:
      return None
    return weights
