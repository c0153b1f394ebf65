"""Golden samples: a small piece of every committed result file, recomputed by the code now.

A stored number is trusted because these tests recompute a sample of it, not because the source
that made it is unchanged: a refactor that changes no number passes; a change of the numbers fails
here until the results are regenerated (and the kind's version in `numerics` raised, which the
stored files must then carry). The default tier recomputes a few SmolLM2 rows' layer 0 (loading
Gemma 3's GGUF alone takes 30–60 s, most of it gguf's parse of the 262k-token vocabulary: its rows
are the slow tier's), one synthetic run, one head of one layer, Wanda on one layer of the block
sweep; the `slow` tier recomputes layer 0 (Gemma: through 1, unless `check_layer` says otherwise)
of every row, a solved sweep row, and the family-share diagnostics (q/k on SmolLM2, the attention
and the MLP on Gemma). The theory figures' and the sweeps' samples are in
test_golden_theory_and_sweeps.py.
"""

import dataclasses
import functools
import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import test_golden_theory_and_sweeps as theory
from conftest import (ROOT, RTOL32, RTOL_OTHER_CPU, RTOL_SOLVE_OTHER_CPU, chained_rtol,
                      optimized_compilation, stored)

from attnprune_jax import evaluate, methods, numerics, pipeline, results, runs
from attnprune_jax.settings import DataConfig, PruneSettings, split_method
from experiments import qk_share


def test_optimized_compilation_recompiles_what_an_unoptimized_test_compiled():
  """JAX's jit cache does not key on the optimization flag: the fixture must clear it, or a
  golden sample could run code compiled unoptimized (it did: a perplexity 0.15 % off)."""
  square = jax.jit(lambda x: x * x)
  square(jnp.ones(3))
  assert jax.config.read("jax_disable_most_optimizations") and square._cache_size() == 1
  with optimized_compilation():
    assert not jax.config.read("jax_disable_most_optimizations") and square._cache_size() == 0
    square(jnp.ones(3))
  assert square._cache_size() == 0


def row_of(document: dict, method: str, sparsity: str) -> dict:
  pattern = sparsity if ":" in sparsity else "unstructured"
  value = 0.5 if ":" in sparsity else float(sparsity)
  return next(row for row in document["rows"]
              if (row["method"], row["pattern"], row["sparsity"]) == (method, pattern, value))


def row_ids(path: str) -> list[tuple[str, str]]:
  """(method, sparsity) of every pruned row of a results file."""
  return [(row["method"], row["pattern"] if row["pattern"] != "unstructured"
           else f"{row['sparsity']:g}") for row in stored(path)["rows"] if row["method"] != "dense"]


@functools.cache
def fingerprint_of(model) -> str:
  return results.model_fingerprint(model)


@pytest.fixture(scope="module")
def windows():
  """Token windows by model and data settings, built once per module."""
  cache = {}

  def of(model, data: dict) -> dict:
    key = (id(model), json.dumps(data, sort_keys=True))
    if key not in cache:
      cache[key] = runs.token_windows(model, DataConfig(**data))
    return cache[key]
  return of


def settings_of(row: dict, layers: tuple[int, ...]) -> PruneSettings:
  """The row's stored settings on `layers` (a per-layer sparsity: the first layer's)."""
  s = row["settings"]
  sparsity = s["sparsity"][0] if isinstance(s["sparsity"], list) else s["sparsity"]
  solver = methods.get(s["method"]).solver
  return PruneSettings(s["method"], sparsity, None if s["n_m"] is None else tuple(s["n_m"]),
                       layers, None if s["solver"] is None else type(solver)(**s["solver"]),
                       targets=s["targets"], rest=s["rest"],
                       true_sequential=s["true_sequential"])


def recompute_first_layer(model, row: dict, windows, *, through: int | None = None) -> dict:
  """The record of the row's first pruned layer (with `through`, of that layer, every layer up
  to it pruned), pruned again with the row's settings."""
  s = row["settings"]
  first = s["layers"][0]
  settings = settings_of(row, (first,) if through is None else tuple(range(first, through + 1)))
  data = windows(model, s["data"])
  if allocated(row):
    # The allocation from the dense model over every layer, then layer 0 at its share.
    whole = dataclasses.replace(settings, layers=tuple(s["layers"]),
                                allocation=s["allocation"]).for_model(model.config)
    shares = pipeline.layer_sparsities(model.weights(), model.config, whole, data["calibration"])
    assert [shares[r["layer"]] for r in row["layers"] if r["pruned"]] == [
        r["sparsity"] for r in row["layers"] if r["pruned"]]
    assert through is None, "an OWL row recomputed past its first layer"
    settings = dataclasses.replace(settings, sparsity=shares[first])
  return pipeline.prune_model(model, settings, data["calibration"], data["heldout"]).layers[-1]


def first_method(method: str) -> methods.Method:
  """The registered method that prunes first ('attn-progressive' of 'attn-progressive+wanda')."""
  return methods.get(split_method(method)[0])


def rounding_sensitive(method: str) -> bool:
  """Whether float32 rounding reaches the method's masks: a solve, or an update of values
  (SparseGPT's OBS) that the next weights' scores and the next layers' inputs see."""
  first = first_method(method)
  return first.kind != "linear" or first.changes_values


def made_elsewhere(row: dict) -> bool:
  """Whether the row names a processor other than this one (rows older than that record, which
  reproduce here to RTOL32, do not)."""
  return row["provenance"].get("cpu") not in (None, results.cpu())


def rounds_otherwise_here(row: dict) -> bool:
  """Whether this processor's float32 rounding reaches the row's masks otherwise than the one it
  was made on did: a rounding-sensitive method made on a processor of other vector extensions."""
  return rounding_sensitive(row["method"]) and made_elsewhere(row)


def allocated(row: dict) -> bool:
  """Whether the row's layer sparsities are an allocation's (OWL), not one uniform sparsity."""
  return row["settings"].get("allocation", "uniform") != "uniform"


def tolerance(row: dict) -> float:
  """The relative tolerance of a row's recomputed errors: RTOL32, `chained_rtol` for a whole
  block's solve (a long float32 chain), and for a rounding-sensitive row made on a processor of
  other vector extensions RTOL_OTHER_CPU, a q/k solve's RTOL_SOLVE_OTHER_CPU."""
  kind = first_method(row["method"]).kind
  if kind == "block":
    return chained_rtol(row["provenance"])
  if not rounds_otherwise_here(row):
    return RTOL32
  return RTOL_SOLVE_OTHER_CPU if kind == "qk" else RTOL_OTHER_CPU


def check_layer(recomputed: dict, row: dict) -> None:
  """The recomputed layer record against the row's: kept counts exactly, the errors at
  `tolerance(row)` (with a warning where that is RTOL_SOLVE_OTHER_CPU)."""
  expected = row["layers"][recomputed["layer"]]
  assert row["numerics"] == numerics.PRUNING
  assert recomputed["kept"] == expected["kept"]
  rtol = tolerance(row)
  if rtol == RTOL_SOLVE_OTHER_CPU:
    warnings.warn(f"{row['method']} at {row['pattern']} {row['sparsity']:g}: made on "
                  f"{row['provenance']['cpu']!r}, not this {results.cpu()!r}; its solve's "
                  f"errors checked to {rtol:.0%} only")
  for field in ("attention_error", "attention_error_end_to_end", "loss_first", "loss_last"):
    if expected[field] is None:
      assert recomputed[field] is None, field
    else:
      assert recomputed[field] == pytest.approx(expected[field], rel=rtol), field


# The model fixture of each results file of pruned rows.
MODEL_OF = {"results/qk_pruning.json": "smollm2", "results/whole_model.json": "smollm2",
            "results/gemma3_270m/qk_pruning.json": "gemma3",
            "results/gemma3_270m/whole_model.json": "gemma3"}
# Files whose samples are recomputed through layer 1 (layer 0 pruned first): on Gemma 3 layer 0's
# input is the RMSNorm of the embeddings, blind to their √d scale, which layer 1's is not.
THROUGH_LAYER_1 = ("results/gemma3_270m/qk_pruning.json",
                   "results/gemma3_270m/whole_model.json")
# The default tier's samples, one per results file of SmolLM2; the paper's `attn` (Algorithm 1
# and its cut, 38 s) and every other row are the slow tier's.
PRUNING_SAMPLES = [("results/qk_pruning.json", "sparsegpt", "2:4"),
                   ("results/whole_model.json", "wanda", "0.5")]
EVERY_ROW = [pytest.param(path, method, sparsity, marks=pytest.mark.slow,
                          id=f"{Path(path).relative_to('results').with_suffix('')}-{method}-"
                             f"{sparsity}")
             for path in MODEL_OF for method, sparsity in row_ids(path)
             if (path, method, sparsity) not in PRUNING_SAMPLES]


@pytest.mark.parametrize("path,method,sparsity", PRUNING_SAMPLES + EVERY_ROW)
def test_first_layer_of_a_pruning_row(windows, request, path, method, sparsity):
  if rounding_sensitive(method):  # a solve of real size, or a value update: unoptimized code
    request.getfixturevalue("optimized_xla")  # rounds it otherwise
  model = request.getfixturevalue(MODEL_OF[path])
  row = row_of(stored(path), method, sparsity)
  assert fingerprint_of(model) == row["key"]["model"], "the row was computed on another model"
  data = windows(model, row["settings"]["data"])
  assert results.fingerprint(*(data[k] for k in sorted(data))) == row["key"]["windows"]
  # A rounding-sensitive row made on a processor of other vector extensions is checked on its
  # first layer only: there the rounding moves the errors by ~0.03 % (SparseGPT) to 5.1 % (q/k
  # solves), in the next layer (whose input the other masks changed) by up to 6.3 % with the
  # same kept counts (measured: Gemma's q/k rows, made on AVX-512, recomputed on AVX2).
  # An OWL row is recomputed on its first layer only (its allocation is the whole model's).
  through = (1 if path in THROUGH_LAYER_1 and not (allocated(row) or rounds_otherwise_here(row))
             else None)
  check_layer(recompute_first_layer(model, row, windows, through=through), row)


# Results of single `attnprune prune` runs (the document is the row, with its provenance): the
# block methods with the local target, against the grid's teacher rows (paper_repro.md).
PRUNE_RESULTS = sorted(str(path.relative_to(ROOT))
                       for path in (ROOT / "results" / "whole_model_local_target").glob("*.json"))


def test_prune_results_are_sampled():
  assert len(PRUNE_RESULTS) >= 1, "results/whole_model_local_target/ holds no results"


@pytest.mark.slow
@pytest.mark.usefixtures("optimized_xla")
@pytest.mark.parametrize("path", PRUNE_RESULTS)
def test_first_layer_of_a_prune_result(smollm2, windows, path):
  row = stored(path)
  assert row["kind"] == "prune"
  check_layer(recompute_first_layer(smollm2, row, windows), row)


# Family-share diagnostics (experiments/qk_share.py): file -> (its rows' results file, the
# sampled row, the family put back).
SHARES = {"results/whole_model_qk_share.json": ("results/whole_model.json", "wanda", "0.5", "qk"),
          "results/gemma3_270m/whole_model_share.json": (
              "results/gemma3_270m/whole_model.json", "sparsegpt", "2:4", "attention")}


@pytest.mark.slow
@pytest.mark.usefixtures("optimized_xla")
@pytest.mark.parametrize("path", SHARES)
def test_family_share(windows, request, path):
  """A whole-model row pruned again and evaluated with one family's dense weights put back."""
  source, method, sparsity, family = SHARES[path]
  model = request.getfixturevalue(MODEL_OF[source])
  share = stored(path)
  entry = next(r for r in share["rows"] if (r["method"], r["sparsity"]) == (method, sparsity))
  row = row_of(stored(source), method, sparsity)
  s = row["settings"]
  data = windows(model, s["data"])
  pruned = pipeline.prune_model(model, settings_of(row, tuple(s["layers"])), data["calibration"],
                                data["heldout"])
  dense = model.weights()
  weights = pruned.weights | {name: dense[name] for name in qk_share.FAMILIES[family]}
  ppl = evaluate.perplexity(model, data["evaluation"], batch_size=s["data"]["batch"],
                            weights=weights)["perplexity"]
  assert share["numerics"] == numerics.PRUNING
  assert ppl == pytest.approx(entry[f"perplexity_dense_{family}"],
                              rel=chained_rtol(share["provenance"]))
  assert entry["perplexity"] == row["perplexity"]


def test_every_committed_result_is_sampled():
  """A results file that no golden sample names would be trusted unchecked: each stored JSON
  document under results/ and figures/ is one of the files sampled here or in
  test_golden_theory_and_sweeps.py."""
  sampled = (set(MODEL_OF) | set(PRUNE_RESULTS) | set(SHARES)
             | {"figures/synthetic/summary.json", "figures/real/theory/summary.json"}
             | set(theory.SWEEPS) | {theory.BLOCK_SWEEP})
  committed = {str(path.relative_to(ROOT)) for folder in ("results", "figures")
               for path in (ROOT / folder).rglob("*.json")}
  assert committed <= sampled, sorted(committed - sampled)
