"""Numerics versions: one per kind of stored result.

A stored result (a reproduce row, a layer checkpoint, a convergence run) is reused only if it was
made with the same settings, data, model and numerics version of its kind, and it records the git
commit it was computed at. Raise a kind's version in the same commit as any change of the numbers
it produces (another default, solver step, score or rounding), and regenerate the committed
results of that kind: the golden-sample tests (`tests/test_golden_samples.py`) recompute a piece
of every committed result file and fail until it agrees with the code. A refactor that changes no
number leaves the versions alone, and nothing needs recomputing.
"""

# Pruned weights and everything measured from them: `prune` and `reproduce` rows, their layer
# checkpoints, the q/k sweep and the q/k-share diagnostic.
PRUNING = 1
# The synthetic convergence runs and sparsity sweep (paper section 6.1, `attnprune synthetic`).
SYNTHETIC = 1
# The convergence theory on real weights, layer by layer (`attnprune convergence`).
REAL_CONVERGENCE = 1
