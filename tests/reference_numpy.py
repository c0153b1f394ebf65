"""Plain numpy implementations written independently of the library, for tests only."""

import numpy as np


def attention(x: np.ndarray, w: np.ndarray, causal: bool) -> np.ndarray:
  """Row softmax of x w xᵀ for x (n, d), computed row by row with explicit loops."""
  n = x.shape[0]
  scores = x @ w @ x.T
  out = np.zeros((n, n))
  for i in range(n):
    allowed = i + 1 if causal else n
    row = scores[i, :allowed]
    e = np.exp(row - row.max())
    out[i, :allowed] = e / e.sum()
  return out


def pruning_loss(mask, w, x, lam, causal):
  """½ Σ_b ‖f_b(M∘W) − f_b(W)‖² + (λ/2)‖M‖², x (n, d) or (b, n, d)."""
  x = np.asarray(x, np.float64)
  xs = x[None] if x.ndim == 2 else x
  total = 0.0
  for xb in xs:
    gap = attention(xb, mask * w, causal) - attention(xb, w, causal)
    total += 0.5 * np.sum(gap**2)
  return total + 0.5 * lam * np.sum(mask**2)


def binarize_rows(score: np.ndarray, keep: int) -> np.ndarray:
  """Keeps `keep` entries per row: the largest, lower index first among ties."""
  out = np.zeros(score.shape, bool)
  for i, row in enumerate(score):
    order = sorted(range(len(row)), key=lambda j: (-row[j], j))
    out[i, order[:keep]] = True
  return out
