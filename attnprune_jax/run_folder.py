"""The output folder of one pruning run, and its one writer.

    OUT/results.json      the run's row with provenance (written when the run is done)
    OUT/checkpoint.json   the layer checkpoint: its key and the finished layers' records
    OUT/layer-NNN.npz     the pruned targets of each finished layer
    OUT/model/            the pruned model as a Hugging Face folder (`--save-weights`)

Every file is written atomically (a reader sees the old file or the new one, never half); a
layer file is written before the state that makes it count. The checkpoint's key names the run:
its settings, token windows, model and numerics version (`numerics.PRUNING`). A rerun with the
same key resumes after its last finished layer; a checkpoint of another numerics version is
discarded (the layers would differ); one of other settings, windows or model is an error: the
folder belongs to another run.
"""

import json
import os
import zipfile
from pathlib import Path

import numpy as np

from attnprune_jax import numerics
from attnprune_jax.errors import InputError
from attnprune_jax.reporting import Reporter
from attnprune_jax.results import check_output_path, write_atomic, write_json_atomic
from attnprune_jax.settings import TARGETS

# What a missing, truncated or foreign layer file raises in np.load.
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


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
    check_output_path(f"{option} (results.json)", self.results)
    if save_model and (self.model.exists() or self.model.is_symlink()):
      raise InputError(f"save_weights: the model folder {self.model} exists already; remove "
                       f"it or choose another {option}", argument="save_weights")

  def write_results(self, document: dict) -> Path:
    write_json_atomic(self.results, document)
    return self.results

  def save_model(self, model, weights: dict) -> Path:
    """Writes `model` with `weights` in place of its own (`models.save`) to OUT/model."""
    from attnprune_jax.models import save
    save(model, self.model, weights=weights)
    return self.model

  def save_layer(self, key: dict, index: int, arrays: dict, records: list[dict]) -> None:
    """Stores layer `index`'s pruned targets, then the state that makes them count."""
    write_atomic(self.layer_file(index), lambda handle: np.savez(handle, **arrays))
    state = json.dumps({"key": key, "layers": records}).encode()
    write_atomic(self.state, lambda handle: handle.write(state))

  def _read_state(self, reporter: Reporter):
    """(key, records) of the checkpoint, or None."""
    if not self.state.is_file():
      return None
    try:
      state = json.loads(self.state.read_text())
      key, records = state.get("key") or {}, state["layers"]
      if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise TypeError("its layers are not a list of records")
      return key, records
    except (OSError, UnicodeDecodeError, ValueError, KeyError, AttributeError, TypeError) as err:
      reporter.info(f"ignoring the unreadable checkpoint {self.state}: {err}")
      return None

  def _read_layers(self, records: list[dict], targets) -> dict[int, dict]:
    """The pruned targets of every finished pruned layer, by layer index."""
    layers = {}
    for record in records:
      if record["pruned"]:
        with np.load(self.layer_file(record["layer"])) as stored:
          layers[record["layer"]] = {name: stored[name] for name in targets}
    return layers

  def resume(self, key: dict, targets, reporter: Reporter):
    """(records, {layer: pruned targets}) of the layers finished by the run `key`, or None to
    start afresh; an InputError if the folder holds another run's checkpoint."""
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
      return records, self._read_layers(records, targets)
    except _UNREADABLE as err:
      reporter.info(f"ignoring the checkpoint {self.state}: a layer file cannot be read ({err}); "
                    "starting afresh")
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
    targets = TARGETS[settings.get("targets", "qk")]
    dense = model.weights()
    weights = {name: np.array(dense[name]) for name in targets}
    try:
      for index, layer in self._read_layers(records, targets).items():
        for name, value in layer.items():
          weights[name][index] = value
    except _UNREADABLE:
      return None
    return weights
