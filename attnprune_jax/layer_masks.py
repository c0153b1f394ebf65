"""Attention-aware masks for a real layer's q_proj and k_proj (the factored objective).

Three methods on `objective.factored_loss`, each KV group an independent problem (`jax.vmap`
over groups), all through the one solver loop of `solver`:

- "attn": the paper's Algorithm 1 (optimizer steps on (M_Q, M_K) from M = 1), then one cut to
  the target sparsity by the score |M∘W|·‖X_j‖ per output row (or N:M); weights keep their
  dense values. The binarization rule is our choice: the paper's is not known.
- "attn-progressive": rounds of optimizer steps on the current support, each followed by a prune
  step on a cubic schedule (for N:M, the number pruned per group of m rises 1, 2, … to n on the
  same schedule); binary final mask, dense values kept (a pure mask).
- "attn-reweight": as "attn-progressive", then `reweight_steps` more steps on the final support,
  and the kept weights become M∘W: this changes weight values (like SparseGPT's update) and is
  always reported as its own method.

Minibatches: each step uses `windows_per_step` consecutive calibration windows, cycling through
all of them (a full batch when it equals their count). All settings are our choice: each method's
`MaskSolverConfig` is registered with it (`methods.REGISTRY`); paper_repro.md has the sweep that
chose them. `prune_attn`, `prune_attn_progressive` and `prune_attn_reweight` are the registered
implementations (the registry's "qk" interface).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float
import optax

from attnprune_jax import methods, sharding, validation
from attnprune_jax.attention import Rope, as_rope, layer_attention
from attnprune_jax.errors import DivergenceError, InputError
from attnprune_jax.masks import binarize
from attnprune_jax.objective import blocked_factored_loss, factored_loss, kv_groups
from attnprune_jax.patterns import check_n_m
from attnprune_jax.solver import cubic_schedule, default_block, minimize, prune_progressively
from attnprune_jax.solver_config import MaskSolverConfig

VARIANTS = ("attn", "attn-progressive", "attn-reweight")  # what `solve_layer` runs
OPTIMIZERS = {"adam": optax.adam, "sgd": optax.sgd}  # by `solver_config.OPTIMIZERS` name


class LayerPruning(NamedTuple):
  """New q/k weights of one layer and their masks (True = kept); (out, in) like the inputs.

  Attributes:
    q_proj, k_proj: pruned weights (zeros where pruned; re-weighted on the support for
      "attn-reweight").
    keep_q, keep_k: bool masks.
    loss: the minibatch loss at every optimizer step, summed over KV groups.
  """
  q_proj: Float[Array, "hq d"]
  k_proj: Float[Array, "hk d"]
  keep_q: Bool[Array, "hq d"]
  keep_k: Bool[Array, "hk d"]
  loss: Float[Array, "steps"]


def _prune_layer(method: str, q_proj, k_proj, x, *, sparsity: float,
                 n_m: tuple[int, int] | None, config, solver: MaskSolverConfig | None = None,
                 attention: dict, mesh=None) -> LayerPruning:
  """`solve_layer` with the KV heads of a model's `LlamaConfig` and the attention of one of its
  layers (`attention`: `models.llama.layer_attention_args`)."""
  return solve_layer(q_proj, k_proj, x, method=method, sparsity=sparsity, n_m=n_m,
                     config=solver, num_kv_heads=config.num_kv_heads, mesh=mesh, **attention)


prune_attn = functools.partial(_prune_layer, "attn")
prune_attn_progressive = functools.partial(_prune_layer, "attn-progressive")
prune_attn_reweight = functools.partial(_prune_layer, "attn-reweight")


def prune_schedule(sparsity: float, n_m: tuple[int, int] | None, rounds: int) -> tuple:
  """The prune targets of the progressive rounds: (sparsity, n_m) per round, None = no prune.

  Unstructured: the cubic schedule s·(1 − (1 − r/R)³). N:M: n_r = ⌊n·r/R⌋ pruned per group of m,
  evenly spaced (for 2:4 and R = 8, 1:4 after round 4 and 2:4 after round 8); rounds where n_r
  does not grow prune nothing. Even spacing beat the cubic one at 2:4 in our sweep: the cubic
  schedule reaches 2:4 after three rounds and leaves little optimization before the final cut.
  """
  if n_m is None:
    return tuple((s, None) for s in cubic_schedule(sparsity, rounds))
  n, m = n_m
  schedule, pruned = [], 0
  for r in range(1, rounds + 1):
    n_r = n * r // rounds
    schedule.append((n_r / m, (n_r, m)) if n_r > pruned else None)
    pruned = n_r
  return tuple(schedule)


def solve_layer(q_proj, k_proj, x, *, method: str, sparsity: float,
                n_m: tuple[int, int] | None = None, config: MaskSolverConfig | None = None,
                num_kv_heads: int, head_dim: int, rope: Rope | float, block: int | None = None,
                mesh=None, window: int | None = None, scale: float | None = None,
                q_norm=None, k_norm=None, norm_eps: float = 0.0) -> LayerPruning:
  """Prunes one layer's q_proj and k_proj with an attention-aware method.

  Args:
    q_proj: (heads·hd, d) query weight; k_proj: (kv_heads·hd, d) key weight.
    x: calibration attention inputs (post-RMSNorm), (windows, t, d).
    method: one of `VARIANTS`.
    sparsity: fraction removed per output row, in [0, 1); n/m with `n_m`.
    n_m: (n, m) structure along the input axis, or None.
    config: solver settings; None takes the method's registered ones (`Method.solver`).
    num_kv_heads, head_dim, rope: the model's attention layout; window, scale, q_norm,
      k_norm, norm_eps: the rest of the layer's (`attention.layer_attention`; Gemma 3).
    block: query rows per block of the row-blocked loss (`objective.blocked_factored_loss`,
      O(windows·group·block·t) memory per KV group instead of O(windows·group·t²), the same
      result to rounding); None: `solver.default_block`.
    mesh: a `jax.sharding.Mesh` from `sharding.problem_mesh(num_kv_heads, windows_per_step)`:
      KV groups split over its "heads" axis, each step's windows over its "windows" axis (the
      same masks up to the rounding of the window sum); None runs where the inputs are.
  Returns:
    a `LayerPruning`, in float32 for half-precision inputs.
  Raises:
    DivergenceError: if the loss or the masks became NaN or Inf.
  """
  if method not in VARIANTS:
    raise InputError(f"method must be one of {VARIANTS}, got {method!r}", argument="method")
  config = methods.get(method).solver if config is None else config
  rope = as_rope(rope)  # one static value per frequency set: 1e4 and Rope(1e4) compile once
  q_proj = validation.check_array("q_proj", q_proj, ndim=2)
  k_proj = validation.check_array("k_proj", k_proj, ndim=2)
  x = validation.check_array("x", x, ndim=3)
  if 0 in x.shape:
    raise InputError(f"x must hold at least one window of at least one token, got shape "
                     f"{tuple(x.shape)}")
  d = q_proj.shape[1]
  if k_proj.shape[1] != d or x.shape[-1] != d:
    raise InputError(f"q_proj, k_proj and x must share the input width; got {q_proj.shape}, "
                     f"{k_proj.shape}, {x.shape}")
  if k_proj.shape[0] != num_kv_heads * head_dim or q_proj.shape[0] % k_proj.shape[0]:
    raise InputError(f"k_proj must have num_kv_heads·head_dim = {num_kv_heads * head_dim} rows "
                     f"and divide q_proj's {q_proj.shape[0]}, got {k_proj.shape[0]}")
  for name, norm in (("q_norm", q_norm), ("k_norm", k_norm)):
    if norm is not None and validation.check_array(name, norm, ndim=1).shape != (head_dim,):
      raise InputError(f"{name} must have shape ({head_dim},), got {tuple(norm.shape)}")
  sparsity = validation.check_sparsity(sparsity)
  if n_m is not None:
    n_m = check_n_m(n_m, sparsity, d)
  if x.shape[0] % config.windows_per_step:
    raise InputError(f"windows_per_step ({config.windows_per_step}) must divide the number of "
                     f"calibration windows ({x.shape[0]})")
  block = default_block(x.shape[1], block)
  if method == "attn":
    schedule = ((sparsity, n_m),)
  else:
    schedule = prune_schedule(sparsity, n_m, config.rounds)
  dtype = jnp.promote_types(jnp.result_type(q_proj, k_proj, x), jnp.float32)
  # (steps' batches, windows_per_step, t, d): a step's windows are one slice of the first axis.
  batches = x.astype(dtype).reshape(-1, config.windows_per_step, *x.shape[1:])
  q_proj, k_proj = q_proj.astype(dtype), k_proj.astype(dtype)
  if mesh is not None:
    sharding.check_mesh(mesh, heads=num_kv_heads, windows=config.windows_per_step)
    q_proj, k_proj = sharding.place(q_proj, mesh, "heads"), sharding.place(k_proj, mesh, "heads")
    batches = sharding.place(batches, mesh, None, "windows")
  result = _solve_layer(q_proj, k_proj, batches,
                        jnp.asarray(config.lam, dtype), jnp.asarray(config.reweight_lam, dtype),
                        jnp.asarray(config.lr, dtype), method=method, schedule=schedule,
                        optimizer=config.optimizer, steps=config.steps,
                        steps_per_round=config.steps_per_round,
                        reweight_steps=config.reweight_steps,
                        num_kv_heads=num_kv_heads, head_dim=head_dim, rope=rope,
                        block=block, window=window, scale=scale, norm_eps=norm_eps,
                        q_norm=q_norm, k_norm=k_norm)
  if mesh is not None:
    result = sharding.replicate(result, mesh)
  if not validation.is_traced(result.loss) and not bool(jnp.isfinite(result.loss).all()):
    raise DivergenceError(f"{method} diverged: the loss or the masks became NaN or Inf with "
                          f"optimizer={config.optimizer} lr={config.lr:g}; use a smaller lr")
  return result


@functools.partial(jax.jit, static_argnames=(
    "method", "schedule", "optimizer", "steps", "steps_per_round", "reweight_steps",
    "num_kv_heads", "head_dim", "rope", "block", "window", "scale", "norm_eps"))
def _solve_layer(q_proj, k_proj, batches, lam, reweight_lam, lr, *, method, schedule, optimizer,
                 steps, steps_per_round, reweight_steps, num_kv_heads, head_dim, rope,
                 block, window, scale, norm_eps, q_norm, k_norm) -> LayerPruning:
  q_groups, k_groups = kv_groups(q_proj, k_proj, num_kv_heads)
  weights = {"q_proj": q_groups, "k_proj": k_groups}
  # The norm weights (head_dim,) are shared by every KV group: closed over, not mapped.
  layout = {"head_dim": head_dim, "rope": rope, "window": window, "scale": scale,
            "q_norm": q_norm, "k_norm": k_norm, "norm_eps": norm_eps}
  vmap_groups = lambda loss, **shared: jax.vmap(  # KV groups side by side; x and λ shared
      jax.value_and_grad(functools.partial(loss, **layout, **shared)),
      in_axes=(0, 0, 0, None, 0, None) if block is None else (0, 0, 0, None, None))
  if block is None:
    # Dense attention of every group on every window: (kv, batches, windows_per_step, group, t, t).
    target = jax.vmap(functools.partial(layer_attention, **layout),
                      in_axes=(None, 0, 0))(batches, q_groups, k_groups)
    dense_loss_and_grad = vmap_groups(factored_loss)
    group_loss_and_grad = lambda masks, batch, lam: dense_loss_and_grad(
        masks, q_groups, k_groups, batches[batch], target[:, batch], lam)
  else:
    blocked_loss_and_grad = vmap_groups(blocked_factored_loss, block=block)
    group_loss_and_grad = lambda masks, batch, lam: blocked_loss_and_grad(
        masks, q_groups, k_groups, batches[batch], lam)

  def loss_and_grad(masks, step, lam=lam):
    loss, grads = group_loss_and_grad(masks, step % batches.shape[0], lam)
    return jnp.sum(loss), grads

  # ‖X_j‖ over all calibration tokens: the activation factor of the score |M∘W|·‖X_j‖.
  feature_norms = jnp.linalg.norm(batches.reshape(-1, batches.shape[-1]), axis=0)

  def prune(masks, keep, target):
    round_sparsity, round_n_m = target
    return jax.tree.map(
        lambda m, w, k: binarize(jnp.where(k, jnp.abs(m * w) * feature_norms, -1.0),
                                 round_sparsity, n_m=round_n_m),
        masks, weights, keep)

  opt = OPTIMIZERS[optimizer](lr)
  ones = jax.tree.map(jnp.ones_like, weights)
  if method == "attn":
    masks, _, loss, _ = minimize(loss_and_grad, ones, optimizer=opt, steps=steps)
    keep = prune(masks, jax.tree.map(lambda w: jnp.ones(w.shape, bool), weights), schedule[0])
  else:
    keep, masks, loss = prune_progressively(
        loss_and_grad, ones, optimizer=opt, steps=steps_per_round, schedule=schedule,
        prune=prune)
    if method == "attn-reweight":
      # Re-weighting starts from the binary mask (the dense values on the support), not from
      # the progressive rounds' values, which the L2 term has shrunk.
      start = jax.tree.map(lambda k: k.astype(batches.dtype), keep)
      masks, _, extra, _ = minimize(functools.partial(loss_and_grad, lam=reweight_lam), start,
                                    optimizer=opt, steps=reweight_steps, keep=keep,
                                    first_step=len(schedule) * steps_per_round)
      loss = jnp.concatenate([loss, extra])
  # A non-finite final mask marks the loss history, which the caller checks outside jit.
  finite = jnp.all(jnp.stack([jnp.isfinite(m).all() for m in jax.tree.leaves(masks)]))
  loss = jnp.where(finite, loss, jnp.nan)
  if method == "attn-reweight":
    new = jax.tree.map(lambda m, w: m * w, masks, weights)
  else:
    new = jax.tree.map(lambda k, w: jnp.where(k, w, 0), keep, weights)
  return LayerPruning(new["q_proj"].reshape(q_proj.shape), new["k_proj"].reshape(k_proj.shape),
                      keep["q_proj"].reshape(q_proj.shape), keep["k_proj"].reshape(k_proj.shape),
                      loss)
