"""Softmax attention matrices, computed stably; rotary position embeddings (`Rope`); the attention
probabilities of one Llama or Gemma 3 layer (`layer_attention`, the single copy the model, the
factored pruning objective and the pipeline all call).

f(W) = row-softmax of S = X W Xᵀ, restricted to j <= i when causal. The softmax is max-shifted
over the allowed entries and excludes the others before the exponential, so it never overflows:
logits of order 1e4 give finite, exact attention in float32.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from attnprune_jax import validation
from attnprune_jax.errors import InputError, InputTypeError


def masked_softmax(scores: Float[Array, "... n n"], *, causal: bool) -> Float[Array, "... n n"]:
  """Row softmax of square score matrices; with `causal`, entries above the diagonal are 0.

  `jax.nn.softmax` with `where`: max-shifted over the allowed entries only, the others excluded
  before the exponential. The diagonal is always allowed, so every row has a finite max.
  """
  n = scores.shape[-1]
  return jax.nn.softmax(scores, axis=-1, where=jnp.tril(jnp.ones((n, n), bool)) if causal else None)


def product(spec: str, a, b, compute_dtype=None):
  """`jnp.einsum(spec, a, b)`; with a `compute_dtype` (e.g. bfloat16) the operands are rounded
  to it and the products accumulate in float32."""
  if compute_dtype is None:
    return jnp.einsum(spec, a, b)
  return jnp.einsum(spec, a.astype(compute_dtype), b.astype(compute_dtype),
                    preferred_element_type=jnp.float32)


def attention_scores(x: Float[Array, "... n d"], w: Float[Array, "d d"],
                     compute_dtype=None) -> Float[Array, "... n n"]:
  """S = X W Xᵀ for each leading index of x (operands in `compute_dtype`, see `product`)."""
  return product("...ne,...me->...nm", product("...nd,de->...ne", x, w, compute_dtype), x,
                 compute_dtype)


@functools.partial(jax.jit, static_argnames=("causal", "compute_dtype"))
def softmax_attention(x: Float[Array, "... n d"], w: Float[Array, "d d"], *, causal: bool,
                      compute_dtype=None) -> Float[Array, "... n n"]:
  """Softmax(X W Xᵀ) without input checks (jitted; inside other jitted code it is inlined)."""
  return masked_softmax(attention_scores(x, w, compute_dtype), causal=causal)


def attention_matrix(x: Float[Array, "... n d"], w: Float[Array, "d d"], *,
                     causal: bool = True) -> Float[Array, "... n n"]:
  """The attention matrix Softmax(X W Xᵀ) (causal by default), batched over leading axes of x.

  Args:
    x: hidden states, rows are tokens: (n, d) or (..., n, d).
    w: merged query-key weight (d, d).
    causal: restrict token i to attend to j <= i.
  Returns:
    (..., n, n) row-stochastic matrices.
  """
  x = validation.check_array("x", x)
  if x.ndim < 2:
    raise InputError(f"x must have shape (..., n, d), got shape {tuple(x.shape)}")
  w = validation.check_array("w", w, ndim=2)
  d = x.shape[-1]
  if w.shape != (d, d):
    raise InputError(f"w must have shape ({d}, {d}) to match x's last axis, got {tuple(w.shape)}")
  if 0 in x.shape:
    raise InputError(f"x must hold at least one token, got shape {tuple(x.shape)}")
  dtype = jnp.promote_types(jnp.promote_types(w.dtype, x.dtype), jnp.float32)
  return softmax_attention(x.astype(dtype), w.astype(dtype),
                           causal=validation.check_bool("causal", causal))


FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class Llama3Scaling:
  """Llama 3.1's RoPE frequency scaling (`rope_type` "llama3" in Hugging Face configs).

  Frequencies whose wavelength 2π/ω exceeds original_max_positions / low_freq_factor are divided
  by `factor`; those below original_max_positions / high_freq_factor are kept; in between they
  are interpolated linearly in original_max_positions / wavelength.
  """
  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_positions: int

  def __post_init__(self):
    for name in ("factor", "low_freq_factor", "high_freq_factor"):
      validation.check_scalar(name, getattr(self, name), minimum=0.0, strict=True)
      object.__setattr__(self, name, float(getattr(self, name)))  # equal ones compare equal
      if getattr(self, name) > FLOAT32_MAX:
        raise InputError(f"{name} must be at most {FLOAT32_MAX:.4g} (the frequencies are "
                         f"float32), got {getattr(self, name)}")
    object.__setattr__(self, "original_max_positions", validation.check_positive_int(
        "original_max_positions", self.original_max_positions))
    if not self.high_freq_factor > self.low_freq_factor:
      raise InputError(f"high_freq_factor must be > low_freq_factor ({self.low_freq_factor}), "
                       f"got {self.high_freq_factor}")


@dataclasses.dataclass(frozen=True)
class Rope:
  """Rotary embedding frequencies: ω_i = base^(−2i/hd), rescaled by `scaling` if given.

  Hashable, so jitted functions take it as a static argument; a plain float stands for
  `Rope(base=that float)` wherever a `Rope` is asked for.
  """
  base: float
  scaling: Llama3Scaling | None = None

  def __post_init__(self):
    validation.check_scalar("rope base", self.base, minimum=0.0, strict=True)
    object.__setattr__(self, "base", float(self.base))
    if self.scaling is not None and not isinstance(self.scaling, Llama3Scaling):
      raise InputTypeError(f"rope scaling must be a Llama3Scaling or None, got "
                           f"{self.scaling!r}")

  def inverse_frequencies(self, half: int, dtype) -> jax.Array:
    """ω_0..ω_{half−1}, (half,) in `dtype`."""
    inv_freq = self.base ** (-jnp.arange(half, dtype=dtype) / half)
    if self.scaling is None:
      return inv_freq
    s = self.scaling
    wavelength = 2 * math.pi / inv_freq
    long = wavelength > s.original_max_positions / s.low_freq_factor
    short = wavelength < s.original_max_positions / s.high_freq_factor
    smooth = ((s.original_max_positions / wavelength - s.low_freq_factor)
              / (s.high_freq_factor - s.low_freq_factor))
    between = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    return jnp.where(long, inv_freq / s.factor, jnp.where(short, inv_freq, between))


def as_rope(rope: "Rope | float") -> Rope:
  """`rope` itself, or a plain base θ as `Rope(θ)` (InputError for anything else)."""
  if isinstance(rope, Rope):
    return rope
  validation.check_scalar("rope", rope, minimum=0.0, strict=True)
  return Rope(float(rope))


def rotary_embedding(x: Float[Array, "... t heads hd"], positions: Array, *,
                     rope: "Rope | float | Array") -> Float[Array, "... t heads hd"]:
  """RoPE in the rotate-half convention (Hugging Face Llama order of q/k rows).

  Channel i of the first half and channel i of the second half form a pair rotated by the angle
  position·ω_i (`Rope.inverse_frequencies`; without scaling ω_i = base^(−2i/hd)).

  Args:
    x: queries or keys, (..., t, heads, head_dim).
    positions: (t,) token positions.
    rope: the frequencies, a plain base θ, or the inverse frequencies ω (hd / 2,) as an array
      (a layer's own, chosen by a traced layer index).
  """
  half = x.shape[-1] // 2
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  if isinstance(rope, jax.Array):
    inv_freq = rope.astype(dtype)
  else:
    inv_freq = as_rope(rope).inverse_frequencies(half, dtype)
  angles = positions.astype(dtype)[:, None] * inv_freq[None, :]
  cos = jnp.cos(angles)[:, None, :].astype(x.dtype)
  sin = jnp.sin(angles)[:, None, :].astype(x.dtype)
  first, second = x[..., :half], x[..., half:]
  return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def rms_norm(x: Float[Array, "... d"], weight: Float[Array, "d"], eps: float):
  """x / rms(x) · weight over the last axis (the weight multiplies; no +1): the models' norms and
  Gemma 3's per-head QK-norm."""
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rotated_heads(x: Float[Array, "... t d"], proj: Float[Array, "heads·hd d"], positions, *,
                  head_dim: int, rope: "Rope | float | Array", norm=None,
                  norm_eps: float = 0.0) -> Float[Array, "... t heads hd"]:
  """Queries or keys of a layer: X Wᵀ split into heads of `head_dim` (rows in the Hugging Face
  order), each head RMS-normalized by the weight `norm` (hd,) if given (QK-norm), rotated by
  RoPE at `positions` ((t,) ints, the tokens' positions)."""
  heads = (x @ proj.T).reshape(*x.shape[:-1], -1, head_dim)
  if norm is not None:
    heads = rms_norm(heads, norm, norm_eps)
  return rotary_embedding(heads, positions, rope=rope)


def allowed_keys(rows, t: int, window=None):
  """(r, t) bool: key position j is visible from query position i in `rows` ((r,) ints) if
  j <= i, and with a `window` (int, or a traced int scalar) also i − j < window."""
  keys = jnp.arange(t)[None, :]
  allowed = keys <= rows[:, None]
  if window is not None:
    allowed &= rows[:, None] - keys < window
  return allowed


def causal_probs(q: Float[Array, "... r hq hd"], k: Float[Array, "... t hk hd"],
                 rows, *, window=None, scale: float | None = None) -> Float[Array, "... hq r t"]:
  """Causal softmax(scale · q kᵀ) of rotated queries at positions `rows` ((r,) ints) against
  the keys at positions 0..t−1 (within `window` if given, see `allowed_keys`); scale None is
  1/√hd. Key head j // (hq / hk) serves query head j (contiguous groups)."""
  *lead, r, hq, head_dim = q.shape
  t, hk = k.shape[-3], k.shape[-2]
  # (..., r, hk·group, hd) -> (..., hk, group, r, hd) without materializing repeated keys.
  q = jnp.moveaxis(q.reshape(*lead, r, hk, hq // hk, head_dim), -4, -2)
  scores = jnp.einsum("...kgqe,...ske->...kgqs", q, k)
  if scale is None:
    scores = scores / jnp.sqrt(jnp.asarray(head_dim, q.dtype))
  else:
    scores = scores * jnp.asarray(scale, q.dtype)
  probs = jax.nn.softmax(scores, axis=-1, where=allowed_keys(rows, t, window))
  return probs.reshape(*lead, hq, r, t)


def layer_attention(x: Float[Array, "... t d"], q_proj: Float[Array, "hq d"],
                    k_proj: Float[Array, "hk d"], *, head_dim: int,
                    rope: "Rope | float | Array", q_norm=None, k_norm=None,
                    norm_eps: float = 0.0, window=None,
                    scale: float | None = None) -> Float[Array, "... heads t t"]:
  """Causal attention probabilities of one attention layer (no V, no output projection).

  q = X W_Qᵀ and k = X W_Kᵀ split into heads of `head_dim` (rows in the Hugging Face order),
  per-head RMSNorm with `q_norm` / `k_norm` if given (Gemma 3), rotated by RoPE (rotate-half,
  positions 0..t−1), scores q kᵀ / √head_dim (or times `scale`), causal softmax, within a
  sliding `window` if given. Grouped-query attention: query head j reads key head
  j // (q_heads / k_heads), contiguous groups. One KV group alone is the call with its query
  rows and its one key head.

  Args:
    x: attention inputs (post-RMSNorm hidden states), (..., t, d).
    q_proj: (q_heads·head_dim, d) query weight, (out, in).
    k_proj: (k_heads·head_dim, d) key weight; q_heads must be a multiple of k_heads.
    head_dim: channels per head.
    rope: the RoPE frequencies (`Rope`), a plain base θ, or the inverse frequencies (hd / 2,).
    q_norm, k_norm: (head_dim,) QK-norm weights (both or neither), with epsilon `norm_eps`.
    window: token i sees tokens j with i − window < j <= i (int or traced int; None: all j <= i).
    scale: the factor of q·k; None is 1/√head_dim.
  Returns:
    (..., q_heads, t, t) row-stochastic, lower-triangular matrices.
  """
  positions = jnp.arange(x.shape[-2])
  heads = functools.partial(rotated_heads, x, positions=positions, head_dim=head_dim,
                            rope=rope, norm_eps=norm_eps)
  return causal_probs(heads(q_proj, norm=q_norm), heads(k_proj, norm=k_norm), positions,
                      window=window, scale=scale)
