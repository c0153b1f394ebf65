"""Figures and Markdown tables of the real-model comparison (the rows of `runs.reproduce`).

Methods appear in the grids' order, any others after them; their colours come from the method
registry (`methods.color`), so a newly registered method needs nothing here.
"""

from pathlib import Path

import numpy as np

from attnprune_jax import methods, runs
from attnprune_jax.models import Llama
from attnprune_jax.results import model_fingerprint
from attnprune_jax.settings import QK_METHODS, TARGETS, WHOLE_MODEL_METHODS, DataConfig, Grid
# The bar: (ours, the baselines it must beat) on the perplexity increase over dense.
CHECKS = {
    "qk": {"Δppl `attn-progressive` / min(magnitude, Wanda)": ("attn-progressive",
                                                                ("magnitude", "wanda")),
           "Δppl `attn-reweight` / SparseGPT": ("attn-reweight", ("sparsegpt",)),
           "Δppl `attn` / min(magnitude, Wanda)": ("attn", ("magnitude", "wanda"))},
    "rest": {"Δppl `attn-progressive+wanda` / Wanda": ("attn-progressive+wanda", ("wanda",)),
             "Δppl `attn-reweight+sparsegpt` / SparseGPT": ("attn-reweight+sparsegpt",
                                                             ("sparsegpt",)),
             # The whole-model issue's bar: the best baseline of the same kind.
             "Δppl `attn-block` / min(Wanda, OWL+Wanda)": ("attn-block",
                                                           ("wanda", "owl:wanda")),
             "Δppl `owl:attn-block` / min(Wanda, OWL+Wanda)": ("owl:attn-block",
                                                               ("wanda", "owl:wanda")),
             "Δppl `attn-block-reweight` / min(SparseGPT, OWL+SparseGPT)": (
                 "attn-block-reweight", ("sparsegpt", "owl:sparsegpt")),
             "Δppl `owl:attn-block-reweight` / min(SparseGPT, OWL+SparseGPT)": (
                 "owl:attn-block-reweight", ("sparsegpt", "owl:sparsegpt"))},
}
# Whose held-out attention errors are compared layer by layer: (ours, baseline).
LAYER_WINS = {"qk": ("attn-progressive", "wanda"), "rest": ("attn-progressive+wanda", "wanda")}
MAP_LAYER, MAP_HEAD, MAP_TOKENS, MAP_SPARSITY = 15, 0, 96, 0.7


def _save(fig, path: Path) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  from matplotlib import pyplot as plt
  plt.close(fig)
  return path


def plot(rows: list[dict], figures: Path, *, model: Llama | None = None,
         work: Path | None = None, config: DataConfig | None = None) -> list[Path]:
  """The figures of the real-model comparison; the attention maps need the model and the
  rows' checkpoints in `work`. Returns the paths written."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  dense = next((row["perplexity"] for row in rows if row["method"] == "dense"), None)
  pruned = [row for row in rows if row["method"] != "dense"]
  names = _in_order({row["method"] for row in pruned}, QK_METHODS)
  paths = []

  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2),
                                    gridspec_kw={"width_ratios": [2.2, 1]})
  for method in names:
    points = sorted((row["sparsity"], row["perplexity"]) for row in pruned
                    if row["method"] == method and row["pattern"] == "unstructured")
    if points:
      left.plot(*zip(*points), "o-", color=methods.color(method), label=method)
  nm = [(m, row["perplexity"]) for m in names for row in pruned
        if row["method"] == m and row["pattern"] == "2:4"]
  right.bar(range(len(nm)), [p for _, p in nm], color=[methods.color(m) for m, _ in nm])
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
    for method in names:
      row = next((r for r in pruned if (r["method"], r["pattern"], r["sparsity"])
                  == (method, pattern, sparsity)), None)
      if row:
        layers = sorted(row["attention_error_per_layer"], key=int)
        axis.plot([int(k) for k in layers], [row["attention_error_per_layer"][k] for k in layers],
                  ".-", color=methods.color(method), label=method)
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
           for m in names]
  axis.bar(range(len(times)), [t for _, t in times], color=[methods.color(m) for m, _ in times])
  axis.set_xticks(range(len(times)), [m for m, _ in times], rotation=30, ha="right")
  axis.set_yscale("log")
  axis.set_ylabel("prune time of 30 layers, s (mean over rows)")
  paths.append(_save(fig, figures / "prune_time.png"))

  if model is not None and work is not None:
    path = _plot_attention_maps(model, work, config or DataConfig(),
                                figures / "attention_maps.png")
    if path is not None:
      paths.append(path)
  return paths


def _plot_attention_maps(model: Llama, work: Path, config: DataConfig, path: Path):
  """Dense, Wanda and attn-progressive attention of one head on a held-out window, at 0.7."""
  from matplotlib import pyplot as plt
  heldout = runs.token_windows(model, config)["heldout"][:1, :MAP_TOKENS]
  model_key = model_fingerprint(model)
  maps = {}
  for method in ("dense", "wanda", "attn-progressive"):
    weights = None
    if method != "dense":
      weights = runs.row_folder(work, method, str(MAP_SPARSITY)).finished_weights(model,
                                                                                  model_key)
      if weights is None:
        return None
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


def _in_order(names: set[str], order: tuple[str, ...]) -> list[str]:
  """`names` in the grid's `order`, any others after them alphabetically."""
  return [m for m in order if m in names] + sorted(names - set(order))


def markdown_tables(rows: list[dict], targets: str = "qk") -> str:
  """The rows as Markdown: perplexity (and its increase over dense), held-out attention error,
  prune time, the fractions removed (targets beyond q/k), and the issue's bar (ratios of
  perplexity increases, layers won). A missing row is "not run", or "n/a" where it cannot run
  (an allocation at N:M)."""
  scope = "qk" if targets == "qk" else "rest"
  order = QK_METHODS if scope == "qk" else WHOLE_MODEL_METHODS
  dense = next((row["perplexity"] for row in rows if row["method"] == "dense"), float("nan"))
  cells = {(row["method"], row["pattern"] if row["pattern"] != "unstructured"
            else f"{row['sparsity']:g}"): row for row in rows if row["method"] != "dense"}
  columns = sorted({c for _, c in cells}, key=lambda c: (":" in c, c))
  names = _in_order({m for m, _ in cells}, order)

  def table(title, value):
    lines = [f"| {title} | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    for method in names:
      lines.append(f"| `{method}` | " + " | ".join(
          value(cells[(method, c)]) if (method, c) in cells
          else "not run" if Grid.applies(method, c) else "n/a" for c in columns) + " |")
    return "\n".join(lines)

  def increase(method, column):
    row = cells.get((method, column))
    return None if row is None else row["perplexity"] - dense

  bar = ["| check | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
  for title, (ours, theirs) in CHECKS[scope].items():
    values = []
    for column in columns:
      mine = increase(ours, column)
      best = [increase(m, column) for m in theirs if increase(m, column) is not None]
      values.append("–" if mine is None or not best else f"{mine / min(best):.2f}")
    bar.append(f"| {title} | " + " | ".join(values) + " |")
  won = []
  ours_name, theirs_name = LAYER_WINS[scope]
  for column in columns:
    ours, theirs = cells.get((ours_name, column)), cells.get((theirs_name, column))
    if ours is None or theirs is None:
      won.append("–")
      continue
    layers = ours["attention_error_per_layer"]
    wins = sum(layers[k] < theirs["attention_error_per_layer"][k] for k in layers)
    won.append(f"{wins}/{len(layers)}")
  bar.append(f"| layers where `{ours_name}` has lower held-out attention error than "
             f"`{theirs_name}` | " + " | ".join(won) + " |")
  tables = [
      f"Dense perplexity: {dense:.3f}.",
      table("perplexity (Δ over dense)",
            lambda r: f"{r['perplexity']:.2f} (+{r['perplexity'] - dense:.2f})"),
      table("held-out attention error, mean over layers",
            lambda r: f"{r['attention_error_mean']:.1f}"),
      table("prune time of all layers, s", lambda r: f"{r['prune_time_s']:.0f}")]
  if any("kl_divergence" in row for row in cells.values()):
    tables[2:2] = [
        table("KL(dense ‖ pruned) of the next token, nats (mean over evaluation tokens)",
              lambda r: f"{r['kl_divergence']:.3f}" if "kl_divergence" in r else "not stored"),
        table("top-1 agreement with dense",
              lambda r: (f"{100 * r['top1_agreement']:.1f} %" if "top1_agreement" in r
                         else "not stored"))]
  if scope == "rest":
    tables.append(table("removed: decoder linears (all parameters)", lambda r: (
        f"{100 * r['removed']['linear']:.2f} % ({100 * r['removed']['model']:.2f} %)")))
  return "\n\n".join(tables + ["\n".join(bar)]) + "\n"


def plot_whole_model(rows: list[dict], path: Path, targets: str = "all") -> Path:
  """Left: perplexity of every method at every sparsity (grouped bars, log scale), every target
  (`settings.TARGETS[targets]`) of every block pruned. Right: each attention-aware q/k row's
  perplexity increase over dense divided by that of the baseline it runs inside."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  dense = next((row["perplexity"] for row in rows if row["method"] == "dense"), None)
  cells = {(r["method"], r["sparsity"], r["pattern"]): r for r in rows if r["method"] != "dense"}
  columns = sorted({(pattern != "unstructured", sparsity, pattern)
                    for _, sparsity, pattern in cells})
  labels = [f"{s:g}" if p == "unstructured" else p for _, s, p in columns]
  series = _in_order({method for method, _, _ in cells}, WHOLE_MODEL_METHODS)
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2),
                                    gridspec_kw={"width_ratios": [1.8, 1]})

  def bars(axis, series, value):
    width = 0.8 / max(len(series), 1)
    for i, method in enumerate(series):
      label = method
      for j, (_, sparsity, pattern) in enumerate(columns):
        height = value(method, sparsity, pattern)
        if height is not None:
          axis.bar(j + (i - (len(series) - 1) / 2) * width, height, width,
                   color=methods.color(method), edgecolor="white",
                   hatch="//" if "+" in method else ".." if ":" in method else "",
                   label=label)
          label = None
    axis.set_xticks(range(len(columns)), labels)

  bars(left, series, lambda m, s, p: cells[(m, s, p)]["perplexity"] if (m, s, p) in cells
       else None)
  if dense is not None:
    left.axhline(dense, color="black", linestyle="--", linewidth=1, label="dense")
  left.set_yscale("log")
  left.set_ylabel("perplexity (Pride and Prejudice)")
  left.set_xlabel("sparsity of the targets (unstructured, per row) or 2:4")
  left.set_title(", ".join(TARGETS[targets]) + " of every block pruned;\nthe same sparsity in "
                 "every block, or OWL's (dotted)", fontsize=9)
  left.legend(fontsize=8)

  baselines = {ours: theirs for ours, theirs in CHECKS["rest"].values()
               if any(m == ours for m, _, _ in cells)}

  def ratio(ours, sparsity, pattern):
    mine = cells.get((ours, sparsity, pattern))
    base = [cells[(m, sparsity, pattern)]["perplexity"] - dense for m in baselines[ours]
            if (m, sparsity, pattern) in cells]
    if dense is None or mine is None or not base:
      return None
    return (mine["perplexity"] - dense) / min(base)

  bars(right, list(baselines), ratio)
  right.axhline(1.0, color="black", linewidth=1)
  right.set_ylim(0.0, 1.3)
  right.set_ylabel("Δppl(ours) / Δppl(best baseline of its kind)")
  right.set_title("attention-aware methods against the baselines (< 1: better)", fontsize=9)
  right.legend(fontsize=8, loc="upper center", ncols=2)
  return _save(fig, path)
