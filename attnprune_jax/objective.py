"""The paper's pruning objective (merged form) and its closed-form gradient.

L(M) = ½ Σ_b ‖f_b(M∘W) − f_b(W)‖²_F + (λ/2)‖M‖²_F, with f_b(W) = Softmax(X_b W X_bᵀ), summed over
calibration sequences b. The gradient (derived here, checked against autodiff and finite
differences in the tests): with f = f_b(M∘W), c = f − f_b(W), r = (c∘f)1 and G = f∘(c − r1ᵀ),

  ∇L(M) = W ∘ Σ_b X_bᵀ G_b X_b + λM.

Cost O(n²d + nd²) per sequence; no n×n×d×d tensor is formed. The dense reference f_b(W) is an
argument of the internal functions so that a solver computes it once, not at every step.
"""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attnprune_jax import validation
from attnprune_jax.attention import (Rope, causal_probs, layer_attention, product, rotated_heads,
                                     softmax_attention)
from attnprune_jax.errors import InputError


def check_inputs(w, x, *, w_ndim: int | tuple[int, ...] = 2) -> tuple[jax.Array, jax.Array]:
  """Validates the merged weight w ((d, d), or (h, d, d) if `w_ndim` allows) and the inputs x;
  returns them as arrays of at least float32 (`validation.at_least_float32`), x as (b, n, d)."""
  w = validation.check_array("w", w, ndim=w_ndim)
  if w.shape[-2] != w.shape[-1] or w.shape[-1] == 0:
    raise InputError(f"w must be square (d, d) with d >= 1, got shape {tuple(w.shape)}")
  x = validation.check_array("x", x, ndim=(2, 3))
  if x.shape[-1] != w.shape[-1]:
    raise InputError(
        f"x must have last axis {w.shape[-1]} (w is {tuple(w.shape)}), got shape {tuple(x.shape)}")
  if 0 in x.shape:
    raise InputError("x must hold at least one sequence of at least one token, got shape "
                     f"{tuple(x.shape)}")
  dtype = jnp.promote_types(jnp.promote_types(w.dtype, x.dtype), jnp.float32)
  return w.astype(dtype), x.reshape((-1,) + x.shape[-2:]).astype(dtype)


def check_problem(mask, w, x, *, w_ndim: int | tuple[int, ...] = 2
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Validates (mask, w, x) of the merged problem (mask of w's shape; w as in `check_inputs`);
  returns them as arrays of one dtype (at least float32), x as (b, n, d)."""
  w, x = check_inputs(w, x, w_ndim=w_ndim)
  mask = validation.check_array("mask", mask, ndim=w.ndim)
  if mask.shape != w.shape:
    raise InputError(f"mask must have w's shape {tuple(w.shape)}, got {tuple(mask.shape)}")
  dtype = jnp.promote_types(mask.dtype, w.dtype)
  return mask.astype(dtype), w.astype(dtype), x.astype(dtype)


def merged_loss_given(mask: Float[Array, "d d"], w: Float[Array, "d d"], x: Float[Array, "b n d"],
                      target: Float[Array, "b n n"], lam, causal: bool, compute_dtype=None):
  """L(M) given the dense attention `target` = f(W) (one attention forward). No checks."""
  f = softmax_attention(x, mask * w, causal=causal, compute_dtype=compute_dtype)
  return 0.5 * jnp.sum((f - target)**2) + 0.5 * lam * jnp.sum(mask**2)


def merged_loss_and_grad(mask: Float[Array, "d d"], w: Float[Array, "d d"],
                         x: Float[Array, "b n d"], target: Float[Array, "b n n"], lam,
                         causal: bool, compute_dtype=None):
  """L(M) and the closed-form ∇L(M), given the dense attention `target` = f(W). No checks.
  With a `compute_dtype` the matmuls' operands are rounded to it (`attention.product`)."""
  f = softmax_attention(x, mask * w, causal=causal, compute_dtype=compute_dtype)
  gap = f - target
  loss = 0.5 * jnp.sum(gap**2) + 0.5 * lam * jnp.sum(mask**2)
  row_dot = jnp.sum(gap * f, axis=-1, keepdims=True)
  g = f * (gap - row_dot)
  xt_g_x = product("bnd,bne->de", x, product("bnm,bme->bne", g, x, compute_dtype),
                   compute_dtype)
  return loss, w * xt_g_x + lam * mask


def blocked_loss_and_grad(mask: Float[Array, "d d"], w: Float[Array, "d d"],
                          x: Float[Array, "b n d"], lam, causal: bool, block: int,
                          compute_dtype=None):
  """`merged_loss_and_grad` over blocks of `block` query rows, in O(b·block·n) memory. No checks.

  Softmax is row-wise, so the loss and X_bᵀ G_b X_b are sums over query rows. Each block
  computes its rows of f_b(M∘W) and of the dense reference f_b(W) from the block's queries
  X_rows (M∘W) and X_rows W: no (b, n, n) array and no per-head (b, n, d) array is stored.
  Rows are padded to a multiple of `block`; padded rows contribute nothing. `compute_dtype` as
  in `merged_loss_and_grad`.
  """
  b, n, d = x.shape
  blocks = -(-n // block)
  rows = jnp.pad(x, ((0, 0), (0, blocks * block - n), (0, 0))).reshape(
      b, blocks, block, d).swapaxes(0, 1)  # (blocks, b, block, d)
  index = jnp.arange(blocks * block).reshape(blocks, block)
  masked = mask * w

  def body(carry, inputs):
    loss, xt_g_x = carry
    x_rows, row = inputs
    allowed = jnp.arange(n)[None, :] <= row[:, None] if causal else jnp.ones((block, n), bool)
    scores = lambda v: product("brd,bnd->brn", product("brd,de->bre", x_rows, v, compute_dtype),
                               x, compute_dtype)
    f = jax.nn.softmax(scores(masked), axis=-1, where=allowed)
    target = jax.nn.softmax(scores(w), axis=-1, where=allowed)
    gap = jnp.where((row < n)[:, None], f - target, 0.0)
    g = f * (gap - jnp.sum(gap * f, axis=-1, keepdims=True))
    xt_g_x = xt_g_x + product("brd,bre->de", x_rows, product("brn,bnd->brd", g, x, compute_dtype),
                              compute_dtype)
    return (loss + 0.5 * jnp.sum(gap**2), xt_g_x), None

  zero = jnp.zeros((), w.dtype), jnp.zeros((d, d), w.dtype)
  (gap_loss, xt_g_x), _ = jax.lax.scan(body, zero, (rows, index))
  return gap_loss + 0.5 * lam * jnp.sum(mask**2), w * xt_g_x + lam * mask


@functools.partial(jax.jit, static_argnames=("causal", "compute_dtype"))
def squared_gap(mask: Float[Array, "d d"], w: Float[Array, "d d"], x: Float[Array, "b n d"],
                causal: bool, compute_dtype=None) -> jax.Array:
  """Σ_b ‖f_b(M∘W) − f_b(W)‖²_F without input checks."""
  pruned = softmax_attention(x, mask * w, causal=causal, compute_dtype=compute_dtype)
  dense = softmax_attention(x, w, causal=causal, compute_dtype=compute_dtype)
  return jnp.sum((pruned - dense)**2)


@functools.partial(jax.jit, static_argnames=("causal", "compute_dtype"))
def merged_loss(mask: Float[Array, "d d"], w: Float[Array, "d d"], x: Float[Array, "b n d"], lam,
                causal: bool, compute_dtype=None) -> jax.Array:
  """L(M) without input checks."""
  return 0.5 * squared_gap(mask, w, x, causal, compute_dtype) + 0.5 * lam * jnp.sum(mask**2)


@functools.partial(jax.jit, static_argnames="causal")
def _grad(mask, w, x, lam, causal: bool) -> jax.Array:
  target = softmax_attention(x, w, causal=causal)
  return merged_loss_and_grad(mask, w, x, target, lam, causal)[1]


def attention_error(mask, w, x, *, causal: bool = True) -> jax.Array:
  """Σ_b ‖f_b(M∘W) − f_b(W)‖²_F: how far the pruned attention is from the dense one.

  Args:
    mask: (d, d) mask, binary or continuous.
    w: (d, d) merged weight.
    x: (n, d) or (b, n, d) hidden states.
    causal: causal attention.
  Returns:
    scalar; twice the attention term of `pruning_loss`.
  """
  mask, w, x = check_problem(mask, w, x)
  return squared_gap(mask, w, x, validation.check_bool("causal", causal))


def pruning_loss(mask, w, x, *, lam, causal: bool = True) -> jax.Array:
  """The paper's loss L(M) = ½ Σ_b ‖f_b(M∘W) − f_b(W)‖²_F + (λ/2)‖M‖²_F.

  Args:
    mask: (d, d) continuous mask M.
    w: (d, d) merged query-key weight W.
    x: (n, d) one sequence or (b, n, d) calibration sequences (the loss sums over b).
    lam: λ >= 0, weight of the L2 term.
    causal: causal attention.
  Returns:
    scalar loss.
  """
  mask, w, x = check_problem(mask, w, x)
  validation.check_scalar("lam", lam, minimum=0.0)
  return merged_loss(mask, w, x, lam, validation.check_bool("causal", causal))


def pruning_grad(mask, w, x, *, lam, causal: bool = True) -> jax.Array:
  """Closed-form ∇L(M) = W ∘ Σ_b X_bᵀ G_b X_b + λM (see module docstring); shape of `mask`."""
  mask, w, x = check_problem(mask, w, x)
  validation.check_scalar("lam", lam, minimum=0.0)
  return _grad(mask, w, x, lam, validation.check_bool("causal", causal))


# Factored form: masks on a real layer's q_proj and k_proj (DESIGN.md §2, "Real models").
#
# With RoPE the merged W_Q W_Kᵀ is position-dependent, so the masks sit on the actual weights:
# A_h(M) = layer_attention(X; M_Q∘W_Q, M_K∘W_K), and for one KV group (its query heads and
# their shared key head)
#   L(M_Q, M_K) = ½ Σ_b Σ_h ‖A_h,b(M) − A_h,b(1)‖²_F + (λ/2)(‖M_Q‖²_F + ‖M_K‖²_F).
# Groups share no weights, so a layer is its groups' independent problems side by side.


def kv_groups(q_proj: Float[Array, "hq d"], k_proj: Float[Array, "hk d"], num_kv_heads: int):
  """Splits a layer's (q_proj, k_proj) into KV groups: (kv, group·hd, d) and (kv, hd, d)."""
  return (q_proj.reshape(num_kv_heads, -1, q_proj.shape[-1]),
          k_proj.reshape(num_kv_heads, -1, k_proj.shape[-1]))


def factored_loss(masks: dict, q_proj: Float[Array, "gq d"], k_proj: Float[Array, "hd d"],
                  x: Float[Array, "b t d"], target: Float[Array, "b g t t"], lam, *,
                  head_dim: int, rope: Rope | float, **layout) -> jax.Array:
  """The factored loss of one KV group, given its dense attention `target`. No checks.

  Args:
    masks: {"q_proj": (group·hd, d), "k_proj": (hd, d)} continuous masks.
    q_proj, k_proj: the group's dense weights, (out, in).
    x: calibration attention inputs, (b, t, d).
    target: layer_attention(x, q_proj, k_proj), (b, group, t, t).
    lam: λ >= 0.
    head_dim, rope, **layout: the layer's attention (`models.llama.layer_attention_args`:
      also its window, query scale and QK-norm weights, where it has them).
  """
  pruned = layer_attention(x, masks["q_proj"] * q_proj, masks["k_proj"] * k_proj,
                           head_dim=head_dim, rope=rope, **layout)
  penalty = sum(jnp.sum(m**2) for m in jax.tree.leaves(masks))
  return 0.5 * jnp.sum((pruned - target)**2) + 0.5 * lam * penalty


def blocked_factored_loss(masks: dict, q_proj: Float[Array, "gq d"], k_proj: Float[Array, "hd d"],
                          x: Float[Array, "b t d"], lam, *, head_dim: int, rope: Rope | float,
                          block: int, **layout) -> jax.Array:
  """`factored_loss` without the dense target, over blocks of `block` query rows. No checks.

  Each block recomputes its rows of the dense attention next to the pruned one and is
  rematerialized in the backward pass (`jax.checkpoint`), so neither value nor gradient stores
  a (b, group, t, t) array: memory is O(b·group·block·t) per KV group.
  """
  gap = blocked_attention_gap(masks["q_proj"] * q_proj, masks["k_proj"] * k_proj, q_proj, k_proj,
                              x, head_dim=head_dim, rope=rope, block=block, **layout)
  penalty = sum(jnp.sum(m**2) for m in jax.tree.leaves(masks))
  return 0.5 * jnp.sum(gap) + 0.5 * lam * penalty


def blocked_attention_gap(q_proj: Float[Array, "hq d"], k_proj: Float[Array, "hk d"],
                          other_q_proj: Float[Array, "hq d"], other_k_proj: Float[Array, "hk d"],
                          x: Float[Array, "b t d"], *, head_dim: int, rope: Rope | float,
                          block: int, q_norm=None, k_norm=None, norm_eps: float = 0.0,
                          window=None, scale: float | None = None) -> Float[Array, "b"]:
  """Σ_h ‖A_h(q, k) − A_h(other q, other k)‖²_F per sequence, over blocks of query rows.

  The keys (b, t, hk, hd) are computed once; each block of `block` query rows computes its rows
  of both attentions, (b, hq, block, t), under `jax.checkpoint`. Rows are padded to a multiple
  of `block` (repeating the last token); padded rows contribute nothing. The keywords after
  `block` are `attention.layer_attention`'s (QK-norm, window, query scale).
  """
  t = x.shape[-2]
  heads = functools.partial(rotated_heads, head_dim=head_dim, rope=rope, norm_eps=norm_eps)
  keys = (heads(x, k_proj, jnp.arange(t), norm=k_norm),
          heads(x, other_k_proj, jnp.arange(t), norm=k_norm))

  @jax.checkpoint
  def block_gap(rows, keys):
    x_rows = jnp.take(x, jnp.minimum(rows, t - 1), axis=-2)
    probs = [causal_probs(heads(x_rows, q, rows, norm=q_norm), k, rows, window=window,
                          scale=scale)
             for q, k in zip((q_proj, other_q_proj), keys)]
    gap = jnp.where((rows < t)[:, None], probs[0] - probs[1], 0.0)
    return jnp.sum(gap**2, axis=(-3, -2, -1))

  def body(total, rows):
    return total + block_gap(rows, keys), None

  blocks = jnp.arange(-(-t // block) * block).reshape(-1, block)
  dtype = jnp.result_type(x, q_proj, k_proj, other_q_proj, other_k_proj)
  return jax.lax.scan(body, jnp.zeros(x.shape[:-2], dtype), blocks)[0]


def layer_attention_error(q_proj: Float[Array, "hq d"], k_proj: Float[Array, "hk d"],
                          dense_q_proj: Float[Array, "hq d"], dense_k_proj: Float[Array, "hk d"],
                          x: Float[Array, "b t d"], *, head_dim: int, rope: Rope | float,
                          block: int | None = None, **layout) -> Float[Array, "b"]:
  """Σ_h ‖A_h(pruned) − A_h(dense)‖²_F per sequence: a layer's attention error on inputs x;
  with `block`, over blocks of query rows (`blocked_attention_gap`). `layout`: the rest of the
  layer's attention (`models.llama.layer_attention_args`)."""
  if block is not None:
    return blocked_attention_gap(q_proj, k_proj, dense_q_proj, dense_k_proj, x,
                                 head_dim=head_dim, rope=rope, block=block, **layout)
  pruned = layer_attention(x, q_proj, k_proj, head_dim=head_dim, rope=rope, **layout)
  dense = layer_attention(x, dense_q_proj, dense_k_proj, head_dim=head_dim, rope=rope, **layout)
  return jnp.sum((pruned - dense)**2, axis=(-3, -2, -1))
