"""Attention-aware masks for a whole decoder block (beyond the paper; our extension).

The paper fits masks of the query-key weights so that the layer's attention matrix stays close
to the dense one. Here every pruned linear of a block gets a mask M (weights M∘W), fitted so
that each half of the block adds to the residual stream what the dense model adds:

- attention half (q/k/v/o_proj), on its post-RMSNorm input x:
    ‖o(M; x) − y_a‖² / ‖y_a‖²  +  α · Σ_h ‖A_h(M; x) − A_h(W; x)‖² / ‖A(W; x)‖²,
  o the attention's output (o_proj of the mixed heads), A_h head h's attention matrix (the
  paper's term, kept as a component with weight α = `attention_weight`);
- MLP half (gate/up/down_proj), on its input after the pruned attention half:
    ‖f(M; x_m) − y_m‖² / ‖y_m‖²,
plus (λ/2)‖M‖² over the masks of the half. Sums run over a step's windows and tokens.

The targets y (`BlockSolverConfig.target`): "local", the dense half's output on the pruned
model's inputs (what Wanda, SparseGPT and the q/k methods match), or "teacher", the dense
model's own residual stream after that half minus the pruned model's stream before it, so that
each half also corrects the error arriving from earlier blocks.

Both methods run the q/k methods' solver (`solver.prune_progressively`, Adam on the masks,
prune steps on the cubic or N:M schedule of `layer_masks.prune_schedule`, the score
|M∘W|·‖X_j‖ per output row with ‖X_j‖ from the dense half's inputs), half after half:
- "attn-block": binary masks, the kept weights keep their dense values;
- "attn-block-reweight": then `reweight_steps` more steps on the final support, and the kept
  weights become M∘W (like SparseGPT's update, it changes values).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from attnprune_jax import methods, validation
from attnprune_jax.errors import DivergenceError, InputError
from attnprune_jax.layer_masks import OPTIMIZERS, prune_schedule
from attnprune_jax.masks import binarize
from attnprune_jax.models.llama import (LlamaConfig, attention_input, attention_output,
                                        mlp_input, mlp_output)
from attnprune_jax.patterns import check_n_m
from attnprune_jax.settings import ATTENTION, MLP
from attnprune_jax.solver import minimize, prune_progressively
from attnprune_jax.solver_config import BlockSolverConfig

VARIANTS = ("attn-block", "attn-block-reweight")


class BlockPruning(NamedTuple):
  """New weights of a block's pruned linears and their masks (True = kept), by name.

  Attributes:
    weights: {target: (out, in)} pruned weights (zeros where pruned).
    keep: {target: (out, in)} bool masks.
    loss: the minibatch loss at every optimizer step, the attention half's steps then the
      MLP half's.
  """
  weights: dict[str, Float[Array, "out in"]]
  keep: dict[str, Bool[Array, "out in"]]
  loss: Float[Array, "steps"]


def _relative(error, reference):
  return jnp.sum(error**2) / jnp.sum(reference**2)


def attention_half_loss(masks: dict, layer: dict, x: Float[Array, "b t d"],
                        target: Float[Array, "b t d"], *, config: LlamaConfig,
                        attention_weight, lam, index=None):
  """The attention half's loss (module docstring) for masks of some of `ATTENTION`.

  Args:
    masks: {target: (out, in)} masks of the pruned linears; the others stay dense.
    layer: the block's dense weights by name.
    x: the attention's post-RMSNorm input; target: what its output should be.
    index: the layer's index, where layers differ (`models.llama.layer_attention_args`).
  """
  pruned = layer | {name: m * layer[name] for name, m in masks.items()}
  output, probs, _ = attention_output(x, pruned, config, index)
  loss = _relative(output - target, target)
  if {"q_proj", "k_proj"} & set(masks):
    dense = jax.lax.stop_gradient(attention_output(x, layer, config, index)[1])
    loss = loss + attention_weight * _relative(probs - dense, dense)
  return loss + lam / 2 * sum(jnp.sum(m**2) for m in masks.values())


def mlp_half_loss(masks: dict, layer: dict, x: Float[Array, "b t d"],
                  target: Float[Array, "b t d"], *, config: LlamaConfig, lam):
  """The MLP half's loss (module docstring) for masks of some of `MLP`; x its post-RMSNorm
  input."""
  pruned = layer | {name: m * layer[name] for name, m in masks.items()}
  output, _ = mlp_output(x, pruned, config)
  return _relative(output - target, target) + lam / 2 * sum(jnp.sum(m**2) for m in masks.values())


@functools.partial(jax.jit, static_argnames=("half", "names", "reweight", "schedule",
                                             "optimizer", "steps_per_round", "reweight_steps",
                                             "config"))
def _solve_half(layer: dict, x, target, norms: dict, attention_weight, lam, reweight_lam, lr,
                index, *, half: str, names: tuple[str, ...], reweight: bool, schedule: tuple,
                optimizer: str, steps_per_round: int, reweight_steps: int,
                config: LlamaConfig):
  """Masks of `names` (linears of one half) on batches x, target (batches, windows, t, d);
  `index` the layer's (traced: one compilation for every layer)."""
  if half == "attention":
    loss_fn = functools.partial(attention_half_loss, layer=layer, config=config,
                                attention_weight=attention_weight, index=index)
  else:
    loss_fn = functools.partial(mlp_half_loss, layer=layer, config=config)

  def loss_and_grad(masks, step, lam=lam):
    batch = step % x.shape[0]
    return jax.value_and_grad(loss_fn)(masks, x=x[batch], target=target[batch], lam=lam)

  def prune(masks, keep, round_target):
    round_sparsity, round_n_m = round_target
    return {name: binarize(jnp.where(keep[name], jnp.abs(masks[name] * layer[name]) * norms[name],
                                     -1.0), round_sparsity, n_m=round_n_m)
            for name in names}

  opt = OPTIMIZERS[optimizer](lr)
  ones = {name: jnp.ones_like(layer[name]) for name in names}
  keep, masks, loss = prune_progressively(loss_and_grad, ones, optimizer=opt,
                                          steps=steps_per_round, schedule=schedule, prune=prune)
  if reweight:
    start = {name: k.astype(x.dtype) for name, k in keep.items()}
    masks, _, extra, _ = minimize(functools.partial(loss_and_grad, lam=reweight_lam), start,
                                  optimizer=opt, steps=reweight_steps, keep=keep,
                                  first_step=len(schedule) * steps_per_round)
    loss = jnp.concatenate([loss, extra])
    new = {name: masks[name] * layer[name] for name in names}
  else:
    new = {name: jnp.where(keep[name], layer[name], 0) for name in names}
  finite = jnp.all(jnp.stack([jnp.isfinite(m).all() for m in masks.values()]))
  return new, keep, jnp.where(finite, loss, jnp.nan)


def solve_block(layer: dict, hidden: Float[Array, "b t d"], *, method: str,
                targets: tuple[str, ...], sparsity: float, n_m: tuple[int, int] | None = None,
                config: LlamaConfig, solver: BlockSolverConfig | None = None,
                teacher: tuple | None = None, index: int | None = None) -> BlockPruning:
  """Prunes the `targets` of one decoder block with a whole-block method.

  Args:
    layer: the block's dense weights by name (`models.llama.LAYER_WEIGHTS`).
    hidden: the pruned model's calibration residual stream entering the block, (windows, t, d).
    method: one of `VARIANTS`.
    targets: the linears to prune (a subset of `ATTENTION` + `MLP`).
    sparsity: fraction removed per output row, in [0, 1); n/m with `n_m`.
    n_m: (n, m) structure along the input axis, or None.
    config: the model's architecture.
    solver: settings; None takes the method's registered ones.
    teacher: with `solver.target` "teacher", the dense model's residual stream (after the
      attention half, after the block), each (windows, t, d).
    index: the block's index in the model (needed where layers differ, e.g. Gemma 3).
  Returns:
    a `BlockPruning` of `targets`.
  Raises:
    DivergenceError: if the loss or the masks became NaN or Inf.
  """
  if method not in VARIANTS:
    raise InputError(f"method must be one of {VARIANTS}, got {method!r}", argument="method")
  solver = methods.get(method).solver if solver is None else solver
  if not isinstance(solver, BlockSolverConfig):
    raise InputError(f"solver must be a BlockSolverConfig, got {solver!r}", argument="solver")
  unknown = set(targets) - set(ATTENTION + MLP)
  if unknown or not targets:
    raise InputError(f"targets must be linears of {ATTENTION + MLP}, got {targets}",
                     argument="targets")
  hidden = validation.check_array("hidden", hidden, ndim=3)
  if hidden.shape[0] % solver.windows_per_step:
    raise InputError(f"windows_per_step ({solver.windows_per_step}) must divide the number of "
                     f"calibration windows ({hidden.shape[0]})")
  if (solver.target == "teacher") != (teacher is not None):
    raise InputError(f"target {solver.target!r} " + ("needs the dense model's residual stream "
                     "(teacher=)" if teacher is None else "takes no teacher"), argument="teacher")
  sparsity = validation.check_sparsity(sparsity)
  shapes = {name: layer[name].shape for name in targets}
  if n_m is not None:
    for name in targets:
      n_m = check_n_m(n_m, sparsity, shapes[name][1])
  schedule = prune_schedule(sparsity, n_m, solver.rounds)
  dtype = jnp.promote_types(hidden.dtype, jnp.float32)
  layer = {name: w.astype(dtype) for name, w in layer.items()}
  hidden = hidden.astype(dtype)
  batch = lambda a: a.reshape(-1, solver.windows_per_step, *a.shape[1:])
  options = dict(reweight=method == "attn-block-reweight", schedule=schedule,
                 optimizer=solver.optimizer, steps_per_round=solver.steps_per_round,
                 reweight_steps=solver.reweight_steps, config=config)
  scalars = [jnp.asarray(v, dtype) for v in (solver.attention_weight, solver.lam,
                                             solver.reweight_lam, solver.lr)]
  layer_index = None if index is None else jnp.asarray(index)  # traced: one compilation
  new, keep, losses = {}, {}, []
  for position, (half, linears) in enumerate((("attention", ATTENTION), ("mlp", MLP))):
    x, dense_output, wide = _half(half, hidden, layer, config, index)
    names = tuple(t for t in linears if t in targets)
    if names:
      target = dense_output if teacher is None else teacher[position] - hidden
      # The last linear of a half (o_proj, down_proj) reads the wide input, the others x.
      norms = {name: _feature_norms(wide if name == linears[-1] else x) for name in names}
      half_new, half_keep, loss = _solve_half(layer, batch(x), batch(target), norms, *scalars,
                                              layer_index, half=half, names=names, **options)
      new |= half_new
      keep |= half_keep
      losses.append(loss)
    if half == "attention":  # the MLP half sees the pruned attention half's output
      hidden = hidden + _half(half, hidden, layer | new, config, index)[1]
  loss = jnp.concatenate(losses)
  if not validation.is_traced(loss) and not bool(jnp.isfinite(loss).all()):
    raise DivergenceError(f"{method} diverged: the loss or the masks became NaN or Inf with "
                          f"optimizer={solver.optimizer} lr={solver.lr:g}; use a smaller lr")
  return BlockPruning({name: new[name] for name in targets},
                      {name: keep[name] for name in targets}, loss)


def _half(half: str, hidden, layer: dict, config: LlamaConfig, index=None):
  """One half of the block on the residual stream `hidden` (b, t, d): (its post-RMSNorm input
  x (b, t, d), what it adds to the stream (b, t, d), the input of its last linear)."""
  if half == "attention":
    x = attention_input(hidden, layer, config)
    output, _, mixed = attention_output(x, layer, config, index)
    return x, output, mixed
  x = mlp_input(hidden, layer, config)
  return (x, *mlp_output(x, layer, config))


def _feature_norms(x: Float[Array, "b t n"]) -> Float[Array, "n"]:
  """‖X_j‖ over every calibration token: the activation factor of the prune score."""
  return jnp.linalg.norm(x.reshape(-1, x.shape[-1]), axis=0)


def _prune_block(method: str, layer: dict, hidden, *, targets, sparsity, n_m, config, solver,
                 teacher, index=None) -> BlockPruning:
  return solve_block(layer, hidden, method=method, targets=targets, sparsity=sparsity, n_m=n_m,
                     config=config, solver=solver, teacher=teacher, index=index)


prune_attn_block = functools.partial(_prune_block, "attn-block")
prune_attn_block_reweight = functools.partial(_prune_block, "attn-block-reweight")
