"""Pruning runs: one row (prune, evaluate, record) and the reproduce grid of rows.

A row is one method (or a q/k method + a linear method for the other targets) at one sparsity
or pattern: the targets of the chosen layers pruned layer by layer (`pipeline.prune_model`),
then perplexity on the evaluation text and the attention error per layer on held-out
calibration-text windows. `prune` runs one row into a `RunFolder`; `reproduce` runs a
`settings.Grid` of rows with one fixed calibration set and one fixed evaluation set, keeping
finished rows in a results file, resumable row by row. Paper sections 6.2–6.3 on our model (the
q/k grid) and, beyond the paper, whole-model sparsity (every linear pruned).
"""

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from attnprune_jax import data, evaluate, numerics, pipeline
from attnprune_jax.errors import InputError
from attnprune_jax.models import Llama
from attnprune_jax.reporting import Reporter
from attnprune_jax.results import (fingerprint, model_fingerprint, provenance, read_json,
                                   result_document, stored_rows, write_atomic, write_json_atomic)
from attnprune_jax.run_folder import RunFolder
from attnprune_jax.settings import RESULTS, DataConfig, Grid, PruneSettings, quick_layers


def check_text_fits(model: Llama, text: str, count: int, ctx: int, what: str) -> None:
  """An InputError naming `what` unless `count` windows of `ctx` tokens fit in `text` and `ctx`
  in the model's longest sequence."""
  if model.tokenizer is None:
    raise InputError("the model has no tokenizer (a checkpoint folder without tokenizer.json?); "
                     "the text windows need one", argument="model")
  longest = model.config.max_positions
  if longest is not None and ctx > longest:
    raise InputError(f"{what} ask for windows of {ctx} tokens; the model handles at most "
                     f"{longest} (its max_position_embeddings / context length)")
  needed, available = count * (ctx - 1), data.text_tokens(model.tokenizer, text).size
  if needed > available:
    raise InputError(f"{what} ask for {count} windows of {ctx} tokens, {needed} tokens of "
                     f"{text}, which has {available}")


def token_windows(model: Llama, config: DataConfig) -> dict[str, np.ndarray]:
  """The calibration, held-out (both Emma, disjoint) and evaluation (Pride and Prejudice)
  windows, each (count, calib_len) int32; an InputError if the texts or the model are too
  short for them."""
  check_text_fits(model, data.CALIBRATION_TEXT, config.calib_seqs + config.heldout_seqs,
                  config.calib_len, "calib_seqs, heldout_seqs and calib_len")
  check_text_fits(model, data.EVALUATION_TEXT, config.eval_windows, config.calib_len,
                  "eval_tokens and calib_len")
  emma = data.calibration_windows(model.tokenizer, count=config.calib_seqs + config.heldout_seqs,
                                  ctx=config.calib_len)
  return {"calibration": emma[:config.calib_seqs], "heldout": emma[config.calib_seqs:],
          "evaluation": data.evaluation_windows(model.tokenizer, count=config.eval_windows,
                                                ctx=config.calib_len)}


def dense_row(model: Llama, windows: dict, config: DataConfig, reporter: Reporter) -> dict:
  """The unpruned model's row."""
  ppl = evaluate.perplexity(model, windows["evaluation"], batch_size=config.batch,
                            reporter=reporter)
  return {"method": "dense", "sparsity": 0.0, "pattern": "dense",
          "perplexity": ppl["perplexity"], "eval_tokens": ppl["tokens"],
          "kl_divergence": 0.0, "top1_agreement": 1.0,
          "attention_error_mean": 0.0, "prune_time_s": 0.0}


def prune_row(model: Llama, settings: PruneSettings, windows: dict, config: DataConfig, *,
              folder: RunFolder | None = None, model_key: str | None = None,
              save_model: bool = False, reporter: Reporter, devices=None) -> dict:
  """Prunes with `settings` (checkpoints in `folder`; each layer's solve sharded over
  `devices`, if given), evaluates, and returns the row; with `save_model` the pruned model goes
  to the folder too."""
  start = time.perf_counter()
  pruned = pipeline.prune_model(model, settings, windows["calibration"], windows["heldout"],
                                folder=folder, model_key=model_key, reporter=reporter,
                                devices=devices)
  pipeline_s = time.perf_counter() - start
  ppl = evaluate.perplexity(model, windows["evaluation"], batch_size=config.batch,
                            weights=pruned.weights, against_dense=True, reporter=reporter)
  layers = [record for record in pruned.layers if record["pruned"]]
  settings = settings.for_model(model.config)
  row = {
      "method": settings.name, "sparsity": settings.mean_sparsity,
      "pattern": settings.pattern, "targets": settings.targets,
      "perplexity": ppl["perplexity"], "eval_tokens": ppl["tokens"],
      "kl_divergence": ppl["kl_divergence"], "top1_agreement": ppl["top1_agreement"],
      "attention_error_mean": float(np.mean([r["attention_error"] for r in layers])),
      "attention_error_per_layer": {str(r["layer"]): r["attention_error"] for r in layers},
      "attention_error_end_to_end_per_layer": {
          str(r["layer"]): r["attention_error_end_to_end"] for r in pruned.layers},
      "prune_time_s": float(sum(r["prune_time_s"] for r in layers)),
      "pipeline_time_s": pipeline_s,
      "kept_fraction": float(np.mean([(r["kept_q"] + r["kept_k"]) / 2 for r in layers])),
      "removed": pipeline.sparsity_summary(model.config, pruned.layers),
      "layers": pruned.layers,
      "settings": settings.to_json() | {"data": dataclasses.asdict(config)},
      "numerics": numerics.PRUNING,
  }
  if save_model:
    row["saved_model"] = str(folder.save_model(model, pruned.weights))
  return row


def prune(model: Llama, settings: PruneSettings, config: DataConfig, folder: RunFolder, *,
          save_model: bool = False, reporter: Reporter, devices=None) -> dict:
  """The `prune` command's run: one row into `folder` (layer checkpoints, the model if
  `save_model`, and results.json with provenance, written last); returns the row."""
  start = time.perf_counter()
  settings = settings.for_model(model.config)
  settings.check_windows(config.calib_seqs)
  windows = token_windows(model, config)
  row = prune_row(model, settings, windows, config, folder=folder, save_model=save_model,
                  reporter=reporter, devices=devices)
  folder.write_results(result_document("prune", row, provenance(
      seed=None, settings=settings.to_json() | {"data": dataclasses.asdict(config)},
      wall_time_s=time.perf_counter() - start)))
  return row


def row_folder(work: Path, method: str, sparsity: str, targets: str = "qk") -> RunFolder:
  """Where a reproduce row keeps its layer checkpoint (no ':' in the name: 'owl:wanda' at 2:4
  is owl_wanda-2of4)."""
  name = f"{method.replace(':', '_')}-{sparsity.replace(':', 'of')}"
  return RunFolder(work / (name if targets == "qk" else f"{targets}-{name}"))


def row_key(settings: PruneSettings | None, context: dict) -> dict:
  """What a stored row is reused for: the same settings (None for the dense row) in the same
  context (`reproduce`: token windows, model and numerics version)."""
  return {"settings": None if settings is None else settings.to_json(), **context}


def _cell(row: dict) -> tuple:
  return row["method"], row["pattern"], row["sparsity"]


def reproduce(model: Llama, grid: Grid, results_path: Path, work: Path, *, reporter: Reporter,
              tables: Callable[[list[dict], str], str] | None = None) -> list[dict]:
  """Every method at every sparsity of the grid, plus the dense row, resumable row by row.

  Finished rows are kept in `results_path`, rewritten atomically after every row (with
  `tables`, also `tables(rows, targets)` as Markdown beside it, `.md`). A stored row is reused
  only for the same settings, token windows, model and numerics version (`row_key`) in a file of
  the same data settings and layers; a row of this grid made otherwise is computed again, and
  rows of other methods or sparsities made alike are kept (a grid of a few methods adds to the
  file). A row's layer checkpoints live in `row_folder(work, ...)`. A results file of other
  targets is an error. Returns every row of the file.
  """
  config = grid.data
  num_layers = model.config.num_layers
  layers = quick_layers(num_layers) if grid.quick else grid.layers or tuple(range(num_layers))
  grid = dataclasses.replace(grid, layers=layers, quick=False)
  windows = token_windows(model, config)
  model_key = model_fingerprint(model)
  context = {"windows": fingerprint(*(windows[k] for k in sorted(windows))), "model": model_key,
             "numerics": numerics.PRUNING}
  cells = [("dense", None)] + [(method, sparsity) for sparsity in grid.sparsities
                               for method in grid.methods if grid.applies(method, sparsity)]
  # `attn` (Algorithm 1 and one cut) runs after every other row.
  cells.sort(key=lambda cell: cell[0] == "attn")
  settings = {cell: None if cell[0] == "dense" else grid.settings(*cell).for_model(model.config)
              for cell in cells}
  for method, sparsity in cells:  # every row folder writable before any work
    if method != "dense":
      row_folder(work, method, sparsity, grid.targets).check("--work")
  keys = {cell: row_key(settings[cell], context) for cell in cells}
  named = {("dense", "dense", 0.0) if s is None else (s.name, s.pattern, s.mean_sparsity): cell
           for cell, s in settings.items()}
  rows = []
  if results_path.is_file():
    stored = stored_rows(results_path, grid.targets)
    document = read_json(results_path)
    same_file = (document.get("data") == dataclasses.asdict(config)
                 and document.get("layers") == list(layers))
    rows = [row for row in stored
            if same_file and {k: v for k, v in (row.get("key") or {}).items()
                              if k != "settings"} == context
            and (_cell(row) not in named or row["key"] == keys[named[_cell(row)]])]
    if len(stored) > len(rows):
      commits = sorted({row.get("provenance", {}).get("git_commit") or "unknown"
                        for row in stored if row not in rows})
      reporter.info(f"reproduce: {len(stored) - len(rows)} stored rows were computed with other "
                    f"settings, data, layers, windows, model or numerics (commits "
                    f"{', '.join(commits)}); they are dropped")
  done = [row["key"] for row in rows]
  start = time.perf_counter()
  kind = RESULTS[grid.targets][1]
  for cell in cells:
    if keys[cell] in done:
      continue
    method, sparsity = cell
    reporter.info(f"reproduce: {method} at {sparsity or 'no pruning'}")
    row_start = time.perf_counter()
    if method == "dense":
      row = dense_row(model, windows, config, reporter)
    else:
      row = prune_row(model, settings[cell], windows, config,
                      folder=row_folder(work, method, sparsity, grid.targets),
                      model_key=model_key, reporter=reporter)
    row["key"] = keys[cell]
    row["provenance"] = provenance(seed=None, settings={"row": [method, sparsity]},
                                   wall_time_s=time.perf_counter() - row_start)
    rows.append(row)
    write_json_atomic(results_path, result_document(kind, {
        "data": dataclasses.asdict(config), "layers": list(layers),
        "targets": grid.targets, "rows": rows}, provenance(
            seed=None, settings={"sparsities": list(grid.sparsities),
                                 "methods": list(grid.methods)},
            wall_time_s=time.perf_counter() - start)))
    if tables is not None:
      text = tables(rows, grid.targets).encode()
      write_atomic(results_path.with_suffix(".md"), lambda handle: handle.write(text))
    reporter.table(["method", "pattern", "sparsity", "perplexity", "attn error", "prune s"],
                   [[row["method"], row["pattern"], row["sparsity"], row["perplexity"],
                     row["attention_error_mean"], row["prune_time_s"]]])
  return rows
