"""How much of a whole-model prune's perplexity cost sits in one family of linears (a diagnostic).

For each finished row of `reproduce --targets all`, the pruned model is evaluated again with one
family's dense weights put back (`--restore`: q_proj/k_proj by default, the attention's four or
the MLP's three; every other linear stays pruned as the row left it). The difference to the
row's perplexity is the part of the cost that the family's pruning carries — an approximation:
the other linears were pruned on inputs from the model with that family pruned. It bounds what
a better pruner of that family can gain inside that row. A row records, per family F,
`perplexity_dense_F` and `F_cost`.

    .venv/bin/python -m experiments.qk_share          # results/whole_model_qk_share.json
    .venv/bin/python -m experiments.qk_share --model gemma3-270m \
        --results results/gemma3_270m/whole_model.json --work out/models/gemma3-270m/work_all \
        --methods sparsegpt attn-block-reweight --sparsities 2:4 --restore attention mlp \
        --out results/gemma3_270m/whole_model_share.json
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

from attnprune_jax import evaluate, models, numerics, runs
from attnprune_jax.patterns import parse_pattern, pattern_name
from attnprune_jax.reporting import Reporter
from attnprune_jax.results import model_fingerprint, provenance, result_document, write_json_atomic
from attnprune_jax.settings import ATTENTION, MLP, QK, DataConfig

# The families a row can have put back, by name.
FAMILIES = {"qk": QK, "attention": ATTENTION, "mlp": MLP}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="smollm2", help="the model the rows were made from")
  parser.add_argument("--results", default="results/whole_model.json")
  parser.add_argument("--work", default="out/reproduce/whole_model")
  parser.add_argument("--out", default="results/whole_model_qk_share.json")
  parser.add_argument("--methods", nargs="+", default=["wanda", "sparsegpt"])
  parser.add_argument("--sparsities", nargs="+", default=["0.5"])
  parser.add_argument("--restore", nargs="+", choices=list(FAMILIES), default=["qk"],
                      help="the families put back dense, one evaluation each (default: qk)")
  parser.add_argument("--quiet", action="store_true")
  args = parser.parse_args(argv)
  reporter = Reporter(quiet=args.quiet)
  start = time.perf_counter()
  stored = json.loads(Path(args.results).read_text())
  config = DataConfig(**stored["data"])
  model = models.load(args.model)
  model_key = model_fingerprint(model)
  evaluation = runs.token_windows(model, config)["evaluation"]
  dense = model.weights()
  rows = []
  for method in args.methods:
    for sparsity in args.sparsities:
      value, n_m = parse_pattern(sparsity)
      row = next((r for r in stored["rows"] if (r["method"], r["pattern"], r["sparsity"])
                  == (method, pattern_name(n_m), value)), None)
      weights = runs.row_folder(Path(args.work), method, sparsity, "all").finished_weights(
          model, model_key)
      if row is None or weights is None:
        reporter.info(f"{method} at {sparsity}: no finished row or checkpoint; skipped")
        continue
      entry = {"method": method, "sparsity": sparsity, "perplexity": row["perplexity"]}
      for family in args.restore:
        restored = weights | {name: dense[name] for name in FAMILIES[family]}
        ppl = evaluate.perplexity(model, evaluation, batch_size=config.batch, weights=restored,
                                  reporter=reporter)["perplexity"]
        entry |= {f"perplexity_dense_{family}": ppl, f"{family}_cost": row["perplexity"] - ppl}
        reporter.info(f"{method} at {sparsity}: {row['perplexity']:.2f}, with dense {family} "
                      f"{ppl:.2f}")
      rows.append(entry)
  if not rows:
    raise SystemExit(f"qk_share: no row had both a stored result and a finished checkpoint in "
                     f"{args.work}; {args.out} left as it was")
  write_json_atomic(args.out, result_document("whole-model-qk-share", {
      "rows": rows, "data": dataclasses.asdict(config), "numerics": numerics.PRUNING}, provenance(
          seed=None, settings=vars(args), wall_time_s=time.perf_counter() - start)))


if __name__ == "__main__":
  main()
