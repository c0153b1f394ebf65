"""Paper sections 6.2–6.3 on our model: q/k pruning of the real model, every method compared.

One row = one method at one sparsity/pattern: prune q_proj and k_proj of the chosen layers
layer by layer (`pipeline.prune_model`), then measure perplexity on the evaluation text and the
attention error per layer on held-out calibration-text windows. `reproduce` runs the grid of
rows with one fixed calibration set and one fixed evaluation set, resumable row by row.
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
# The modules a row depends on: stored rows of other code are computed again.
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
  """'0.7' -> (0.7, None); '2:4' -> (0.5, (2, 4))."""
  if ":" in sparsity:
    n, m = (int(part) for part in sparsity.split(":"))
    return n / m, (n, m)
  return float(sparsity), None


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
              out: Path, *, save_weights: bool = False, reporter: Reporter) -> dict:
  """Prunes with `settings`, evaluates, and returns the row (checkpoints under `out`)."""
  start = time.perf_counter()
  pruned = prune_model(model, settings, token_windows["calibration"], token_windows["heldout"],
                       checkpoint_dir=out, reporter=reporter)
  pipeline_s = time.perf_counter() - start
  ppl = evaluate.perplexity(model, token_windows["evaluation"], batch_size=config.batch,
                            weights=pruned.weights, reporter=reporter)
  layers = [record for record in pruned.layers if record["pruned"]]
  row = {
      "method": settings.method, "sparsity": settings.sparsity,
      "pattern": pattern_name(settings.n_m), "perplexity": ppl["perplexity"],
      "eval_tokens": ppl["tokens"],
      "attention_error_mean": float(np.mean([r["attention_error"] for r in layers])),
      "attention_error_per_layer": {str(r["layer"]): r["attention_error"] for r in layers},
      "attention_error_end_to_end_per_layer": {
          str(r["layer"]): r["attention_error_end_to_end"] for r in pruned.layers},
      "prune_time_s": float(sum(r["prune_time_s"] for r in layers)),
      "pipeline_time_s": pipeline_s,
      "kept_fraction": float(np.mean([(r["kept_q"] + r["kept_k"]) / 2 for r in layers])),
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
  methods: tuple[str, ...] = REPRODUCE_METHODS
  layers: tuple[int, ...] | None = None  # None: every layer
  data: DataConfig = DataConfig()


FULL = ReproduceConfig(sparsities=FULL_SPARSITIES)
# `make demo`: three layers at 0.7 and a short evaluation, a few minutes on 2 cores.
QUICK = ReproduceConfig(sparsities=("0.7",), layers=(5, 15, 25),
                        methods=("wanda", "sparsegpt", "attn-progressive", "attn-reweight"),
                        data=DataConfig(eval_tokens=4096))


def reproduce(model: Llama, results_path: Path, work: Path, grid: ReproduceConfig, *,
              reporter: Reporter) -> list[dict]:
  """Every method at every sparsity of the grid, plus the dense row, resumable row by row.

  Finished rows are kept in `results_path` (rewritten atomically after every row; rows of
  another grid's data settings, or computed by other code (`CODE`'s fingerprint), are not
  reused), and as Markdown tables beside it (`.md`); a row's layer checkpoints live in
  `row_folder(work, method, sparsity)`.
  """
  config = grid.data
  layers = tuple(range(model.config.num_layers)) if grid.layers is None else grid.layers
  token_windows = windows(model, config)
  code = code_fingerprint(CODE)
  rows = []
  if results_path.is_file():
    stored = json.loads(results_path.read_text())
    if stored.get("data") == dataclasses.asdict(config) and stored.get("layers") == list(layers):
      rows = [row for row in stored["rows"] if row.get("code") == code]
      stale = len(stored["rows"]) - len(rows)
      if stale:
        commits = sorted({row.get("provenance", {}).get("git_commit") or "unknown"
                          for row in stored["rows"] if row.get("code") != code})
        reporter.info(f"reproduce: {stale} stored rows were computed by other code (commits "
                      f"{', '.join(commits)}); they are computed again")
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
      settings = PruneSettings(method, value, n_m, layers)
      row = prune_row(model, settings, token_windows, config, row_folder(work, method, sparsity),
                      reporter=reporter)
    row["code"] = code
    row["provenance"] = provenance(seed=None, settings={"row": [method, sparsity]},
                                   wall_time_s=time.perf_counter() - row_start)
    rows.append(row)
    write_json_atomic(results_path, result_document("qk-pruning", {
        "data": dataclasses.asdict(config), "layers": list(layers), "rows": rows}, provenance(
            seed=None, settings={"sparsities": list(grid.sparsities),
                                 "methods": list(grid.methods)},
            wall_time_s=time.perf_counter() - start)))
    results_path.with_suffix(".md").write_text(markdown_tables(rows))
    reporter.table(["method", "pattern", "sparsity", "perplexity", "attn error", "prune s"],
                   [[row["method"], row["pattern"], row["sparsity"], row["perplexity"],
                     row["attention_error_mean"], row["prune_time_s"]]])
  return rows


METHOD_COLORS = {"magnitude": "tab:gray", "wanda": "tab:blue", "sparsegpt": "tab:purple",
                 "attn": "tab:olive", "attn-progressive": "tab:red",
                 "attn-reweight": "tab:orange"}
MAP_LAYER, MAP_HEAD, MAP_TOKENS, MAP_SPARSITY = 15, 0, 96, 0.7


def _save(fig, path: Path) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  from matplotlib import pyplot as plt
  plt.close(fig)
  return path


def row_folder(work: Path, method: str, sparsity: str) -> Path:
  """Where a reproduce row keeps its layer checkpoint."""
  return work / f"{method}-{sparsity.replace(':', 'of')}"


def plot(rows: list[dict], figures: Path, *, model: Llama | None = None,
         work: Path | None = None, config: DataConfig = DataConfig()) -> list[Path]:
  """The figures of the real-model comparison; the attention maps need the model and the
  rows' checkpoints in `work`. Returns the paths written."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  dense = next((row["perplexity"] for row in rows if row["method"] == "dense"), None)
  pruned = [row for row in rows if row["method"] != "dense"]
  methods = [m for m in REPRODUCE_METHODS if any(row["method"] == m for row in pruned)]
  paths = []

  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2),
                                    gridspec_kw={"width_ratios": [2.2, 1]})
  for method in methods:
    points = sorted((row["sparsity"], row["perplexity"]) for row in pruned
                    if row["method"] == method and row["pattern"] == "unstructured")
    if points:
      left.plot(*zip(*points), "o-", color=METHOD_COLORS[method], label=method)
  nm = [(m, row["perplexity"]) for m in methods for row in pruned
        if row["method"] == m and row["pattern"] == "2:4"]
  right.bar(range(len(nm)), [p for _, p in nm], color=[METHOD_COLORS[m] for m, _ in nm])
  right.set_xticks(range(len(nm)), [m for m, _ in nm], rotation=40, ha="right")
  for axis, title in ((left, "unstructured, per output row"), (right, "2:4")):
    if dense is not None:
      axis.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
    axis.set_yscale("log")
    axis.set_ylabel("perplexity (Pride and Prejudice)")
    axis.set_title(f"q_proj + k_proj of all layers, {title}")
  left.set_xlabel("sparsity of q_proj and k_proj")
  left.legend(fontsize=8)
  paths.append(_save(fig, figures / "perplexity.png"))

  patterns = sorted({(row["pattern"], row["sparsity"]) for row in pruned},
                    key=lambda p: (p[0] != "unstructured", p[1]))
  fig, axes = plt.subplots(1, len(patterns), figsize=(4.2 * len(patterns), 3.8), sharey=True,
                           squeeze=False)
  for axis, (pattern, sparsity) in zip(axes[0], patterns):
    for method in methods:
      row = next((r for r in pruned if (r["method"], r["pattern"], r["sparsity"])
                  == (method, pattern, sparsity)), None)
      if row:
        layers = sorted(row["attention_error_per_layer"], key=int)
        axis.plot([int(k) for k in layers], [row["attention_error_per_layer"][k] for k in layers],
                  ".-", color=METHOD_COLORS[method], label=method)
    axis.set_yscale("log")
    axis.set_xlabel("layer")
    axis.set_title(pattern if pattern != "unstructured" else f"sparsity {sparsity:g}")
  axes[0][0].set_ylabel("held-out attention error Σ_h‖ΔA_h‖²_F")
  labels = {}
  for axis in axes[0]:
    for handle, label in zip(*axis.get_legend_handles_labels()):
      labels.setdefault(label, handle)
  axes[0][0].legend(labels.values(), labels.keys(), fontsize=7)
  paths.append(_save(fig, figures / "attention_error_per_layer.png"))

  fig, axis = plt.subplots(figsize=(6, 3.8))
  times = [(m, np.mean([r["prune_time_s"] for r in pruned if r["method"] == m]))
           for m in methods]
  axis.bar(range(len(times)), [t for _, t in times], color=[METHOD_COLORS[m] for m, _ in times])
  axis.set_xticks(range(len(times)), [m for m, _ in times], rotation=30, ha="right")
  axis.set_yscale("log")
  axis.set_ylabel("prune time of 30 layers, s (mean over rows)")
  paths.append(_save(fig, figures / "prune_time.png"))

  if model is not None and work is not None:
    path = _plot_attention_maps(model, work, config, figures / "attention_maps.png")
    if path is not None:
      paths.append(path)
  return paths


def _plot_attention_maps(model: Llama, work: Path, config: DataConfig, path: Path):
  """Dense, Wanda and attn-progressive attention of one head on a held-out window, at 0.7."""
  from matplotlib import pyplot as plt
  heldout = windows(model, config)["heldout"][:1, :MAP_TOKENS]
  maps = {}
  for method in ("dense", "wanda", "attn-progressive"):
    weights = None
    if method != "dense":
      checkpoint = row_folder(work, method, str(MAP_SPARSITY)) / "checkpoint.npz"
      if not checkpoint.is_file():
        return None
      with np.load(checkpoint) as stored:
        weights = {"q_proj": stored["q_proj"], "k_proj": stored["k_proj"]}
    _, captured = model(heldout, weights=weights, return_attention=True)
    maps[method] = np.asarray(captured["attention"][MAP_LAYER, 0, MAP_HEAD])
  from matplotlib.colors import PowerNorm
  fig, axes = plt.subplots(2, 3, figsize=(12, 8))
  # A power norm, so that the attention sink on token 0 does not wash out the rest.
  norm = PowerNorm(gamma=0.4, vmin=0, vmax=1)
  for axis, (name, values) in zip(axes[0], maps.items()):
    axis.imshow(values, cmap="viridis", norm=norm)
    axis.set_title(name if name == "dense" else f"{name} at {MAP_SPARSITY}")
  axes[1][0].axis("off")
  bound = np.quantile(np.abs(maps["wanda"] - maps["dense"]), 0.999)
  for axis, name in zip(axes[1][1:], ("wanda", "attn-progressive")):
    gap = maps[name] - maps["dense"]
    axis.imshow(gap, cmap="RdBu_r", vmin=-bound, vmax=bound)
    axis.set_title(f"{name} − dense (red: more attention), ‖·‖²_F = {np.sum(gap**2):.3g}",
                   fontsize=9)
  fig.suptitle(f"layer {MAP_LAYER}, head {MAP_HEAD}, first {MAP_TOKENS} tokens of a held-out "
               "Emma window (q/k of all layers pruned)")
  return _save(fig, path)


def markdown_tables(rows: list[dict]) -> str:
  """The rows as Markdown: perplexity (and its increase over dense), held-out attention error,
  prune time, and the issue's bar (ratios of perplexity increases, layers won)."""
  dense = next((row["perplexity"] for row in rows if row["method"] == "dense"), float("nan"))
  cells = {(row["method"], row["pattern"] if row["pattern"] != "unstructured"
            else f"{row['sparsity']:g}"): row for row in rows if row["method"] != "dense"}
  columns = sorted({c for _, c in cells}, key=lambda c: (":" in c, c))
  methods = [m for m in REPRODUCE_METHODS if any(m == key[0] for key in cells)]

  def table(title, value):
    lines = [f"| {title} | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for method in methods:
      lines.append(f"| `{method}` | " + " | ".join(
          value(cells[(method, c)]) if (method, c) in cells else "not run" for c in columns)
          + " |")
    return "\n".join(lines)

  def increase(method, column):
    row = cells.get((method, column))
    return None if row is None else row["perplexity"] - dense

  bar = [f"| check | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
  checks = {
      "Δppl `attn-progressive` / min(magnitude, Wanda)": ("attn-progressive",
                                                            ("magnitude", "wanda")),
      "Δppl `attn-reweight` / SparseGPT": ("attn-reweight", ("sparsegpt",)),
      "Δppl `attn` / min(magnitude, Wanda)": ("attn", ("magnitude", "wanda")),
  }
  for title, (ours, theirs) in checks.items():
    values = []
    for column in columns:
      mine = increase(ours, column)
      best = [increase(m, column) for m in theirs if increase(m, column) is not None]
      values.append("–" if mine is None or not best else f"{mine / min(best):.2f}")
    bar.append(f"| {title} | " + " | ".join(values) + " |")
  won = []
  for column in columns:
    ours, wanda = cells.get(("attn-progressive", column)), cells.get(("wanda", column))
    if ours is None or wanda is None:
      won.append("–")
      continue
    layers = ours["attention_error_per_layer"]
    wins = sum(layers[k] < wanda["attention_error_per_layer"][k] for k in layers)
    won.append(f"{wins}/{len(layers)}")
  bar.append("| layers where `attn-progressive` has lower held-out attention error than Wanda | "
             + " | ".join(won) + " |")
  return "\n\n".join([
      f"Dense perplexity: {dense:.3f}.",
      table("perplexity (Δ over dense)",
            lambda r: f"{r['perplexity']:.2f} (+{r['perplexity'] - dense:.2f})"),
      table("held-out attention error, mean over layers",
            lambda r: f"{r['attention_error_mean']:.1f}"),
      table("prune time of all layers, s", lambda r: f"{r['prune_time_s']:.0f}"),
      "\n".join(bar)]) + "\n"
