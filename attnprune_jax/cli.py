"""The `attnprune` command. Subcommands are registered in `COMMANDS`, nowhere else."""

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from attnprune_jax import __version__, validation
from attnprune_jax.errors import InputError
from attnprune_jax.reporting import Reporter
from attnprune_jax.results import (check_output_path, json_text, provenance, result_document,
                                   write_json_atomic)


class Command(NamedTuple):
  """A subcommand: its name, one-line help, its options, and what it runs.

  `run(args, reporter)` checks every option before any work, returns (results dict, seed) and
  reports to people through `reporter`. A `resumable` command keeps what it finished, so a rerun
  after an interruption goes on from there.
  """
  name: str
  help: str
  add_arguments: Callable[[argparse.ArgumentParser], None]
  run: Callable[[argparse.Namespace, Reporter], tuple[dict, int | None]]
  resumable: bool = False


MAX_STEPS = 10**7  # our choice: far beyond any useful run
MAX_DEMO_ENTRIES = 2**26  # our choice: 256 MiB of float32 per array of the demo
# Options naming what a command writes (True: a folder), checked before any work.
OUTPUT_OPTIONS = {"json": False, "results": False, "out": True, "work": True, "figures": True}


def _option(dest: str) -> str:
  return "--" + dest.replace("_", "-")


def _check_integer(args: argparse.Namespace, dest: str, minimum: int = 1,
                   maximum: int = validation.MAX_COUNT) -> None:
  """An InputError naming the option unless its value lies in [minimum, maximum]."""
  value = getattr(args, dest)
  if not minimum <= value <= maximum:
    raise InputError(f"{_option(dest)} must be an integer in [{minimum}, {maximum}], got {value}")


def _check_real(args: argparse.Namespace, dest: str, minimum: float = 0.0, *,
                strict: bool = False, below: float = math.inf) -> None:
  """An InputError naming the option unless its value (each, for a list) is finite, >= minimum
  (> if strict) and < below."""
  values = getattr(args, dest)
  for value in values if isinstance(values, list) else [values]:
    if not (math.isfinite(value) and (value > minimum if strict else value >= minimum)
            and value < below):
      raise InputError(f"{_option(dest)} must be in {'(' if strict else '['}{minimum:g}, "
                       f"{below:g}), got {value}")


def _check_outputs(args: argparse.Namespace) -> None:
  """Checks every output path given (see `results.check_output_path`) before any work."""
  for dest, folder in OUTPUT_OPTIONS.items():
    path = getattr(args, dest, None)
    if path is not None and not (dest == "json" and path == "-"):
      check_output_path(_option(dest), path, folder=folder)


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
  from experiments.demo import DemoConfig
  defaults = DemoConfig()
  parser.add_argument("--n", type=int, default=defaults.n, help="tokens per sequence")
  parser.add_argument("--d", type=int, default=defaults.d, help="model width (at least 4)")
  parser.add_argument("--batch", type=int, default=defaults.batch, help="calibration sequences")
  parser.add_argument("--rank", type=int, default=defaults.rank, help="rank of W (head dim)")
  parser.add_argument("--lam", type=float, default=defaults.lam, help="λ of the L2 term")
  parser.add_argument("--steps", type=int, default=defaults.steps, help="gradient steps T")
  parser.add_argument("--step-fraction", type=float, default=defaults.step_fraction,
                      help="step size as a fraction of 1/L_s (L_s measured at M0)")
  parser.add_argument("--sparsities", type=float, nargs="+", default=list(defaults.sparsities),
                      help="target sparsities of the binary masks")
  parser.add_argument("--no-causal", dest="causal", action="store_false",
                      help="full (non-causal) attention")
  parser.add_argument("--seed", type=int, default=defaults.seed, help="PRNG seed")


def _demo_run(args: argparse.Namespace, reporter: Reporter) -> tuple[dict, int]:
  from attnprune_jax.masks import kept_count
  from experiments import demo
  for dest in ("n", "batch", "rank"):
    _check_integer(args, dest)
  _check_integer(args, "d", minimum=4)  # the synthetic inputs have 4 outlier channels
  _check_integer(args, "steps", maximum=MAX_STEPS)
  _check_integer(args, "seed", minimum=-2**63, maximum=2**63 - 1)  # what jax.random.key takes
  _check_real(args, "lam")
  _check_real(args, "step_fraction", strict=True)
  _check_real(args, "sparsities", below=1.0)
  if args.rank > args.d:
    raise InputError(f"--rank must be at most --d={args.d}, got {args.rank}")
  entries = max(args.batch * args.n * max(args.n, args.d), args.d**2)  # scores, inputs, W
  if entries > MAX_DEMO_ENTRIES:
    raise InputError(f"--batch x --n x max(--n, --d) and --d x --d must be at most "
                     f"{MAX_DEMO_ENTRIES} (a small head), got {entries}")
  for sparsity in args.sparsities:
    if kept_count(args.d, sparsity) < 1:
      raise InputError(f"--sparsities {sparsity:g} keeps none of the --d={args.d} entries of a "
                       "row; a row must keep at least one")
  config = demo.DemoConfig(n=args.n, d=args.d, batch=args.batch, rank=args.rank, lam=args.lam,
                           steps=args.steps, step_fraction=args.step_fraction,
                           sparsities=tuple(args.sparsities), causal=args.causal,
                           seed=args.seed)
  results = demo.run(config, reporter)
  demo.report(results, reporter)
  return results, config.seed


MODEL_HELP = ("smollm2 (the embedded default), a local Hugging Face Llama checkpoint folder (e.g. "
              "Llama 3.2-1B: config.json, *.safetensors, tokenizer.json) or a Llama GGUF file")


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model", default="smollm2", help=MODEL_HELP)
  parser.add_argument("--tokens", type=int, default=32768,
                      help="evaluation budget: tokens // ctx windows of Pride and Prejudice")
  parser.add_argument("--ctx", type=int, default=512, help="window length (start token + text)")
  parser.add_argument("--batch", type=int, default=4, help="windows per forward pass")


def _check_text_fits(model, text: str, count: int, ctx: int, options: str) -> None:
  """An InputError naming `options` unless `count` windows of `ctx` tokens fit in `text` and
  `ctx` in the model's longest sequence."""
  from attnprune_jax import data
  if model.tokenizer is None:
    raise InputError("--model has no tokenizer (a checkpoint folder without tokenizer.json?); "
                     "the text windows need one")
  longest = model.config.max_positions
  if longest is not None and ctx > longest:
    raise InputError(f"{options} ask for windows of {ctx} tokens; the model handles at most "
                     f"{longest} (its max_position_embeddings / context length)")
  needed, available = count * (ctx - 1), data.text_tokens(model.tokenizer, text).size
  if needed > available:
    raise InputError(f"{options} ask for {count} windows of {ctx} tokens, {needed} tokens of "
                     f"{text}, which has {available}")


def _eval_run(args: argparse.Namespace, reporter: Reporter) -> tuple[dict, None]:
  from attnprune_jax import data, evaluate, models
  for dest in ("tokens", "batch"):
    _check_integer(args, dest)
  _check_integer(args, "ctx", minimum=2)
  if args.tokens < args.ctx:
    raise InputError(f"--tokens must be at least --ctx={args.ctx} (one window), got "
                     f"{args.tokens}")
  start = time.perf_counter()
  model = models.load(args.model)
  load_s = time.perf_counter() - start
  count = args.tokens // args.ctx
  _check_text_fits(model, data.EVALUATION_TEXT, count, args.ctx, "--tokens and --ctx")
  windows = data.evaluation_windows(model.tokenizer, count=count, ctx=args.ctx)
  start = time.perf_counter()
  results = evaluate.perplexity(model, windows, batch_size=args.batch, reporter=reporter)
  eval_s = time.perf_counter() - start
  results |= {"model": args.model, "text": data.EVALUATION_TEXT, "load_s": load_s,
              "eval_s": eval_s, "tokens_per_s": results["tokens"] / eval_s}
  reporter.info(f"{args.model}: perplexity {results['perplexity']:.3f} on {results['tokens']} "
                f"tokens of Pride and Prejudice ({results['windows']} windows x {args.ctx}); "
                f"{results['tokens_per_s']:.0f} tokens/s incl. compile")
  return results, None


def _experiment_arguments(parser: argparse.ArgumentParser, *, out: str, quick: str,
                          figures: str) -> None:
  """--out, --quick and --figures of a convergence experiment, with these helps."""
  parser.add_argument("--out", required=True, help=out)
  parser.add_argument("--quick", action="store_true", help=quick)
  parser.add_argument("--figures", metavar="DIR",
                      help="also copy the PNGs and a summary.json (summary + provenance) to DIR, "
                           f"e.g. {figures}")


def _synthetic_arguments(parser: argparse.ArgumentParser) -> None:
  _experiment_arguments(parser, out="output folder (results.json, runs/, PNGs)",
                        quick="a small grid that finishes in well under 3 minutes on 2 cores",
                        figures="figures/synthetic")


def _synthetic_run(args: argparse.Namespace, reporter: Reporter) -> tuple[dict, None]:
  from experiments import convergence_report
  from experiments import synthetic_convergence as experiment
  config = experiment.QUICK if args.quick else experiment.SyntheticConfig()
  start = time.perf_counter()
  results = experiment.run(config, Path(args.out), reporter)
  return _write_convergence("synthetic", results, convergence_report.plot_synthetic, args,
                            {"quick": args.quick, "out": args.out, "figures": args.figures},
                            start, reporter)


def _write_convergence(kind: str, results: dict, plot, args: argparse.Namespace, settings: dict,
                       start: float, reporter: Reporter) -> tuple[dict, None]:
  """Plots, writes OUT/results.json (with `--figures`, the PNGs and a summary.json too) and
  prints the report of a convergence experiment's `results`."""
  from experiments import convergence_report
  code = results.pop("provenance")  # the fingerprint and the commits of reused results
  figures = plot(results, Path(args.out))
  document = result_document(kind, results, provenance(
      seed=None, settings=settings, wall_time_s=time.perf_counter() - start) | code)
  write_json_atomic(Path(args.out) / "results.json", document)
  if args.figures:
    Path(args.figures).mkdir(parents=True, exist_ok=True)
    for path in figures:
      shutil.copyfile(path, Path(args.figures) / path.name)
    write_json_atomic(Path(args.figures) / "summary.json", result_document(
        f"{kind}-summary", {"config": results["config"], "summary": results["summary"]},
        document["provenance"]))
  convergence_report.report(results, reporter)
  reporter.info(f"results and figures in {args.out}: results.json, "
                + ", ".join(path.name for path in figures))
  return {"summary": results["summary"], "out": args.out, **code}, None


def _convergence_arguments(parser: argparse.ArgumentParser) -> None:
  from experiments.real_convergence import RealConfig
  defaults = RealConfig()
  parser.add_argument("--model", default="smollm2", help=MODEL_HELP)
  parser.add_argument("--layers", default=None,
                      help="layers to run, e.g. 0,5,10-12, or 'all' (default: six evenly "
                           "spaced from the first to the last)")
  parser.add_argument("--windows", type=int, default=None,
                      help=f"calibration windows of Emma (default {defaults.windows})")
  parser.add_argument("--ctx", type=int, default=None,
                      help=f"tokens per window (default {defaults.ctx})")
  parser.add_argument("--steps", type=int, default=None,
                      help=f"gradient steps per run (default {defaults.steps})")
  _experiment_arguments(
      parser, out="output folder (results.json, layers/, PNGs); a rerun skips the layers it "
                  "finished",
      quick="layer 0, one window of 32 tokens, a small grid: well under a minute",
      figures="figures/real/theory")


def _convergence_run(args: argparse.Namespace, reporter: Reporter) -> tuple[dict, None]:
  from attnprune_jax import data, models
  from experiments import convergence_report
  from experiments import real_convergence as experiment
  config = experiment.QUICK if args.quick else experiment.RealConfig()
  overrides = {dest: getattr(args, dest) for dest in ("windows", "ctx", "steps")
               if getattr(args, dest) is not None}
  for dest in overrides:
    _check_integer(args, dest, minimum={"windows": 1, "ctx": 2, "steps": 10}[dest],
                   maximum=MAX_STEPS if dest == "steps" else validation.MAX_COUNT)
  ranges = None if args.layers in (None, "all") else _layer_ranges(args.layers, extra=" or all")
  start = time.perf_counter()
  model = models.load(args.model)
  num_layers = model.config.num_layers
  if args.layers == "all":
    overrides["layers"] = tuple(range(num_layers))
  elif ranges is not None:
    overrides["layers"] = _layers(ranges, args.layers, num_layers)
  config = dataclasses.replace(config, **overrides)
  _check_text_fits(model, data.CALIBRATION_TEXT, config.windows + config.heldout_windows,
                   config.ctx, "--windows and --ctx")
  results = experiment.run(model, config, Path(args.out), reporter)
  settings = {k: v for k, v in vars(args).items() if k not in ("command_spec", "json", "quiet")}
  return _write_convergence("convergence", results, convergence_report.plot_real, args,
                            settings, start, reporter)


def _layer_ranges(text: str, extra: str = "") -> list[range]:
  """'0-29' or '0,5,10-12' -> the ranges of layer indices it names (the model bounds them)."""
  ranges = []
  try:
    for part in text.split(","):
      first, _, last = part.partition("-")
      first, last = int(first), int(last or first)
      if not 0 <= first <= last:
        raise ValueError
      ranges.append(range(first, last + 1))
  except ValueError:
    raise InputError(f"--layers must look like 0-29 or 0,5,10-12{extra}, got {text!r}") from None
  return ranges


def _layers(ranges: list[range], text: str, num_layers: int) -> tuple[int, ...]:
  """Sorted distinct layer indices of `ranges`, each in [0, num_layers)."""
  if max(r.stop for r in ranges) > num_layers:
    raise InputError(f"--layers must lie in 0-{num_layers - 1}, got {text!r}")
  return tuple(sorted(set().union(*ranges)))


def _data_arguments(parser: argparse.ArgumentParser) -> None:
  from experiments.qk_pruning import DataConfig
  defaults = DataConfig()
  parser.add_argument("--model", default="smollm2", help=MODEL_HELP)
  parser.add_argument("--calib-seqs", type=int, default=defaults.calib_seqs,
                      help="calibration windows of Emma the methods see")
  parser.add_argument("--calib-len", type=int, default=defaults.calib_len,
                      help="tokens per window (calibration, held-out and evaluation)")
  parser.add_argument("--heldout-seqs", type=int, default=defaults.heldout_seqs,
                      help="held-out Emma windows for the attention errors")
  parser.add_argument("--eval-tokens", type=int, default=defaults.eval_tokens,
                      help="evaluation budget on Pride and Prejudice (tokens // calib-len "
                           "windows)")


def _data_config(args: argparse.Namespace):
  from experiments.qk_pruning import DataConfig
  for dest in ("calib_seqs", "heldout_seqs", "eval_tokens"):
    _check_integer(args, dest)
  _check_integer(args, "calib_len", minimum=2)
  if args.eval_tokens < args.calib_len:
    raise InputError(f"--eval-tokens must be at least --calib-len={args.calib_len} (one "
                     f"window), got {args.eval_tokens}")
  return DataConfig(calib_seqs=args.calib_seqs, calib_len=args.calib_len,
                    heldout_seqs=args.heldout_seqs, eval_tokens=args.eval_tokens)


def _prune_arguments(parser: argparse.ArgumentParser) -> None:
  from attnprune_jax.layer_masks import MaskSolverConfig, OPTIMIZERS
  from attnprune_jax.methods import METHODS
  from attnprune_jax.baselines import BASELINES
  from attnprune_jax.pipeline import TARGETS
  parser.add_argument("--method", required=True, choices=METHODS,
                      help="the method for q_proj and k_proj (and for every target, without "
                           "--rest)")
  parser.add_argument("--targets", choices=tuple(TARGETS), default="qk",
                      help="the linears pruned in every chosen layer: qk (default), attention "
                           "(+ v_proj, o_proj) or all (+ gate/up/down_proj); embeddings and LM "
                           "head stay dense")
  parser.add_argument("--rest", choices=tuple(BASELINES),
                      help="the baseline for the targets other than q/k (needed with an "
                           "attention-aware --method and --targets attention/all)")
  parser.add_argument("--true-sequential", action="store_true",
                      help="prune a block's q/k/v, o, gate/up, down in turn, each from the "
                           "block with the ones before pruned (SparseGPT's option; default: "
                           "all from the block's dense weights, as Wanda)")
  parser.add_argument("--sparsity", type=float,
                      help="fraction of every target's entries removed per output row "
                           "(unstructured)")
  parser.add_argument("--pattern", metavar="N:M",
                      help="N:M structure along the input axis, e.g. 2:4 (sparsity N/M)")
  parser.add_argument("--layers", default=None, help="layers to prune, e.g. 0-29 (default: all)")
  _data_arguments(parser)
  parser.add_argument("--out", required=True,
                      help="output folder: results.json, the layer checkpoint, the saved model")
  parser.add_argument("--save-weights", action="store_true",
                      help="also write the pruned model as a Hugging Face folder OUT/model")
  parser.add_argument("--devices", default="1",
                      help="devices that share each layer's attention-aware solve: a count or "
                           "'all' (of jax.devices(); default 1)")
  solver = parser.add_argument_group(
      "attention-aware methods", "override their defaults (layer_masks.DEFAULTS, our choice)")
  for field in dataclasses.fields(MaskSolverConfig):
    option = "--" + field.name.replace("_", "-")
    if field.name == "optimizer":
      solver.add_argument(option, choices=sorted(OPTIMIZERS))
    else:
      solver.add_argument(option, type=field.type)


def _devices(text: str) -> list | None:
  """--devices: 'all' or a count of jax.devices(); None for one device (no sharding)."""
  import jax
  available = jax.devices()
  if text == "all":
    count = len(available)
  elif text.isdigit() and 1 <= int(text) <= len(available):
    count = int(text)
  else:
    raise InputError(f"--devices must be 'all' or a count from 1 to {len(available)} (the "
                     f"devices JAX sees: {len(available)}), got {text!r}")
  return None if count == 1 else available[:count]


def _prune_run(args: argparse.Namespace, reporter: Reporter) -> tuple[dict, None]:
  from attnprune_jax import data, models
  from attnprune_jax.layer_masks import DEFAULTS, MaskSolverConfig
  from attnprune_jax.pipeline import PruneSettings
  from experiments import qk_pruning
  if (args.sparsity is None) == (args.pattern is None):
    raise InputError("give exactly one of --sparsity S (unstructured) or --pattern N:M")
  if args.pattern is not None:
    try:
      if ":" not in args.pattern:
        raise InputError("no colon")
      sparsity, n_m = qk_pruning.parse_pattern(args.pattern)
    except InputError:
      raise InputError(f"--pattern must look like 2:4 (N:M, integers 0 <= N < M), got "
                       f"{args.pattern!r}") from None
  else:
    _check_real(args, "sparsity", below=1.0)
    sparsity, n_m = args.sparsity, None
  ranges = None if args.layers is None else _layer_ranges(args.layers)
  data_config = _data_config(args)
  overrides = {field.name: getattr(args, field.name)
               for field in dataclasses.fields(MaskSolverConfig)
               if getattr(args, field.name) is not None}
  for name, value in overrides.items():
    if isinstance(value, int):
      _check_integer(args, name, maximum=MAX_STEPS)
    elif isinstance(value, float):
      _check_real(args, name, strict=name == "lr")
  if args.method in DEFAULTS:
    solver = dataclasses.replace(DEFAULTS[args.method], **overrides)
  elif overrides:
    raise InputError(f"--{next(iter(overrides)).replace('_', '-')} applies only to the "
                     f"attention-aware methods, not to {args.method}")
  else:
    solver = None
  if solver is not None and data_config.calib_seqs % solver.windows_per_step:
    raise InputError(f"--windows-per-step ({solver.windows_per_step}) must divide --calib-seqs "
                     f"({data_config.calib_seqs})")
  # Checked before the model loads (layers are checked against it after).
  PruneSettings(args.method, sparsity, n_m, (0,), solver, targets=args.targets, rest=args.rest,
                true_sequential=args.true_sequential)
  devices = _devices(args.devices)
  out = Path(args.out)
  if args.save_weights and (out / "model").exists():
    raise InputError(f"--save-weights: {out / 'model'} exists already; remove it or choose "
                     "another --out")
  model = models.load(args.model)
  layers = (tuple(range(model.config.num_layers)) if ranges is None
            else _layers(ranges, args.layers, model.config.num_layers))
  settings = PruneSettings(args.method, sparsity, n_m, layers, solver, targets=args.targets,
                           rest=args.rest, true_sequential=args.true_sequential)
  try:
    settings.check_shapes(model.config)
  except InputError as err:
    raise InputError(f"--{'pattern' if n_m else 'sparsity'}: {err}") from None
  _check_text_fits(model, data.CALIBRATION_TEXT, data_config.calib_seqs
                   + data_config.heldout_seqs, data_config.calib_len,
                   "--calib-seqs, --heldout-seqs and --calib-len")
  _check_text_fits(model, data.EVALUATION_TEXT, data_config.eval_tokens // data_config.calib_len,
                   data_config.calib_len, "--eval-tokens and --calib-len")
  token_windows = qk_pruning.windows(model, data_config)
  row = qk_pruning.prune_row(model, settings, token_windows, data_config, out,
                             save_weights=args.save_weights, reporter=reporter,
                             devices=devices)
  write_json_atomic(out / "results.json", result_document("prune", row, provenance(
      seed=None, settings=vars(args) | {"command_spec": None},
      wall_time_s=row["pipeline_time_s"])))
  removed = row["removed"]
  reporter.info(f"{settings.name} {row['pattern']} {sparsity:g}: perplexity "
                f"{row['perplexity']:.3f}, attention error (held-out, mean over layers) "
                f"{row['attention_error_mean']:.4g}, prune time {row['prune_time_s']:.1f} s; "
                "removed " + ", ".join(f"{name} {100 * value:.2f} %" for name, value
                                       in removed["per_target"].items())
                + f" (of the pruned layers), decoder linears {100 * removed['linear']:.2f} %, "
                f"all parameters {100 * removed['model']:.2f} %; {out / 'results.json'}")
  return row, None


def _reproduce_arguments(parser: argparse.ArgumentParser) -> None:
  size = parser.add_mutually_exclusive_group()
  from attnprune_jax.pipeline import TARGETS
  size.add_argument("--full", action="store_true",
                    help="also sparsities 0.3, 0.6 and 0.9 (--targets beyond qk: also 0.7)")
  size.add_argument("--quick", action="store_true",
                    help="three layers (5, 15, 25 of 30: 1/6, 1/2, 5/6 of the depth), 4k "
                         "evaluation tokens; qk: four methods at 0.7, a few minutes (make demo); "
                         "beyond qk: the five rows at 0.5")
  parser.add_argument("--targets", choices=tuple(TARGETS), default="qk",
                      help="qk (default): the paper's comparison, q_proj/k_proj pruned; "
                           "attention / all: every attention linear / every linear of every "
                           "block pruned, each baseline everywhere against attention-aware q/k "
                           "+ that baseline on the rest, at 0.5, 2:4 and 0.6 (rows in "
                           "results/attention_linears.json / results/whole_model.json)")
  parser.add_argument("--model", default="smollm2",
                      help=MODEL_HELP + "; for a model other than smollm2, --results, --work "
                      "and --figures default to out/models/NAME/ (NAME: the folder or file name)")
  parser.add_argument("--results", help="the table of rows, resumable row by row (default "
                      "results/NAME.json, NAME: qk_pruning, attention_linears or whole_model "
                      "by --targets; out/quick/NAME.json with --quick)")
  parser.add_argument("--work", help="layer checkpoints of the rows (default out/reproduce, "
                      "out/reproduce/NAME beyond qk; out/quick[/NAME] with --quick)")
  parser.add_argument("--methods", nargs="+",
                      help="a subset of the methods; beyond qk, METHOD+BASELINE prunes q/k with "
                           "METHOD and the rest with BASELINE (e.g. attn-progressive+wanda)")
  parser.add_argument("--figures", metavar="DIR",
                      help="where the figures go (default figures/real; none with --quick)")
  parser.add_argument("--report-only", action="store_true",
                      help="run no row: rewrite the Markdown tables and figures from the rows "
                           "stored in --results")


def _stored_rows(path: Path, targets: str) -> list[dict]:
  """The rows of a results file of `reproduce` for `targets`; an InputError naming --results
  if it is not one."""
  try:
    document = json.loads(path.read_text())
    rows = document["rows"]
  except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as err:
    raise InputError(f"--results: {path} is not a results file of reproduce "
                     f"({type(err).__name__}: {err})") from None
  if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
    raise InputError(f"--results: {path} holds no list of rows")
  stored = document.get("targets", "qk")
  if stored != targets:
    raise InputError(f"--results: {path} holds rows of --targets {stored}, not {targets}; "
                     "choose another --results")
  return rows


def _reproduce_run(args: argparse.Namespace, reporter: Reporter) -> tuple[dict, None]:
  from attnprune_jax import data, models
  from attnprune_jax.pipeline import PruneSettings
  from experiments import qk_pruning, qk_report
  if args.targets == "qk":
    grid = qk_pruning.QUICK if args.quick else qk_pruning.FULL if args.full else \
        qk_pruning.ReproduceConfig()
    stem, work_name = "qk_pruning", ""
  else:
    grid = dataclasses.replace(qk_pruning.WHOLE_MODEL, targets=args.targets)
    if args.quick:
      grid = dataclasses.replace(grid, sparsities=("0.5",), layers=qk_pruning.QUICK.layers,
                                 data=qk_pruning.QUICK.data)
    elif args.full:
      grid = dataclasses.replace(grid, sparsities=grid.sparsities + ("0.7",))
    stem = {"attention": "attention_linears", "all": "whole_model"}[args.targets]
    work_name = f"/{stem}"
  if args.methods:
    grid = dataclasses.replace(grid, methods=tuple(args.methods))
  for method in grid.methods:  # e.g. attn-progressive alone with --targets all
    first, rest = qk_pruning.split_method(method)
    try:
      PruneSettings(first, 0.5, None, (0,), targets=grid.targets, rest=rest)
    except InputError as err:
      raise InputError(f"--methods {method} with --targets {grid.targets}: {err}") from None
  if args.model == "smollm2":
    defaults = (f"out/quick/{stem}.json", f"out/quick{work_name}", None) if args.quick else (
        f"results/{stem}.json", f"out/reproduce{work_name}", "figures/real")
  else:  # another model's rows must not mix with (or overwrite) the embedded model's
    name = Path(args.model).name or "model"
    base = Path("out/models") / (f"{name}-quick" if args.quick else name)
    defaults = (str(base / f"{stem}.json"), str(base / f"work{work_name}"),
                None if args.quick else str(base / "figures"))
  results = check_output_path("--results", args.results or defaults[0])
  work = check_output_path("--work", args.work or defaults[1], folder=True)
  figures = args.figures or defaults[2]
  if figures:
    check_output_path("--figures", figures, folder=True)
  rows = _stored_rows(results, grid.targets) if results.is_file() else None
  if args.report_only and rows is None:
    raise InputError(f"--report-only needs stored rows; {results} does not exist")
  model = models.load(args.model)
  if args.quick:
    grid = dataclasses.replace(grid, layers=qk_pruning.quick_layers(model.config.num_layers))
  if not args.report_only:
    _check_text_fits(model, data.CALIBRATION_TEXT, grid.data.calib_seqs + grid.data.heldout_seqs,
                     grid.data.calib_len, "reproduce's calibration windows")
  if args.report_only:
    results.with_suffix(".md").write_text(qk_report.markdown_tables(rows, grid.targets))
  else:
    rows = qk_pruning.reproduce(model, results, work, grid, reporter=reporter)
  reporter.table(["method", "pattern", "sparsity", "perplexity", "attn error", "prune s"],
                 [[row["method"], row["pattern"], row["sparsity"], row["perplexity"],
                   row["attention_error_mean"], row["prune_time_s"]] for row in rows])
  paths = []
  if figures and grid.targets != "qk":
    paths = [qk_report.plot_whole_model(rows, Path(figures) / f"{stem}.png", grid.targets)]
  elif figures:
    paths = qk_report.plot(rows, Path(figures), model=model, work=work, config=grid.data)
  if paths:
    reporter.info("figures: " + ", ".join(str(path) for path in paths))
  return {"rows": rows, "results": str(results), "figures": [str(p) for p in paths]}, None


COMMANDS: tuple[Command, ...] = (
    Command("demo", "Algorithm 1 on a small synthetic head; prints loss and attention error.",
            _demo_arguments, _demo_run),
    Command("eval", "Perplexity of a real model on the evaluation text (Pride and Prejudice).",
            _eval_arguments, _eval_run),
    Command("synthetic", "Convergence experiments and sparsity sweep on synthetic problems "
            "(paper section 6.1).", _synthetic_arguments, _synthetic_run, resumable=True),
    Command("convergence", "Algorithm 1 on every query head of chosen layers of a real model: "
            "the convergence theory on real weights.", _convergence_arguments, _convergence_run,
            resumable=True),
    Command("prune", "Prune q_proj/k_proj (or every linear, --targets) of a real model layer by "
            "layer; perplexity, attention error and sparsity.", _prune_arguments, _prune_run,
            resumable=True),
    Command("reproduce", "Every method at sparsities 0.5/0.7/0.8 and 2:4 on the real model "
            "(paper sections 6.2-6.3; --targets all: whole-model sparsity), resumable.",
            _reproduce_arguments, _reproduce_run, resumable=True),
)


def build_parser() -> argparse.ArgumentParser:
  """The argument parser with every registered subcommand."""
  parser = argparse.ArgumentParser(
      prog="attnprune", description="Attention-matrix-aware pruning (arXiv 2410.11261).")
  parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--quiet", action="store_true",
                      help="no progress bars, tables or messages (for scripts)")
  common.add_argument("--json", metavar="FILE",
                      help="write the results as JSON to FILE ('-' for stdout)")
  subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
  for command in COMMANDS:
    sub = subparsers.add_parser(command.name, help=command.help, description=command.help,
                                parents=[common])
    command.add_arguments(sub)
    sub.set_defaults(command_spec=command)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Entry point of `attnprune`; returns the exit status: 0 done, 2 bad input (one line on
  stderr), 130 interrupted; any other exception is a bug and keeps its traceback."""
  args = build_parser().parse_args(argv)
  reporter = Reporter(quiet=args.quiet)
  command: Command = args.command_spec
  start = time.perf_counter()
  try:
    _check_outputs(args)
    results, seed = command.run(args, reporter)
    settings = {k: v for k, v in vars(args).items()
                if k not in ("command_spec", "json", "quiet")}
    document = result_document(command.name, results,
                               provenance(seed=seed, settings=settings,
                                          wall_time_s=time.perf_counter() - start))
    if args.json == "-":
      sys.stdout.write(json_text(document))
    elif args.json:
      write_json_atomic(args.json, document)
      reporter.info(f"results written to {args.json}")
  except InputError as err:
    print(f"attnprune {command.name}: error: {err}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    resume = "; rerun the same command to resume" if command.resumable else ""
    print(f"attnprune {command.name}: interrupted{resume}", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
