"""Golden samples: a small piece of every committed result file, recomputed by the code now.

A stored number is trusted because these tests recompute a sample of it, not because the source
that made it is unchanged: a refactor that changes no number passes; a change of the numbers
fails here until the results are regenerated (and the kind's version in `numerics` raised, which
the stored files must then carry). The default tier recomputes one sample per file (layer 0 of a
row, one synthetic run, one head of one layer, the baselines of one sweep layer); the `slow`
tier recomputes layer 0 of every row, a solved sweep row, and the q/k-share diagnostic.
"""

import json
from pathlib import Path

import jax
import pytest

from conftest import optimized_compilation

from attnprune_jax import evaluate, methods, numerics, pipeline, runs
from attnprune_jax.settings import QK, DataConfig, PruneSettings
from attnprune_jax.solver_config import MaskSolverConfig
from experiments import convergence, qk_sweep, real_convergence, synthetic_convergence
from experiments.configs import RealConfig, SyntheticConfig

ROOT = Path(__file__).resolve().parent.parent
# Recomputed on the same kind of machine, float32 results agree to rounding; float64 tighter.
RTOL32, RTOL64 = 1e-4, 1e-7
# Rows written before numerics versions existed carry none: they are version 1, which these
# tests check by recomputing them.
FIRST_VERSION = 1


def stored(path: str) -> dict:
  return json.loads((ROOT / path).read_text())


def row_of(document: dict, method: str, sparsity: str) -> dict:
  pattern = sparsity if ":" in sparsity else "unstructured"
  value = 0.5 if ":" in sparsity else float(sparsity)
  return next(row for row in document["rows"]
              if (row["method"], row["pattern"], row["sparsity"]) == (method, pattern, value))


def row_ids(path: str) -> list[tuple[str, str]]:
  """(method, sparsity) of every pruned row of a results file."""
  return [(row["method"], row["pattern"] if row["pattern"] != "unstructured"
           else f"{row['sparsity']:g}") for row in stored(path)["rows"] if row["method"] != "dense"]


@pytest.fixture(scope="module")
def windows(smollm2):
  """Token windows by data settings, built once per module."""
  cache = {}

  def of(data: dict) -> dict:
    key = json.dumps(data, sort_keys=True)
    if key not in cache:
      cache[key] = runs.token_windows(smollm2, DataConfig(**data))
    return cache[key]
  return of


def recompute_first_layer(model, row: dict, windows) -> dict:
  """The record of the row's first pruned layer, pruned again with the row's settings."""
  s = row["settings"]
  first = s["layers"][0]
  sparsity = s["sparsity"][0] if isinstance(s["sparsity"], list) else s["sparsity"]
  settings = PruneSettings(s["method"], sparsity, None if s["n_m"] is None else tuple(s["n_m"]),
                           (first,), None if s["solver"] is None else MaskSolverConfig(**s["solver"]),
                           targets=s["targets"], rest=s["rest"],
                           true_sequential=s["true_sequential"])
  data = windows(s["data"])
  return pipeline.prune_model(model, settings, data["calibration"], data["heldout"]).layers[-1]


def check_layer(recomputed: dict, row: dict) -> None:
  expected = row["layers"][row["settings"]["layers"][0]]
  assert row.get("numerics", FIRST_VERSION) == numerics.PRUNING
  assert recomputed["kept"] == expected["kept"]
  for field in ("attention_error", "attention_error_end_to_end", "loss_first", "loss_last"):
    if expected[field] is None:
      assert recomputed[field] is None, field
    else:
      assert recomputed[field] == pytest.approx(expected[field], rel=RTOL32), field


PRUNING_SAMPLES = [("results/qk_pruning.json", "attn", "0.7"),  # Algorithm 1 and its cut
                   ("results/qk_pruning.json", "sparsegpt", "2:4"),
                   ("results/whole_model.json", "wanda", "0.5")]
EVERY_ROW = [pytest.param(path, method, sparsity, marks=pytest.mark.slow,
                          id=f"{Path(path).stem}-{method}-{sparsity}")
             for path in ("results/qk_pruning.json", "results/whole_model.json")
             for method, sparsity in row_ids(path)
             if (path, method, sparsity) not in PRUNING_SAMPLES]


@pytest.mark.parametrize("path,method,sparsity", PRUNING_SAMPLES + EVERY_ROW)
def test_first_layer_of_a_pruning_row(smollm2, windows, request, path, method, sparsity):
  if methods.get(method.partition("+")[0]).kind == "qk":  # a solve of real size
    request.getfixturevalue("optimized_xla")
  row = row_of(stored(path), method, sparsity)
  check_layer(recompute_first_layer(smollm2, row, windows), row)


def test_synthetic_figures_sample():
  document = stored("figures/synthetic/summary.json")
  assert document["provenance"]["numerics"] == numerics.SYNTHETIC
  golden = document["golden"]
  config = SyntheticConfig(**document["config"])
  with jax.enable_x64(True):
    run = synthetic_convergence.convergence_run(
        config, **{k: golden[k] for k in ("n", "d", "lam", "step_fraction", "causal", "seed")})
  assert synthetic_convergence.golden_sample([run]) == pytest.approx(golden, rel=RTOL64)


@pytest.mark.usefixtures("optimized_xla")
def test_real_weight_theory_figures_sample(smollm2):
  document = stored("figures/real/theory/summary.json")
  assert document["provenance"]["numerics"] == numerics.REAL_CONVERGENCE
  golden = document["golden"]
  config = RealConfig(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in document["config"].items()})
  inputs = real_convergence.attention_inputs(smollm2, real_convergence.token_windows(
      smollm2, config))
  layer = golden["layer"]
  problem = real_convergence.layer_inputs(smollm2, inputs, layer)
  c = smollm2.config
  w = real_convergence.merged_heads(smollm2.weights()["q_proj"][layer],
                                    smollm2.weights()["k_proj"][layer], num_heads=c.num_heads,
                                    num_kv_heads=c.num_kv_heads, head_dim=c.head_dim)
  records = convergence.convergence_runs(
      w, problem["x"], lam=golden["lam"], step_fraction=golden["step_fraction"], causal=True,
      steps=config.steps, segments=config.segments, power_iters=config.power_iters,
      history_points=config.history_points, key=jax.random.key(layer))
  record = {"layer": layer, "head": golden["head"], **records[golden["head"]]}
  assert real_convergence.golden_sample([record]) == pytest.approx(golden, rel=RTOL32)


SWEEPS = ("results/qk_sweep_progressive.json", "results/qk_sweep_attn.json")


@pytest.fixture(scope="module")
def sweep_problems(smollm2):
  """The sweeps' first layer (5) on its dense inputs, computed as the sweep computed them."""
  with optimized_compilation():
    return qk_sweep.layer_problems(smollm2, (5,))


@pytest.fixture(scope="module")
def sweep_baselines(smollm2, sweep_problems):
  """The baselines' errors on the sweeps' first layer by sparsity, computed once per module."""
  cache = {}

  def of(sparsity: str) -> dict:
    if sparsity not in cache:
      cache[sparsity] = qk_sweep.baseline_errors(smollm2, sweep_problems[5], sparsity)
    return cache[sparsity]
  return of


@pytest.mark.parametrize("path", SWEEPS)
def test_sweep_baselines(sweep_baselines, path):
  document = stored(path)
  assert document["numerics"] == numerics.PRUNING
  row = next(r for r in document["rows"] if r["layer"] == 5)
  errors = sweep_baselines(row["sparsity"])
  assert errors["wanda"] == pytest.approx(row["wanda_error"], rel=RTOL32)
  assert errors["sparsegpt"] == pytest.approx(row["sparsegpt_error"], rel=RTOL32)


@pytest.mark.slow
@pytest.mark.usefixtures("optimized_xla")
@pytest.mark.parametrize("path", SWEEPS)
def test_sweep_solved_row(smollm2, sweep_problems, path):
  row = next(r for r in stored(path)["rows"] if r["layer"] == 5 and r["variant"] == "default")
  error = qk_sweep.solved_error(smollm2, sweep_problems[5], row["method"], row["sparsity"],
                                MaskSolverConfig(**row["solver"]))
  assert error == pytest.approx(row["heldout_error"], rel=RTOL32)


@pytest.mark.slow
@pytest.mark.usefixtures("optimized_xla")
def test_qk_share(smollm2, windows):
  """The whole-model Wanda row at 0.5 pruned again and evaluated with its dense q/k put back."""
  share = stored("results/whole_model_qk_share.json")
  entry = next(r for r in share["rows"] if (r["method"], r["sparsity"]) == ("wanda", "0.5"))
  row = row_of(stored("results/whole_model.json"), "wanda", "0.5")
  s = row["settings"]
  settings = PruneSettings(s["method"], s["sparsity"], None, tuple(s["layers"]),
                           targets=s["targets"])
  data = windows(s["data"])
  pruned = pipeline.prune_model(smollm2, settings, data["calibration"], data["heldout"])
  dense = smollm2.weights()
  weights = pruned.weights | {name: dense[name] for name in QK}
  ppl = evaluate.perplexity(smollm2, data["evaluation"], batch_size=s["data"]["batch"],
                            weights=weights)["perplexity"]
  assert share.get("numerics", FIRST_VERSION) == numerics.PRUNING
  assert ppl == pytest.approx(entry["perplexity_dense_qk"], rel=RTOL32)
  assert entry["perplexity"] == row["perplexity"]
