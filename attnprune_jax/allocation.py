"""How a target sparsity is shared among layers: uniformly, or by OWL's outlier ratios.

OWL (Yin et al., ICML 2024, "Outlier Weighed Layerwise Sparsity"; `../shared/notes/baselines.md`):
each layer's outlier ratio D_l is the share of the Wanda scores |W_ij|·‖X_j‖ of all its pruned
linears (on the dense model's calibration inputs) above M × their mean; D is mapped linearly onto
[0, 2λ] and shifted so that its mean is the target density 1 − s. Layers with more outliers are
pruned less. M = 5 and λ = 0.08 are the paper's Llama settings.

Exactness (our addition): a layer's density is a whole number of units 1/g, g the gcd of the
pruned linears' input widths, so that every row of every target keeps an integer number of
entries at the layer's density; the units are shared by largest remainders with their sum fixed
at round(layers · (1 − s) · g). The kept total is then exactly (1 − s) of the pruned entries
whenever layers · (1 − s) · g is an integer (SmolLM2's 30 layers, g = 192: 0.5, 0.6, 0.7 all are).
"""

import fractions
import math

import numpy as np

from attnprune_jax import validation
from attnprune_jax.errors import InputError

ALLOCATIONS = ("uniform", "owl")
OWL_M = 5.0  # outlier threshold, × the mean score (Yin et al.'s Llama runs)
OWL_LAMBDA = 0.08  # densities span (1 − s) ± λ (Yin et al.'s Llama runs)


def outlier_ratio(scores) -> float:
  """The share of the concatenated scores (arrays of any shape) above `OWL_M` × their mean."""
  flat = np.concatenate([np.asarray(s, np.float64).reshape(-1) for s in scores])
  return float(np.mean(flat > OWL_M * flat.mean()))


def owl_densities(ratios, sparsity: float, lam: float = OWL_LAMBDA) -> np.ndarray:
  """OWL's continuous densities from the layers' outlier ratios: ratios mapped onto [0, 2λ],
  shifted to mean 1 − `sparsity` (equal ratios give the uniform density)."""
  ratios = np.asarray(ratios, np.float64)
  spread = ratios.max() - ratios.min()
  scaled = np.zeros_like(ratios) if spread == 0 else (ratios - ratios.min()) / spread * 2 * lam
  return scaled - scaled.mean() + (1 - sparsity)


def quantized_sparsities(densities, sparsity: float, widths) -> tuple[float, ...]:
  """Per-layer sparsities near 1 − `densities` whose kept counts are exact (module docstring).

  Args:
    densities: the wanted density of each layer, (layers,).
    sparsity: the overall target, in [0, 1).
    widths: the input widths of the pruned linears (their rows' lengths).
  Returns:
    one sparsity per layer, each a multiple of 1/g away from 1, at least one unit kept.
  """
  sparsity = validation.check_sparsity(sparsity)
  densities = np.asarray(densities, np.float64)
  g = math.gcd(*(int(w) for w in widths))
  total = math.floor(len(densities) * (1 - fractions.Fraction(repr(sparsity))) * g
                     + fractions.Fraction(1, 2))
  if total < len(densities):
    raise InputError(f"sparsity {sparsity:g} leaves fewer than 1/{g} of each layer's entries; "
                     "OWL needs at least that", argument="sparsity")
  wanted = np.clip(densities * g, 1, g)
  units = np.floor(wanted).astype(np.int64)
  # Largest remainders gain a unit, smallest lose one, within [1, g] units per layer.
  while units.sum() < total:
    units[np.argmax(np.where(units < g, wanted - units, -np.inf))] += 1
  while units.sum() > total:
    units[np.argmin(np.where(units > 1, wanted - units, np.inf))] -= 1
  return tuple(float(1 - fractions.Fraction(int(u), g)) for u in units)
