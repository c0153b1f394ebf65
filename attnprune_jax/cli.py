"""The `attnprune` command: it parses options, calls the library and prints.

Subcommands are registered in `COMMANDS`, nowhere else. Every setting is checked by the
dataclass that holds it (`settings`, `solver_config`, `experiments.configs`); an `InputError`
is printed in one line naming the option at fault, exit status 2. The parser and those checks
import no JAX, so `--help` and bad options answer at once; JAX loads when the work starts.
"""

import argparse
import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from attnprune_jax import __version__, locks, methods
from attnprune_jax.errors import InputError
from attnprune_jax.reporting import Reporter
from attnprune_jax.results import (check_output_path, json_text, provenance, result_document,
                                   write_atomic, write_json_atomic)


class Command(NamedTuple):
  """A subcommand: its name, one-line help, its options, and what it runs.

  `run(args, reporter)` checks every option before any work, returns (results dict, seed) and
  reports to people through `reporter`. A `resumable` command keeps what it finished, so a rerun
  after an interruption goes on from there; `owned(args)` lists what it keeps there, (option,
  path, is a folder), which one run at a time may write (default: the `OWNED_OPTIONS` given).
  """
  name: str
  help: str
  add_arguments: Callable[[argparse.ArgumentParser], None]
  run: Callable[[argparse.Namespace, Reporter], tuple[dict, int | None]]
  resumable: bool = False
  owned: Callable[[argparse.Namespace], list[tuple[str, str, bool]]] | None = None


# Options naming what a command writes (True: a folder), checked before any work.
OUTPUT_OPTIONS = {"json": False, "results": False, "out": True, "work": True, "figures": True}
# Those a run resumes from, locked while it runs (`locks`): one run per output.
OWNED_OPTIONS = ("out", "results", "work")
MODEL_HELP = ("smollm2 (the embedded default), gemma3-270m (Gemma 3), a local "
              "Hugging Face Llama or Gemma 3 checkpoint folder (e.g. Llama 3.2-1B: config.json, "
              "*.safetensors, tokenizer.json) or a Llama or Gemma 3 GGUF file")


class _OptionError(InputError):
  """An option the parser refused, with the (sub)command's name."""

  def __init__(self, prog: str, message: str):
    super().__init__(message)
    self.prog = prog


class _Parser(argparse.ArgumentParser):
  """An argument parser whose errors are `InputError`s: one line, like every other bad input."""

  def error(self, message: str):
    raise _OptionError(self.prog, message)


def _settings(args: argparse.Namespace) -> dict:
  """The options as given, for the provenance of results."""
  return {k: v for k, v in vars(args).items()
          if k not in ("command_spec", "option_strings", "json", "quiet")}


def _check_outputs(args: argparse.Namespace) -> None:
  """Checks every output path given (see `results.check_output_path`) before any work."""
  for dest, folder in OUTPUT_OPTIONS.items():
    path = getattr(args, dest, None)
    if path is not None and not (dest == "json" and path == "-"):
      check_output_path("--" + dest, path, folder=folder)


def _owned(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
  """(option, path, is a folder) of the outputs a run of `args` resumes from."""
  command: Command = args.command_spec
  if command.owned is not None:
    return command.owned(args)
  return [("--" + dest, getattr(args, dest), OUTPUT_OPTIONS[dest]) for dest in OWNED_OPTIONS
          if getattr(args, dest, None) is not None]


def _run_in_worker(work: Callable[[], tuple[dict, int | None]],
                   abandon: Callable[[], None]) -> tuple[dict, int | None]:
  """work() in a worker thread, the main thread waiting: Ctrl-C reaches the main thread at once
  even while a long XLA computation runs, and then `abandon()` ends the process, leaving that
  computation behind (the worker's own KeyboardInterrupt is re-raised like any error)."""
  outcome = {}

  def target():
    try:
      outcome["value"] = work()
    except BaseException as err:  # re-raised in the main thread
      outcome["error"] = err
  worker = threading.Thread(target=target, name="attnprune-work", daemon=True)
  try:
    worker.start()
    while worker.is_alive():
      worker.join(0.1)
  except KeyboardInterrupt:
    if worker.is_alive():
      abandon()
    raise
  if "error" in outcome:
    raise outcome["error"]
  return outcome["value"]


def _layers(text: str | None, extra: str = "") -> tuple[int, ...] | None:
  """--layers '0-29' or '0,5,10-12' -> sorted distinct indices (the model bounds them); None
  stays None. `extra` names other accepted values in the error."""
  if text is None:
    return None
  layers = set()
  for part in text.split(","):
    first, dash, last = part.strip().partition("-")
    last = last if dash else first
    if not all(p.isascii() and p.isdigit() for p in (first, last)) or int(first) > int(last):
      raise InputError(f"layers must look like 0-29 or 0,5,10-12{extra}, got {text!r}",
                       argument="layers")
    layers.update(range(int(first), int(last) + 1))
  return tuple(sorted(layers))


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
  from experiments.configs import DemoConfig
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
  from experiments.configs import DemoConfig
  config = DemoConfig(n=args.n, d=args.d, batch=args.batch, rank=args.rank, lam=args.lam,
                      steps=args.steps, step_fraction=args.step_fraction,
                      sparsities=tuple(args.sparsities), causal=args.causal, seed=args.seed)
  from experiments import demo
  results = demo.run(config, reporter)
  demo.report(results, reporter)
  return results, config.seed


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--model", default="smollm2", help=MODEL_HELP)
  parser.add_argument("--tokens", type=int, default=32768,
                      help="evaluation budget: tokens // ctx windows of Pride and Prejudice")
  parser.add_argument("--ctx", type=int, default=512, help="window length (start token + text)")
  parser.add_argument("--batch", type=int, default=4, help="windows per forward pass")


def _eval_run(args: argparse.Namespace, reporter: Reporter) -> tuple[dict, None]:
  from attnprune_jax import validation
  for name in ("tokens", "ctx", "batch"):
    validation.check_positive_int(name, getattr(args, name))
  if args.ctx < 2:
    raise InputError(f"--ctx must be at least 2 (a start token and text), got {args.ctx}")
  if args.tokens < args.ctx:
    raise InputError(f"--tokens must be at least --ctx={args.ctx} (one window), got "
                     f"{args.tokens}")
  from attnprune_jax import data, evaluate, models, runs
  start = time.perf_counter()
  model = models.load(args.model)
  load_s = time.perf_counter() - start
  count = args.tokens // args.ctx
  runs.check_text_fits(model, data.EVALUATION_TEXT, count, args.ctx, "--tokens and --ctx")
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
                      help="also copy the PNGs and a summary.json (summary, golden sample, "
                           f"provenance) to DIR, e.g. {figures}")


def _synthetic_arguments(parser: argparse.ArgumentParser) -> None:
  _experiment_arguments(parser, out="output folder (results.json, runs/, PNGs)",
                        quick="a small grid that finishes in well under 3 minutes on 2 cores",
                        figures="figures/synthetic")


def _synthetic_run(args: argparse.Namespace, reporter: Reporter) -> tuple[dict, None]:
  from experiments.configs import SYNTHETIC_QUICK, SyntheticConfig
  config = SYNTHETIC_QUICK if args.quick else SyntheticConfig()
  from experiments import convergence_report
  from experiments import synthetic_convergence as experiment
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
  stored = results.pop("provenance")  # the numerics version and the commits of reused results
  figures = plot(results, Path(args.out))
  document = result_document(kind, results, provenance(
      seed=None, settings=settings, wall_time_s=time.perf_counter() - start) | stored)
  write_json_atomic(Path(args.out) / "results.json", document)
  if args.figures:
    Path(args.figures).mkdir(parents=True, exist_ok=True)
    for path in figures:
      shutil.copyfile(path, Path(args.figures) / path.name)
    write_json_atomic(Path(args.figures) / "summary.json", result_document(
        f"{kind}-summary", {key: results[key] for key in ("config", "summary", "golden")},
        document["provenance"]))
  convergence_report.report(results, reporter)
  reporter.info(f"results and figures in {args.out}: results.json, "
                + ", ".join(path.name for path in figures))
  return {"summary": results["summary"], "out": args.out, **stored}, None


def _convergence_arguments(parser: argparse.ArgumentParser) -> None:
  from experiments.configs import RealConfig
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
  from experiments.configs import REAL_QUICK, RealConfig
  overrides = {dest: getattr(args, dest) for dest in ("windows", "ctx", "steps")
               if getattr(args, dest) is not None}
  if args.layers not in (None, "all"):
    overrides["layers"] = _layers(args.layers, extra=" or all")
  config = dataclasses.replace(REAL_QUICK if args.quick else RealConfig(), **overrides)
  from attnprune_jax import data, models, runs
  from experiments import convergence_report
  from experiments import real_convergence as experiment
  start = time.perf_counter()
  model = models.load(args.model)
  if model.config.qk_norm:
    raise InputError(f"convergence does not apply to {args.model}: it normalizes queries and "
                     "keys per head (QK-norm), so its scores are not X W Xᵀ with one merged W "
                     "per head, the problem the paper's theory is about", argument="model")
  num_layers = model.config.num_layers
  if args.layers == "all":
    config = dataclasses.replace(config, layers=tuple(range(num_layers)))
  elif config.layers is not None and config.layers[-1] >= num_layers:
    raise InputError(f"layers must lie in 0-{num_layers - 1}, got {args.layers!r}",
                     argument="layers")
  runs.check_text_fits(model, data.CALIBRATION_TEXT, config.windows + config.heldout_windows,
                       config.ctx, "--windows and --ctx")
  results = experiment.run(model, config, Path(args.out), reporter)
  return _write_convergence("convergence", results, convergence_report.plot_real, args,
                            _settings(args), start, reporter)


def _data_arguments(parser: argparse.ArgumentParser) -> None:
  from attnprune_jax.settings import DataConfig
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


def _prune_arguments(parser: argparse.ArgumentParser) -> None:
  from attnprune_jax.allocation import ALLOCATIONS
  from attnprune_jax.settings import TARGETS
  from attnprune_jax.solver_config import BLOCK_TARGETS, OPTIMIZERS, BlockSolverConfig
  parser.add_argument("--method", required=True, choices=methods.names(),
                      help="the method for q_proj and k_proj (and for every target, without "
                           "--rest): " + "; ".join(f"{m.name}: {m.summary}"
                                                   for m in methods.REGISTRY.values()))
  parser.add_argument("--targets", choices=tuple(TARGETS), default="qk",
                      help="the linears pruned in every chosen layer: qk (default), attention "
                           "(+ v_proj, o_proj) or all (+ gate/up/down_proj); embeddings and LM "
                           "head stay dense")
  parser.add_argument("--rest", choices=methods.names("linear"),
                      help="the linear method for the targets other than q/k (needed with an "
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
  parser.add_argument("--allocation", choices=ALLOCATIONS, default="uniform",
                      help="how --sparsity is shared among the layers: uniform (default) or owl "
                           "(OWL's outlier-weighted layer sparsities, Yin et al. 2024; the "
                           "overall sparsity stays --sparsity; unstructured only)")
  _data_arguments(parser)
  parser.add_argument("--out", required=True,
                      help="output folder: results.json, the layer checkpoint, the saved model")
  parser.add_argument("--save-weights", action="store_true",
                      help="also write the pruned model as a Hugging Face folder OUT/model")
  parser.add_argument("--devices", default="1",
                      help="devices that share each layer's attention-aware solve: a count or "
                           "'all' (of jax.devices(); default 1)")
  solver = parser.add_argument_group(
      "attention-aware methods", "override the method's registered solver settings (our "
      "choice; methods.REGISTRY)")
  for field in dataclasses.fields(BlockSolverConfig):  # the q/k methods' settings and more
    option = "--" + field.name.replace("_", "-")
    if field.name == "optimizer":
      solver.add_argument(option, choices=OPTIMIZERS)
    elif field.name == "target":
      solver.add_argument(option, choices=BLOCK_TARGETS,
                          help="attn-block methods: fit each half to the dense model's own "
                               "stream (teacher) or to the dense half on the pruned inputs "
                               "(local)")
    else:
      solver.add_argument(option, type=field.type)


def _devices(text: str) -> list | None:
  """--devices: 'all' or a count of jax.devices(); None for one device (no sharding)."""
  if not (text == "all" or (text.isascii() and text.isdigit() and int(text) >= 1)):
    raise InputError(f"--devices must be 'all' or a count from 1, got {text!r}")
  import jax
  available = jax.devices()
  count = len(available) if text == "all" else int(text)
  if count > len(available):
    raise InputError(f"--devices must be 'all' or a count from 1 to {len(available)} (the "
                     f"devices JAX sees), got {text!r}")
  return None if count == 1 else available[:count]


def _prune_settings(args: argparse.Namespace):
  """The `PruneSettings` and `DataConfig` of the prune options."""
  from attnprune_jax.patterns import parse_pattern
  from attnprune_jax.settings import DataConfig, PruneSettings
  from attnprune_jax.solver_config import BlockSolverConfig
  if (args.sparsity is None) == (args.pattern is None):
    raise InputError("give exactly one of --sparsity S (unstructured) or --pattern N:M")
  if args.pattern is not None and ":" not in args.pattern:
    raise InputError(f"--pattern must look like 2:4 (N:M, integers 0 <= N < M), got "
                     f"{args.pattern!r}")
  sparsity, n_m = (args.sparsity, None) if args.pattern is None else parse_pattern(args.pattern)
  overrides = {field.name: getattr(args, field.name)
               for field in dataclasses.fields(BlockSolverConfig)
               if getattr(args, field.name) is not None}
  solver = None
  if overrides:
    registered = methods.get(args.method).solver
    fields = () if registered is None else {f.name for f in dataclasses.fields(registered)}
    foreign = [name for name in overrides if name not in fields]
    if foreign:
      with_it = [m.name for m in methods.REGISTRY.values()
                 if m.solver is not None and foreign[0] in dataclasses.asdict(m.solver)]
      raise InputError(f"--{foreign[0].replace('_', '-')} applies only to the methods "
                       f"{', '.join(with_it)}, not to {args.method}")
    solver = dataclasses.replace(registered, **overrides)
  settings = PruneSettings(args.method, sparsity, n_m, _layers(args.layers), solver,
                           targets=args.targets, rest=args.rest,
                           true_sequential=args.true_sequential, allocation=args.allocation)
  config = DataConfig(calib_seqs=args.calib_seqs, calib_len=args.calib_len,
                      heldout_seqs=args.heldout_seqs, eval_tokens=args.eval_tokens)
  settings.check_windows(config.calib_seqs)
  return settings, config


def _prune_run(args: argparse.Namespace, reporter: Reporter) -> tuple[dict, None]:
  from attnprune_jax.run_folder import RunFolder
  settings, config = _prune_settings(args)
  folder = RunFolder(args.out)
  folder.check(save_model=args.save_weights)
  devices = _devices(args.devices)
  from attnprune_jax import models, runs
  model = models.load(args.model)
  row = runs.prune(model, settings, config, folder, save_model=args.save_weights,
                   reporter=reporter, devices=devices)
  removed = row["removed"]
  reporter.info(f"{row['method']} {row['pattern']} {row['sparsity']:g}: perplexity "
                f"{row['perplexity']:.3f}, attention error (held-out, mean over layers) "
                f"{row['attention_error_mean']:.4g}, prune time {row['prune_time_s']:.1f} s; "
                "removed " + ", ".join(f"{name} {100 * value:.2f} %" for name, value
                                       in removed["per_target"].items())
                + f" (of the pruned layers), decoder linears {100 * removed['linear']:.2f} %, "
                f"all parameters {100 * removed['model']:.2f} %; {folder.results}")
  return row, None


def _reproduce_arguments(parser: argparse.ArgumentParser) -> None:
  from attnprune_jax.settings import TARGETS
  size = parser.add_mutually_exclusive_group()
  size.add_argument("--full", action="store_true",
                    help="also sparsities 0.3, 0.6 and 0.9 (--targets beyond qk: also 0.8)")
  size.add_argument("--quick", action="store_true",
                    help="three layers (5, 15, 25 of 30: 1/6, 1/2, 5/6 of the depth), 2k "
                         "evaluation tokens; qk: four methods at 0.7, a minute or two (make "
                         "demo); beyond qk: every row at 0.5")
  parser.add_argument("--targets", choices=tuple(TARGETS), default="qk",
                      help="qk (default): the paper's comparison, q_proj/k_proj pruned; "
                           "attention / all: every attention linear / every linear of every "
                           "block pruned: the baselines (uniform and OWL), attention-aware q/k "
                           "+ a baseline on the rest, and the whole-block methods, at 0.6, 2:4, "
                           "0.7 and 0.5 (rows in results/attention_linears.json / "
                           "results/whole_model.json)")
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
                           "METHOD and the rest with BASELINE (e.g. attn-progressive+wanda); "
                           "owl:NAME shares the sparsity among layers by OWL (e.g. owl:wanda; "
                           "unstructured sparsities only)")
  parser.add_argument("--sparsities", nargs="+", metavar="S",
                      help="a subset of the sparsities, run in this order (e.g. 0.6 2:4)")
  parser.add_argument("--figures", metavar="DIR",
                      help="where the figures go (default figures/real; none with --quick)")
  parser.add_argument("--report-only", action="store_true",
                      help="run no row: rewrite the Markdown tables and figures from the rows "
                           "stored in --results")


def _reproduce_grid(args: argparse.Namespace):
  from attnprune_jax.settings import reproduce_grid
  size = "quick" if args.quick else "full" if args.full else "default"
  return reproduce_grid(args.targets, size, args.methods, args.sparsities)


def _reproduce_paths(args: argparse.Namespace) -> tuple[str, str, str | None]:
  """The results file, work folder and figures folder (None: no figures) of `reproduce`."""
  stem = _reproduce_grid(args).stem
  work_name = "" if args.targets == "qk" else f"/{stem}"
  if args.model == "smollm2":
    defaults = (f"out/quick/{stem}.json", f"out/quick{work_name}", None) if args.quick else (
        f"results/{stem}.json", f"out/reproduce{work_name}", "figures/real")
  else:  # another model's rows must not mix with (or overwrite) the embedded model's
    name = Path(args.model).name or "model"
    base = Path("out/models") / (f"{name}-quick" if args.quick else name)
    defaults = (str(base / f"{stem}.json"), str(base / f"work{work_name}"),
                None if args.quick else str(base / "figures"))
  return args.results or defaults[0], args.work or defaults[1], args.figures or defaults[2]


def _reproduce_owned(args: argparse.Namespace) -> list[tuple[str, str, bool]]:
  results, work, _ = _reproduce_paths(args)
  return [("--results", results, False), ("--work", work, True)]


def _reproduce_run(args: argparse.Namespace, reporter: Reporter) -> tuple[dict, None]:
  grid = _reproduce_grid(args)
  results, work, figures = _reproduce_paths(args)
  results = check_output_path("--results", results)
  work = check_output_path("--work", work, folder=True)
  if figures:
    check_output_path("--figures", figures, folder=True)
    if grid.targets != "qk":
      check_output_path("--figures", Path(figures) / f"{grid.stem}.png")
  from attnprune_jax.results import stored_rows
  rows = stored_rows(results, grid.targets) if results.is_file() else None
  if args.report_only and rows is None:
    raise InputError(f"--report-only needs stored rows; {results} does not exist")
  from attnprune_jax import models, runs
  from experiments import qk_report
  model = models.load(args.model)
  if args.report_only:
    text = qk_report.markdown_tables(rows, grid.targets).encode()
    write_atomic(results.with_suffix(".md"), lambda handle: handle.write(text))
  else:
    rows = runs.reproduce(model, grid, results, work, reporter=reporter,
                          tables=qk_report.markdown_tables)
  reporter.table(["method", "pattern", "sparsity", "perplexity", "attn error", "prune s"],
                 [[row["method"], row["pattern"], row["sparsity"], row["perplexity"],
                   row["attention_error_mean"], row["prune_time_s"]] for row in rows])
  paths = []
  if figures and grid.targets != "qk":
    paths = [qk_report.plot_whole_model(rows, Path(figures) / f"{grid.stem}.png", grid.targets)]
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
            _reproduce_arguments, _reproduce_run, resumable=True, owned=_reproduce_owned),
)


def build_parser() -> argparse.ArgumentParser:
  """The argument parser with every registered subcommand."""
  parser = _Parser(prog="attnprune",
                   description="Attention-matrix-aware pruning (arXiv 2410.11261).")
  parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--quiet", action="store_true",
                      help="no progress bars, tables or messages (for scripts)")
  common.add_argument("--json", metavar="FILE",
                      help="write the results as JSON to FILE ('-' for stdout)")
  subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=_Parser)
  for command in COMMANDS:
    sub = subparsers.add_parser(command.name, help=command.help, description=command.help,
                                parents=[common])
    command.add_arguments(sub)
    sub.set_defaults(command_spec=command, option_strings=tuple(sub._option_string_actions))
  return parser


def _message(err: InputError, args: argparse.Namespace | None) -> str:
  """The error's message with the setting it names replaced by the option that set it."""
  message = str(err)
  name = {"n_m": "pattern"}.get(err.argument, err.argument)
  if name == "sparsity" and getattr(args, "pattern", None) is not None:
    name = "pattern"
  option = None if name is None else "--" + name.replace("_", "-")
  if args is None or option is None or option not in getattr(args, "option_strings", ()):
    return message
  if message.startswith(err.argument + " "):
    return option + message[len(err.argument):]
  return f"{option}: {message}"


def _use_compilation_cache() -> None:
  """JAX's persistent compilation cache for the work of a command started from the shell, so
  that a rerun (or resumed run) does not compile again what compiled before:
  $XDG_CACHE_HOME/attnprune_jax/xla (~/.cache/...), unless JAX_COMPILATION_CACHE_DIR names
  another folder; every compilation is kept (a rerun of `make demo` saves ~15 s of ~2 min).
  Only before JAX loads: a program that imported JAX keeps its own settings."""
  if "jax" in sys.modules:
    return
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(base, "attnprune_jax", "xla"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


def main(argv: list[str] | None = None) -> int:
  """Entry point of `attnprune`; returns the exit status: 0 done, 2 bad input (one line on
  stderr), 130 interrupted; any other exception is a bug and keeps its traceback."""
  args, name = None, "attnprune"
  try:
    args = build_parser().parse_args(argv)
    command: Command = args.command_spec
    name = f"attnprune {command.name}"
    reporter = Reporter(quiet=args.quiet)
    start = time.perf_counter()
    _check_outputs(args)
    with contextlib.ExitStack() as held:
      for option, path, folder in _owned(args):
        held.enter_context(locks.exclusive(path, option, folder=folder))
      _use_compilation_cache()
      results, seed = _run_in_worker(lambda: command.run(args, reporter),
                                     abandon=lambda: _abandon(name, args))
      document = result_document(command.name, results,
                                 provenance(seed=seed, settings=_settings(args),
                                            wall_time_s=time.perf_counter() - start))
      if args.json == "-":
        sys.stdout.write(json_text(document))
      elif args.json:
        write_json_atomic(args.json, document)
        reporter.info(f"results written to {args.json}")
  except InputError as err:
    print(f"{getattr(err, 'prog', name)}: error: {_message(err, args)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(_interrupted(name, args), file=sys.stderr)
    return 130
  return 0


def _interrupted(name: str, args: argparse.Namespace | None) -> str:
  resumable = args is not None and args.command_spec.resumable
  return f"{name}: interrupted" + ("; rerun the same command to resume" if resumable else "")


def _abandon(name: str, args: argparse.Namespace) -> None:
  """Ctrl-C while the work runs (in XLA, maybe): one line, then exit 130 at once, leaving the
  computation behind. Everything it finished is on disk (written atomically); the interpreter's
  teardown under a running computation can crash, so there is none. The output locks end with
  the process."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt this
  bar = "" if args.quiet or not sys.stderr.isatty() else "\n"  # end a progress bar's line
  sys.stderr.write(f"{bar}{_interrupted(name, args)}\n")
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(130)


def run() -> None:
  """The `attnprune` program: `main`, then exit with its status; after Ctrl-C without the
  interpreter's teardown, which can crash while JAX's threads still run (exit 130 either way)."""
  code = main()
  if code == 130:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)
  sys.exit(code)


if __name__ == "__main__":
  run()
