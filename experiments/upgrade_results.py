"""One-off: the reproduce results of the source-fingerprint era in the numerics-version format.

Rows written before numerics versions existed were keyed by a hash of the source (or by nothing),
so `attnprune reproduce` would compute all of them again (about 3 hours for the q/k grid and
1.5 for the whole model) although no number of theirs changed. This rewrites their bookkeeping
only: each row's settings as the current grid states them (an error if they differ from the
stored ones), its key (settings, token windows, model, numerics version), the numerics version,
the entries kept per target from the stored kept fractions, and the summary of what was removed.
No number is recomputed or changed; `tests/test_golden_samples.py` recomputes layer 0 of every
row and is what shows that the code now makes the same numbers. Each upgraded row records the
upgrade under provenance.upgraded.

  .venv/bin/python -m experiments.upgrade_results
"""

import dataclasses
import json
from pathlib import Path

from attnprune_jax import models, numerics, pipeline, runs
from attnprune_jax.results import fingerprint, model_fingerprint, provenance, write_json_atomic
from attnprune_jax.settings import DataConfig, reproduce_grid

FILES = {"results/qk_pruning.json": "qk", "results/whole_model.json": "all",
         "results/whole_model_qk_share.json": None}
# What rows written before these settings existed were made with.
OLD_DEFAULTS = {"targets": "qk", "rest": None, "true_sequential": False}


def upgrade_row(row: dict, grid, model, context: dict, note: dict) -> dict:
  """The row with the current bookkeeping; its numbers untouched."""
  if row["method"] == "dense":
    return row | {"key": runs.row_key(None, context)}
  sparsity = row["pattern"] if row["pattern"] != "unstructured" else f"{row['sparsity']:g}"
  settings = grid.settings(row["method"], sparsity).for_model(model.config)
  stated, stored = settings.to_json(), row["settings"]
  for name, value in stated.items():
    if stored.get(name, OLD_DEFAULTS.get(name)) != value:
      raise ValueError(f"{row['method']} {sparsity}: stored {name} {stored.get(name)!r}, "
                       f"the grid now states {value!r}")
  weights = model.weights()
  layers = []
  for record in row["layers"]:
    if record["pruned"]:
      index = record["layer"]
      kept = record.get("kept") or {
          name: round(record[f"kept_{name[0]}"] * weights[name][index].size)
          for name in ("q_proj", "k_proj")}
      record = record | {"kept": kept, "sparsity": settings.sparsity_of(index)}
    layers.append(record)
  removed = pipeline.sparsity_summary(model.config, layers)
  if "removed" in row and row["removed"] != removed:
    raise ValueError(f"{row['method']} {sparsity}: stored removal summary differs")
  return row | {"targets": settings.targets, "removed": removed, "layers": layers,
                "settings": stated | {"data": stored["data"]}, "numerics": numerics.PRUNING,
                "key": runs.row_key(settings, context),
                "provenance": row["provenance"] | {"upgraded": note}}


def main() -> None:
  model = models.load("smollm2")
  note = {"by": "experiments/upgrade_results.py", "git_commit": provenance(
      seed=None, settings={}, wall_time_s=0.0)["git_commit"], "numbers": "unchanged"}
  for path, targets in FILES.items():
    document = json.loads(Path(path).read_text())
    if targets is not None:
      grid = reproduce_grid(targets)
      config = DataConfig(**document["data"])
      windows = runs.token_windows(model, config)
      context = {"windows": fingerprint(*(windows[k] for k in sorted(windows))),
                 "model": model_fingerprint(model), "numerics": numerics.PRUNING}
      grid = dataclasses.replace(grid, layers=tuple(document["layers"]), data=config)
      document["rows"] = [upgrade_row(row, grid, model, context, note)
                          for row in document["rows"]]
      document["targets"] = targets
    else:
      document["numerics"] = numerics.PRUNING
    document["provenance"] = document["provenance"] | {"upgraded": note}
    write_json_atomic(Path(path), document)
    print(f"{path}: upgraded")


if __name__ == "__main__":
  main()
