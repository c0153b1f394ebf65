"""attnprune_jax: attention-matrix-aware weight pruning (Liang et al., arXiv 2410.11261)."""

from attnprune_jax.attention import attention_matrix
from attnprune_jax.masks import binarize
from attnprune_jax.objective import attention_error, pruning_grad, pruning_loss
from attnprune_jax.solver import MaskSolution, solve_mask

__version__ = "0.1.0"

__all__ = [
    "MaskSolution",
    "attention_error",
    "attention_matrix",
    "binarize",
    "pruning_grad",
    "pruning_loss",
    "solve_mask",
]
