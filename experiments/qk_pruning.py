"""Paper sections 6.2–6.3 on our model: q/k pruning of the real model, every method compared;
and beyond the paper, whole-model sparsity (`WHOLE_MODEL`: every linear pruned).

One row = one method (or q/k method + baseline for the other targets) at one sparsity/pattern:
prune the targets of the chosen layers layer by layer (`pipeline.prune_model`), then measure
perplexity on the evaluation text and the attention error per layer on held-out
calibration-text windows. `reproduce` runs the grid of rows with one fixed calibration set and
one fixed evaluation set, resumable row by row.
"""

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from attnprune_jax import data, evaluate, pipeline
from attnprune_jax.errors import InputError
from attnprune_jax.models import Llama, save
from attnprune_jax.pipeline import PruneSettings, prune_model
from attnprune_jax.reporting import Reporter
from attnprune_jax.results import (code_fingerprint, provenance, result_document,
                                   write_json_atomic)

# Rows run sparsity by sparsity in this order (the most telling first), cheap methods first, so
# that an interrupted run has the comparisons that matter most.
SPARSITIES = ("0.7", "2:4", "0.8", "0.5")
FULL_SPARSITIES = SPARSITIES + ("0.3", "0.6", "0.9")
REPRODUCE_METHODS = ("magnitude", "wanda", "sparsegpt", "attn-progressive", "attn-reweight",
                     "attn")
# The modules a row depends on: stored rows of other code are computed again (the tables and
# figures, `qk_report`, are not among them).
CODE = pipeline.CODE + ("attnprune_jax.evaluate", "attnprune_jax.data", __name__)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The fixed windows of a run (our choice; the paper used 8 C4 sentences for calibration and
  128 C4 validation sentences for perplexity).

  Attributes:
    calib_seqs: calibration windows (Emma) the methods see.
    calib_len: tokens per window (start token + text), for every window kind.
    heldout_seqs: Emma windows after the calibration ones, for the attention errors.
    eval_tokens: evaluation budget: eval_tokens // calib_len windows of Pride and Prejudice.
    batch: windows per forward pass of the perplexity.
  """
  calib_seqs: int = 8
  calib_len: int = 512
  heldout_seqs: int = 4
  eval_tokens: int = 16384
  batch: int = 4


def parse_pattern(sparsity: str) -> tuple[float, tuple[int, int] | None]:
  """'0.7' -> (0.7, None); '2:4' -> (0.5, (2, 4)): N of every M removed, integers 0 <= N < M."""
  if ":" not in sparsity:
    return float(sparsity), None
  n, _, m = sparsity.partition(":")
  try:
    n_m = int(n), int(m)
  except ValueError:
    n_m = None
  if n_m is None or not 0 <= n_m[0] < n_m[1]:
    raise InputError(f"an N:M pattern must be integers 0 <= N < M, got {sparsity!r}")
  return n_m[0] / n_m[1], n_m


def pattern_name(n_m) -> str:
  return "unstructured" if n_m is None else f"{n_m[0]}:{n_m[1]}"


def windows(model: Llama, config: DataConfig) -> dict[str, np.ndarray]:
  """The calibration, held-out (both Emma, disjoint) and evaluation (Pride and Prejudice)
  token windows."""
  emma = data.calibration_windows(model.tokenizer, count=config.calib_seqs + config.heldout_seqs,
                                  ctx=config.calib_len)
  count = config.eval_tokens // config.calib_len
  if count < 1:
    raise InputError(f"eval_tokens must be at least calib_len={config.calib_len}, "
                     f"got {config.eval_tokens}")
  return {"calibration": emma[:config.calib_seqs], "heldout": emma[config.calib_seqs:],
          "evaluation": data.evaluation_windows(model.tokenizer, count=count,
                                                ctx=config.calib_len)}


def dense_row(model: Llama, token_windows: dict, config: DataConfig, reporter: Reporter) -> dict:
  """The unpruned model's row."""
  ppl = evaluate.perplexity(model, token_windows["evaluation"], batch_size=config.batch,
                            reporter=reporter)
  return {"method": "dense", "sparsity": 0.0, "pattern": "dense",
          "perplexity": ppl["perplexity"], "eval_tokens": ppl["tokens"],
          "attention_error_mean": 0.0, "prune_time_s": 0.0}


def prune_row(model: Llama, settings: PruneSettings, token_windows: dict, config: DataConfig,
              out: Path, *, save_weights: bool = False, reporter: Reporter,
              devices=None) -> dict:
  """Prunes with `settings` (each layer's solve sharded over `devices`, if given), evaluates,
  and returns the row (checkpoints under `out`)."""
  start = time.perf_counter()
  pruned = prune_model(model, settings, token_windows["calibration"], token_windows["heldout"],
                       checkpoint_dir=out, reporter=reporter, devices=devices)
  pipeline_s = time.perf_counter() - start
  ppl = evaluate.perplexity(model, token_windows["evaluation"], batch_size=config.batch,
                            weights=pruned.weights, reporter=reporter)
  layers = [record for record in pruned.layers if record["pruned"]]
  row = {
      "method": settings.name, "sparsity": settings.sparsity,
      "pattern": pattern_name(settings.n_m), "targets": settings.targets,
      "perplexity": ppl["perplexity"], "eval_tokens": ppl["tokens"],
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
  }
  if save_weights:
    folder = out / "model"
    save(model, folder, weights=pruned.weights)
    row["saved_model"] = str(folder)
  return row


@dataclasses.dataclass(frozen=True)
class ReproduceConfig:
  """The grid of `reproduce` (all our choice; the paper's sparsities are not known)."""
  sparsities: tuple[str, ...] = SPARSITIES
  methods: tuple[str, ...] = REPRODUCE_METHODS  # a method, or "q/k method+rest method"
  layers: tuple[int, ...] | None = None  # None: every layer
  data: DataConfig = DataConfig()
  targets: str = "qk"  # a key of `pipeline.TARGETS`


def quick_layers(num_layers: int) -> tuple[int, ...]:
  """The layers nearest 1/6, 1/2 and 5/6 of the depth (5, 15, 25 of SmolLM2's 30; 3, 8, 13 of
  Llama 3.2-1B's 16); in very shallow models some coincide (3 layers: 0, 2)."""
  return tuple(sorted({min(num_layers - 1, round(num_layers * fraction))
                       for fraction in (1 / 6, 1 / 2, 5 / 6)}))


FULL = ReproduceConfig(sparsities=FULL_SPARSITIES)
# Beyond the paper: every linear of every block pruned (issue 12), the usual pruner everywhere
# against the attention-aware q/k within it, at the same sparsity of every target.
WHOLE_MODEL_METHODS = ("magnitude", "wanda", "attn-progressive+wanda", "sparsegpt",
                       "attn-reweight+sparsegpt")
WHOLE_MODEL = ReproduceConfig(sparsities=("0.5", "2:4", "0.6"), methods=WHOLE_MODEL_METHODS,
                              targets="all")


def split_method(name: str) -> tuple[str, str | None]:
  """'attn-progressive+wanda' -> ('attn-progressive', 'wanda'); 'wanda' -> ('wanda', None)."""
  method, _, rest = name.partition("+")
  return method, rest or None


# `make demo`: three layers at 0.7 and a short evaluation, a few minutes on 2 cores.
QUICK = ReproduceConfig(sparsities=("0.7",), layers=quick_layers(30),
                        methods=("wanda", "sparsegpt", "attn-progressive", "attn-reweight"),
                        data=DataConfig(eval_tokens=4096))


def reproduce(model: Llama, results_path: Path, work: Path, grid: ReproduceConfig, *,
              reporter: Reporter) -> list[dict]:
  """Every method at every sparsity of the grid, plus the dense row, resumable row by row; the
  grid's targets pruned (a results file of other targets is an error).

  Finished rows are kept in `results_path` (rewritten atomically after every row; rows of
  another grid's data settings, or computed by other code (`CODE`'s fingerprint), from other
  token windows or from another model, are not reused), and as Markdown tables beside it
  (`.md`); a row's layer checkpoints live in `row_folder(work, method, sparsity, targets)`.
  """
  from experiments.qk_report import markdown_tables  # presentation, outside CODE
  config = grid.data
  layers = tuple(range(model.config.num_layers)) if grid.layers is None else grid.layers
  token_windows = windows(model, config)
  # A stored row is reused only if made by the same code from the same token windows and model.
  row_key = {"code": code_fingerprint(CODE),
             "windows": pipeline.fingerprint(*(token_windows[k] for k in sorted(token_windows))),
             "model": pipeline.model_fingerprint(model)}
  rows = []
  if results_path.is_file():
    stored = json.loads(results_path.read_text())
    if stored.get("targets", "qk") != grid.targets:
      raise InputError(f"{results_path} holds rows of targets {stored.get('targets', 'qk')!r}, "
                       f"not {grid.targets!r}; write them to another file")
    if stored.get("data") == dataclasses.asdict(config) and stored.get("layers") == list(layers):
      rows = [row for row in stored["rows"] if row.get("key") == row_key]
      stale = len(stored["rows"]) - len(rows)
      if stale:
        commits = sorted({row.get("provenance", {}).get("git_commit") or "unknown"
                          for row in stored["rows"] if row.get("key") != row_key})
        reporter.info(f"reproduce: {stale} stored rows were computed by other code, from other "
                      f"windows or from another model (commits {', '.join(commits)}); they are "
                      "computed again")
  done = {(row["method"], row["pattern"], row["sparsity"]) for row in rows}
  start = time.perf_counter()
  # `attn` (Algorithm 1 and one cut) runs after every other row: the bar concerns the
  # progressive and re-weighting methods.
  cells = [("dense", None)] + sorted(
      [(method, sparsity) for sparsity in grid.sparsities for method in grid.methods],
      key=lambda cell: cell[0] == "attn")
  for method, sparsity in cells:
    if method == "dense":
      key = ("dense", "dense", 0.0)
    else:
      value, n_m = parse_pattern(sparsity)
      key = (method, pattern_name(n_m), value)
    if key in done:
      continue
    reporter.info(f"reproduce: {method} at {sparsity or 'no pruning'}")
    row_start = time.perf_counter()
    if method == "dense":
      row = dense_row(model, token_windows, config, reporter)
    else:
      first, rest = split_method(method)
      settings = PruneSettings(first, value, n_m, layers, targets=grid.targets, rest=rest)
      row = prune_row(model, settings, token_windows, config,
                      row_folder(work, method, sparsity, grid.targets), reporter=reporter)
    row["key"] = row_key
    row["provenance"] = provenance(seed=None, settings={"row": [method, sparsity]},
                                   wall_time_s=time.perf_counter() - row_start)
    rows.append(row)
    kind = {"qk": "qk-pruning", "attention": "attention-linears", "all": "whole-model"}[
        grid.targets]
    write_json_atomic(results_path, result_document(kind, {
        "data": dataclasses.asdict(config), "layers": list(layers), "targets": grid.targets,
        "rows": rows}, provenance(
            seed=None, settings={"sparsities": list(grid.sparsities),
                                 "methods": list(grid.methods)},
            wall_time_s=time.perf_counter() - start)))
    results_path.with_suffix(".md").write_text(markdown_tables(rows, grid.targets))
    reporter.table(["method", "pattern", "sparsity", "perplexity", "attn error", "prune s"],
                   [[row["method"], row["pattern"], row["sparsity"], row["perplexity"],
                     row["attention_error_mean"], row["prune_time_s"]]])
  return rows


def row_folder(work: Path, method: str, sparsity: str, targets: str = "qk") -> Path:
  """Where a reproduce row keeps its layer checkpoint."""
  name = f"{method}-{sparsity.replace(':', 'of')}"
  return work / (name if targets == "qk" else f"{targets}-{name}")
