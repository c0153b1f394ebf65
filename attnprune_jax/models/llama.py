"""A Llama-architecture causal LM as a Flax NNX module, and Gemma 3 as a variant of it.

RMSNorm, RoPE, grouped-query attention, SwiGLU, tied embeddings. Gemma 3 (`family` "gemma3")
adds per-head RMSNorm of queries and keys before RoPE (`qk_norm`), RMSNorm of the attention's
and the MLP's outputs before the residual (`output_norms`), GeGLU with tanh-GELU and
embeddings times √d, and sets what its config fields say: a sliding window with its own RoPE
base on most layers (`sliding_layers`, `sliding_window`, `local_rope_base`), its query scale.
Norm weights are held as the factor they multiply by: Gemma's checkpoints store w for a factor
1 + w, which the Hugging Face reader and writer convert (GGUF files store 1 + w already).

Weights are stacked over layers, (layers, out, in) like the checkpoints, and the forward pass
is one jitted `lax.scan` over them: 30 layers compile as one. q/k rows are in the Hugging Face
order and RoPE uses the rotate-half convention (`attention.rotary_embedding`). Query head j reads
KV head j // (heads / kv_heads): contiguous groups.

The module holds its weights as `nnx.Param`s; `forward` is the pure function behind `__call__`,
so weights can be replaced (for pruning) by passing arrays of the same shapes: no re-tracing.
"""

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from attnprune_jax import validation
from attnprune_jax.attention import Llama3Scaling, Rope, layer_attention, rms_norm
from attnprune_jax.errors import InputError

LLAMA_LAYER_WEIGHTS = ("input_layernorm", "q_proj", "k_proj", "v_proj", "o_proj",
                       "post_attention_layernorm", "gate_proj", "up_proj", "down_proj")
# Gemma 3's additions: per-head q/k norms (head_dim,), the attention's and the MLP's output
# norms (d,). `post_attention_layernorm` is the MLP's input norm in every family (Gemma's
# checkpoints call it pre_feedforward_layernorm).
GEMMA3_LAYER_WEIGHTS = ("q_norm", "k_norm", "attention_output_norm", "mlp_output_norm")
# Every name a layer weight (stacked on a leading layer axis) may have.
LAYER_WEIGHTS = LLAMA_LAYER_WEIGHTS + GEMMA3_LAYER_WEIGHTS
FAMILIES = ("llama", "gemma3")
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True)}
# The window of a layer without one, in the per-layer table (longer than any sequence).
NO_WINDOW = 2**30


def layer_weight_names(family: str) -> tuple[str, ...]:
  """The names of the layer weights of a model `family`."""
  return LLAMA_LAYER_WEIGHTS + (GEMMA3_LAYER_WEIGHTS if family == "gemma3" else ())


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture numbers of a Llama model.

  `rope_scaling` is Llama 3.1's frequency scaling or None; `max_positions` the longest sequence
  the model was made for (None: unknown, unchecked). The fields after it are Gemma 3's (see the
  module docstring); their defaults are the Llama. `sliding_layers` are the layer indices whose
  token i attends to tokens i − sliding_window < j ≤ i only, with RoPE base `local_rope_base`;
  `query_scale` multiplies q·k (None: 1/√head_dim).
  """
  # The fields of the first stored results' configs: a stored result's key reads the others only
  # where they differ from their defaults (`results.config_text`).
  KEYED_FIELDS: ClassVar[tuple[str, ...]] = (
      "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
      "num_kv_heads", "head_dim", "rope_base", "rms_eps", "tie_embeddings", "rope_scaling",
      "max_positions")
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_base: float
  rms_eps: float
  tie_embeddings: bool = True
  rope_scaling: Llama3Scaling | None = None
  max_positions: int | None = None
  family: str = "llama"
  query_scale: float | None = None
  sliding_window: int | None = None
  sliding_layers: tuple[int, ...] = ()
  local_rope_base: float | None = None

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "head_dim"):
      validation.check_positive_int(name, getattr(self, name))
    validation.check_scalar("rope_base", self.rope_base, minimum=0.0, strict=True)
    validation.check_scalar("rms_eps", self.rms_eps, minimum=0.0)
    for name in ("rope_base", "rms_eps"):  # equal configs compare (and print) equal
      object.__setattr__(self, name, float(getattr(self, name)))
    validation.check_bool("tie_embeddings", self.tie_embeddings)
    if self.rope_scaling is not None and not isinstance(self.rope_scaling, Llama3Scaling):
      raise InputError(f"rope_scaling must be a Llama3Scaling or None, got {self.rope_scaling!r}")
    if self.max_positions is not None:
      object.__setattr__(self, "max_positions",
                         validation.check_positive_int("max_positions", self.max_positions))
    if self.num_heads % self.num_kv_heads:
      raise InputError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self.num_kv_heads})")
    if self.head_dim % 2:
      raise InputError(f"head_dim must be even for RoPE, got {self.head_dim}")
    if self.family not in FAMILIES:
      raise InputError(f"family must be one of {FAMILIES}, got {self.family!r}")
    if self.query_scale is not None:
      validation.check_scalar("query_scale", self.query_scale, minimum=0.0, strict=True)
      object.__setattr__(self, "query_scale", float(self.query_scale))
    layers = self.sliding_layers
    if (not isinstance(layers, tuple | list) or len(set(layers)) != len(layers)
        or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_layers
               for i in layers)):
      raise InputError(f"sliding_layers must be distinct layer indices in [0, "
                       f"{self.num_layers}), got {layers!r}")
    object.__setattr__(self, "sliding_layers", tuple(sorted(layers)))
    if bool(layers) != (self.sliding_window is not None):
      raise InputError(f"sliding_layers and sliding_window go together, got {layers!r} and "
                       f"{self.sliding_window!r}")
    if self.local_rope_base is not None and not layers:
      raise InputError("local_rope_base needs sliding_layers (the layers it applies to)")
    if self.sliding_window is not None:
      object.__setattr__(self, "sliding_window",
                         validation.check_positive_int("sliding_window", self.sliding_window))
    if self.local_rope_base is not None:
      validation.check_scalar("local_rope_base", self.local_rope_base, minimum=0.0, strict=True)
      object.__setattr__(self, "local_rope_base", float(self.local_rope_base))
    # What a checkpoint of the family can say (models.huggingface writes nothing else).
    if self.family == "llama" and (layers or self.query_scale is not None):
      raise InputError("sliding_layers and query_scale are Gemma 3's settings; a Llama "
                       "(family 'llama') has neither")
    if self.family == "gemma3" and self.rope_scaling is not None:
      raise InputError("rope_scaling (Llama 3.1's) is not supported on a Gemma 3")

  @property
  def activation(self) -> str:
    """The MLP's gate activation (`ACTIVATIONS`): SiLU (SwiGLU), tanh-GELU for Gemma 3."""
    return "gelu_tanh" if self.family == "gemma3" else "silu"

  @property
  def scale_embeddings(self) -> bool:
    """Whether the embeddings are multiplied by √d (Gemma 3)."""
    return self.family == "gemma3"

  @property
  def qk_norm(self) -> bool:
    """Whether queries and keys are RMS-normalized per head before RoPE (Gemma 3)."""
    return self.family == "gemma3"

  @property
  def output_norms(self) -> bool:
    """Whether the attention's and the MLP's outputs are RMS-normalized before the residual
    (Gemma 3)."""
    return self.family == "gemma3"

  @property
  def layer_weight_names(self) -> tuple[str, ...]:
    """The names of this architecture's layer weights."""
    return layer_weight_names(self.family)

  @property
  def layers_differ(self) -> bool:
    """Whether layers differ in their attention (window, RoPE base): then the per-layer
    functions need the layer's index."""
    return bool(self.sliding_layers)

  @property
  def local_rope(self) -> Rope:
    """The RoPE of the sliding-window layers (the others': `rope`)."""
    return self.rope if self.local_rope_base is None else Rope(self.local_rope_base)

  def layer_rope(self, index) -> "Rope | jax.Array":
    """Layer `index`'s RoPE: a static `Rope` for a Python int (or for every layer when they do
    not differ), its inverse frequencies (head_dim / 2,) for a traced index."""
    if not self.layers_differ:
      return self.rope
    ropes = [self.local_rope if i in self.sliding_layers else self.rope
             for i in range(self.num_layers)]
    if isinstance(index, int):
      self._check_index(index)
      return ropes[index]
    dtype = jnp.result_type(float)  # float64 where enabled (rounded to the queries' type)
    return jnp.stack([rope.inverse_frequencies(self.head_dim // 2, dtype)
                      for rope in ropes])[index]

  def layer_window(self, index) -> "int | jax.Array | None":
    """Layer `index`'s sliding window: None for a full-attention layer (or a model without
    windows), the window for a Python int, an int32 scalar for a traced index (`NO_WINDOW` for
    full attention)."""
    if not self.layers_differ:
      return None
    if isinstance(index, int):
      self._check_index(index)
      return self.sliding_window if index in self.sliding_layers else None
    table = np.full(self.num_layers, NO_WINDOW, np.int32)
    table[list(self.sliding_layers)] = self.sliding_window
    return jnp.asarray(table)[index]

  @property
  def rope(self) -> Rope:
    """The rotary embedding frequencies (static: hashable)."""
    return Rope(self.rope_base, self.rope_scaling)

  def _check_index(self, index: int) -> None:
    if not 0 <= index < self.num_layers:
      raise InputError(f"layer index must lie in [0, {self.num_layers}), got {index}")

  def weight_shapes(self) -> dict[str, tuple[int, ...]]:
    """Shape of every weight, layer weights stacked on a leading layer axis."""
    d, f, n = self.hidden_size, self.intermediate_size, self.num_layers
    q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    shapes = {
        "embed_tokens": (self.vocab_size, d), "norm": (d,),
        "input_layernorm": (n, d), "q_proj": (n, q, d), "k_proj": (n, kv, d),
        "v_proj": (n, kv, d), "o_proj": (n, d, q), "post_attention_layernorm": (n, d),
        "gate_proj": (n, f, d), "up_proj": (n, f, d), "down_proj": (n, d, f),
    }
    if self.family == "gemma3":
      shapes |= {"q_norm": (n, self.head_dim), "k_norm": (n, self.head_dim),
                 "attention_output_norm": (n, d), "mlp_output_norm": (n, d)}
    if not self.tie_embeddings:
      shapes["lm_head"] = (self.vocab_size, d)
    return shapes


def check_token_ids(name: str, tokens, vocab_size: int) -> None:
  """InputError unless every id of concrete `tokens` lies in [0, vocab_size): out of range, an
  embedding lookup would clamp or wrap around silently. Tracers pass unchecked."""
  if validation.is_traced(tokens) or np.size(tokens) == 0:
    return
  low, high = int(np.min(tokens)), int(np.max(tokens))
  if low < 0 or high >= vocab_size:
    raise InputError(f"{name} must be token ids in [0, {vocab_size}), got min {low} and max "
                     f"{high}")


def attention_input(hidden: Float[Array, "b t d"], layer: dict, config: LlamaConfig):
  """The post-RMSNorm input of a layer's attention (what q_proj and k_proj act on)."""
  return rms_norm(hidden, layer["input_layernorm"], config.rms_eps)


def layer_attention_args(layer: dict, config: LlamaConfig, index=None) -> dict:
  """The keyword arguments of `attention.layer_attention` for a layer: its head size, RoPE,
  window, query scale and (Gemma 3) QK-norm weights. `index` (a Python int, or a traced one
  inside a scan over layers) is needed where layers differ (`config.layers_differ`)."""
  if index is None and config.layers_differ:
    raise InputError("this model's layers differ in their attention: give the layer's index")
  args = {"head_dim": config.head_dim, "rope": config.layer_rope(index),
          "window": config.layer_window(index), "scale": config.query_scale}
  if config.qk_norm:
    args |= {"q_norm": layer["q_norm"], "k_norm": layer["k_norm"], "norm_eps": config.rms_eps}
  return args


def attention_output(attn_input: Float[Array, "b t d"], layer: dict, config: LlamaConfig,
                     index=None):
  """What the attention adds to the residual stream, from its post-RMSNorm input (`index`: see
  `layer_attention_args`).

  Returns:
    (output (b, t, d), attention (b, heads, t, t), mixed heads (b, t, heads·hd): o_proj's
    input).
  """
  b, t, _ = attn_input.shape
  kv, hd = config.num_kv_heads, config.head_dim
  probs = layer_attention(attn_input, layer["q_proj"], layer["k_proj"],
                          **layer_attention_args(layer, config, index))
  v = (attn_input @ layer["v_proj"].T).reshape(b, t, kv, hd)
  grouped = probs.reshape(b, kv, config.num_heads // kv, t, t)
  mixed = jnp.einsum("bkgqs,bske->bqkge", grouped, v).reshape(b, t, -1)
  output = mixed @ layer["o_proj"].T
  if config.output_norms:
    output = rms_norm(output, layer["attention_output_norm"], config.rms_eps)
  return output, probs, mixed


def attention_block(hidden: Float[Array, "b t d"], layer: dict, config: LlamaConfig,
                    index=None):
  """The attention half of a block (residual added).

  Returns:
    (hidden after it (b, t, d), attention input (b, t, d): q/k/v_proj's input, attention
    (b, heads, t, t), mixed heads (b, t, heads·hd): o_proj's input).
  """
  attn_input = attention_input(hidden, layer, config)
  output, probs, mixed = attention_output(attn_input, layer, config, index)
  return hidden + output, attn_input, probs, mixed


def mlp_input(hidden: Float[Array, "b t d"], layer: dict, config: LlamaConfig):
  """The post-RMSNorm input of a layer's MLP (what gate_proj and up_proj act on)."""
  return rms_norm(hidden, layer["post_attention_layernorm"], config.rms_eps)


def mlp_output(mlp_in: Float[Array, "b t d"], layer: dict, config: LlamaConfig):
  """What the gated MLP (SwiGLU, or Gemma's GeGLU) adds to the residual stream: (output
  (b, t, d), gated (b, t, f): down_proj's input)."""
  activation = ACTIVATIONS[config.activation]
  gated = activation(mlp_in @ layer["gate_proj"].T) * (mlp_in @ layer["up_proj"].T)
  output = gated @ layer["down_proj"].T
  if config.output_norms:
    output = rms_norm(output, layer["mlp_output_norm"], config.rms_eps)
  return output, gated


def mlp_block(hidden: Float[Array, "b t d"], layer: dict, config: LlamaConfig):
  """The MLP half of a block (residual added).

  Returns:
    (hidden after it (b, t, d), MLP input (b, t, d): gate/up_proj's input, gated (b, t, f):
    down_proj's input).
  """
  mlp_in = mlp_input(hidden, layer, config)
  output, gated = mlp_output(mlp_in, layer, config)
  return hidden + output, mlp_in, gated


def decoder_layer(hidden: Float[Array, "b t d"], layer: dict, config: LlamaConfig, index=None):
  """One decoder block on its own.

  Args:
    hidden: residual stream entering the block, (b, t, d).
    layer: this layer's weights by name (`config.layer_weight_names`, no layer axis), e.g. from
      `layer_weights(weights, i)`.
    config: the architecture.
    index: the layer's index, where layers differ (`layer_attention_args`).
  Returns:
    (hidden leaving the block (b, t, d), attention input (b, t, d), attention (b, heads, t, t)).
  """
  hidden, attn_input, probs, _ = attention_block(hidden, layer, config, index)
  hidden, _, _ = mlp_block(hidden, layer, config)
  return hidden, attn_input, probs


# The input each linear of a block acts on, by the names `linear_inputs` gives them.
LINEAR_INPUTS = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention",
                 "o_proj": "heads", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "gated"}


def linear_inputs(hidden: Float[Array, "b t d"], layer: dict, config: LlamaConfig,
                  index=None) -> dict:
  """What each linear of a block sees when the block runs on `hidden`: {"attention": (b, t, d),
  "heads": (b, t, heads·hd), "mlp": (b, t, d), "gated": (b, t, f)} (see `LINEAR_INPUTS`)."""
  hidden, attn_input, _, mixed = attention_block(hidden, layer, config, index)
  _, mlp_input, gated = mlp_block(hidden, layer, config)
  return {"attention": attn_input, "heads": mixed, "mlp": mlp_input, "gated": gated}


def layer_weights(weights: dict, index: int) -> dict:
  """Layer `index`'s weights by name, without the stacked layer axis."""
  return {name: weights[name][index] for name in LAYER_WEIGHTS if name in weights}


def embed(weights: dict, tokens: Int[Array, "b t"], config: LlamaConfig
          ) -> Float[Array, "b t d"]:
  """The residual stream entering layer 0: the tokens' embeddings (Gemma 3: times √d)."""
  hidden = weights["embed_tokens"][tokens]
  if config.scale_embeddings:  # √d rounded to the weights' type first, as Gemma does
    hidden = hidden * jnp.asarray(config.hidden_size**0.5, hidden.dtype)
  return hidden


@functools.partial(jax.jit, static_argnames=("config", "return_attention_inputs",
                                             "return_attention"))
def forward(weights: dict, tokens: Int[Array, "b t"], config: LlamaConfig, *,
            return_attention_inputs: bool = False, return_attention: bool = False):
  """Logits (b, t, vocab) and a dict with the requested per-layer captures.

  Captures: "attention_inputs" (layers, b, t, d), the post-RMSNorm input of each attention;
  "attention" (layers, b, heads, t, t), each layer's attention matrices.
  """
  hidden = embed(weights, tokens, config)

  def body(hidden, scanned):
    index, layer = scanned
    hidden, attn_input, probs = decoder_layer(hidden, layer, config, index)
    captured = {}
    if return_attention_inputs:
      captured["attention_inputs"] = attn_input
    if return_attention:
      captured["attention"] = probs
    return hidden, captured

  layers = {name: weights[name] for name in config.layer_weight_names}
  # The layers given (a caller may pass the first few only), each with its index.
  indices = jnp.arange(layers["q_proj"].shape[0])
  hidden, captures = jax.lax.scan(body, hidden, (indices, layers))
  head = weights["embed_tokens"] if config.tie_embeddings else weights["lm_head"]
  return rms_norm(hidden, weights["norm"], config.rms_eps) @ head.T, captures


class Llama(nnx.Module):
  """A Llama causal LM: `model(tokens (b, t) int32) -> logits (b, t, vocab) float32`.

  Attributes:
    config: its `LlamaConfig`.
    tokenizer: the tokenizer it came with (None for random test models).
  """

  def __init__(self, config: LlamaConfig, weights: dict, tokenizer=None):
    shapes = config.weight_shapes()
    if set(weights) != set(shapes):
      raise InputError(f"weights must have the keys {sorted(shapes)}, got {sorted(weights)}")
    for name, shape in shapes.items():
      if tuple(weights[name].shape) != shape:
        raise InputError(f"weights[{name!r}] must have shape {shape}, "
                         f"got {tuple(weights[name].shape)}")
    self.config = config
    self.tokenizer = tokenizer
    self.params = nnx.Dict({name: nnx.Param(jnp.asarray(weights[name])) for name in shapes})

  @classmethod
  def random(cls, config: LlamaConfig, key: jax.Array, *, scale: float = 0.2,
             dtype=jnp.float32) -> "Llama":
    """A model with normal random weights (norm weights near 1), for tests.

    The draws come from numpy's generator seeded with the key's data: a JAX sampler compiles
    anew for every weight shape (seconds each on CPU), and test models come in many shapes.
    """
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    weights = {}
    for name, shape in config.weight_shapes().items():
      noise = rng.standard_normal(shape)
      weights[name] = jnp.asarray(1.0 + 0.1 * noise if name.endswith("norm") else scale * noise,
                                  dtype)
    return cls(config, weights)

  def weights(self, replacements: dict | None = None) -> dict[str, jax.Array]:
    """The current weights as plain arrays, by name, with `replacements` (same names and
    shapes, so that jitted code is not re-traced) put in their place."""
    current = {name: param[...] for name, param in self.params.items()}
    for name, value in (replacements or {}).items():
      if name not in current or tuple(value.shape) != tuple(current[name].shape):
        raise InputError(f"weights[{name!r}] must replace an existing weight of the same shape")
      current[name] = value
    return current

  def __call__(self, tokens, *, weights: dict | None = None,
               return_attention_inputs: bool = False, return_attention: bool = False):
    """Logits for int tokens (b, t); with captures requested, (logits, captures dict).

    Args:
      tokens: (b, t) token ids in [0, vocab_size) (checked unless traced).
      weights: replacements for some weights by name (same shapes: no re-tracing), e.g.
        {"q_proj": (layers, heads·hd, d)}; the module's own weights are unchanged.
      return_attention_inputs / return_attention: per-layer captures, see `forward`.
    """
    if not validation.is_traced(tokens):
      try:
        tokens = np.asarray(tokens)  # range-checked before JAX may narrow int64 to int32
      except ValueError as err:  # a ragged nested list
        raise InputError(f"tokens must be a rectangular (batch, time) array: {err}") from err
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise InputError(f"tokens must be an integer array (batch, time), got "
                       f"{tokens.dtype} {tuple(tokens.shape)}")
    check_token_ids("tokens", tokens, self.config.vocab_size)
    logits, captures = forward(self.weights(weights), tokens, self.config,
                               return_attention_inputs=return_attention_inputs,
                               return_attention=return_attention)
    return (logits, captures) if (return_attention_inputs or return_attention) else logits
