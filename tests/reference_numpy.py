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


def keep_top_flat(score: np.ndarray, keep: int) -> np.ndarray:
  """Keeps the `keep` largest entries of the whole array, lower flat index first among ties."""
  order = np.argsort(-score.ravel(), kind="stable")
  out = np.zeros(score.size, bool)
  out[order[:keep]] = True
  return out.reshape(score.shape)


def sparsegpt(w, x, sparsity, *, n_m=None, blocksize=128, percdamp=0.01, dtype=np.float64):
  """A line-by-line numpy transcription of SparseGPT's published `fasterprune` loop.

  One change, the project's documented deviation: a block keeps exactly
  round_half_up((1 − s)·rows·count) entries (the reference prunes every entry at or below the
  value of rank int(s·rows·count)). Returns (new_w, keep) in `dtype`.
  """
  W = np.array(w, dtype)
  x = np.asarray(x, dtype).reshape(-1, W.shape[1])
  rows, columns = W.shape
  H = 2.0 / x.shape[0] * x.T @ x
  dead = np.diag(H) == 0
  H[dead, dead] = 1
  W[:, dead] = 0
  H[np.diag_indices(columns)] += percdamp * np.mean(np.diag(H))
  Hinv = np.linalg.cholesky(np.linalg.inv(H)).T.astype(dtype)
  pruned = np.zeros(W.shape, bool)
  for i1 in range(0, columns, blocksize):
    i2 = min(i1 + blocksize, columns)
    count = i2 - i1
    W1 = W[:, i1:i2].copy()
    Q1 = np.zeros_like(W1)
    Err1 = np.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    if n_m is None:
      tmp = W1**2 / np.diag(Hinv1).reshape(1, -1) ** 2
      keep = int(np.floor((1 - sparsity) * tmp.size + 0.5))
      mask1 = ~keep_top_flat(tmp, keep)
    else:
      prunen, prunem = n_m
      mask1 = np.zeros_like(W1, bool)
    for i in range(count):
      w_col = W1[:, i]
      d = Hinv1[i, i]
      if n_m is not None and i % prunem == 0:
        tmp = W1[:, i:i + prunem] ** 2 / np.diag(Hinv1)[i:i + prunem].reshape(1, -1) ** 2
        for r in range(rows):
          mask1[r, i:i + prunem] = ~keep_top_flat(tmp[r], prunem - prunen)
      q = w_col.copy()
      q[mask1[:, i]] = 0
      Q1[:, i] = q
      err1 = (w_col - q) / d
      W1[:, i:] -= np.outer(err1, Hinv1[i, i:])
      Err1[:, i] = err1
    W[:, i1:i2] = Q1
    W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    pruned[:, i1:i2] = mask1
  return W, ~pruned


def _rms_norm(x, weight, eps):
  return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * weight


def _rope(x, base):
  """Rotate-half RoPE of x (t, hd): pair channel i with channel i + hd/2, written with loops."""
  t, hd = x.shape
  half = hd // 2
  out = np.empty_like(x)
  for pos in range(t):
    for i in range(half):
      angle = pos * base ** (-i / half)
      c, s = np.cos(angle), np.sin(angle)
      out[pos, i] = x[pos, i] * c - x[pos, i + half] * s
      out[pos, i + half] = x[pos, i + half] * c + x[pos, i] * s
  return out


BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GEMMA3_LAYER_WEIGHTS = ("q_norm", "k_norm", "attention_output_norm", "mlp_output_norm")


def attention_half(x: np.ndarray, w: dict, config, layer: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """One sequence's attention from its post-RMSNorm input x (t, d), head by head with explicit
  GQA indexing (head j reads KV head j // (heads / kv_heads)): (output (t, d), attention
  (heads, t, t), mixed heads (t, heads·hd)); `w` one layer's weights by name. A Gemma 3 config
  (`family` "gemma3") adds QK-norm, a sliding window and RoPE base on `layer` if it is one of
  `sliding_layers`, its query scale and the output norm."""
  hd, heads, kv = config.head_dim, config.num_heads, config.num_kv_heads
  gemma = getattr(config, "family", "llama") == "gemma3"
  sliding = gemma and layer in config.sliding_layers
  base = config.local_rope_base if sliding else config.rope_base
  scale = 1 / np.sqrt(hd) if getattr(config, "query_scale", None) is None else config.query_scale
  t = x.shape[0]
  q_all, k_all, v_all = (x @ w[name].T for name in ("q_proj", "k_proj", "v_proj"))
  outs, probs = [], []
  for j in range(heads):
    g = j // (heads // kv)
    q, k = q_all[:, j * hd:(j + 1) * hd], k_all[:, g * hd:(g + 1) * hd]
    if gemma:
      q, k = _rms_norm(q, w["q_norm"], config.rms_eps), _rms_norm(k, w["k_norm"], config.rms_eps)
    q, k = _rope(q, base), _rope(k, base)
    v = v_all[:, g * hd:(g + 1) * hd]
    scores = q @ k.T * scale
    a = np.zeros((t, t))
    for i in range(t):
      first = max(0, i - config.sliding_window + 1) if sliding else 0
      row = scores[i, first:i + 1]
      e = np.exp(row - row.max())
      a[i, first:i + 1] = e / e.sum()
    probs.append(a)
    outs.append(a @ v)
  mixed = np.concatenate(outs, axis=-1)
  output = mixed @ w["o_proj"].T
  if gemma:
    output = _rms_norm(output, w["attention_output_norm"], config.rms_eps)
  return output, np.stack(probs), mixed


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def mlp_half(m: np.ndarray, w: dict, config=None) -> tuple[np.ndarray, np.ndarray]:
  """SwiGLU (Gemma 3: tanh-GELU GLU, then the output norm) of the post-RMSNorm input m (t, d):
  (output (t, d), gated (t, f))."""
  gemma = getattr(config, "family", "llama") == "gemma3"
  gate = m @ w["gate_proj"].T
  activated = _gelu_tanh(gate) if gemma else gate / (1 + np.exp(-gate))
  gated = activated * (m @ w["up_proj"].T)
  output = gated @ w["down_proj"].T
  if gemma:
    output = _rms_norm(output, w["mlp_output_norm"], config.rms_eps)
  return output, gated


def llama_forward(weights: dict, tokens: np.ndarray, config, *,
                  linear_inputs: list | None = None) -> tuple[np.ndarray, list, list]:
  """Logits (t, vocab) of one sequence, with each layer's attention input and attention
  matrices, in float64, head by head with explicit GQA indexing (head j reads KV head
  j // (heads / kv_heads)). A list given as `linear_inputs` receives, per layer, the input of
  each linear by weight name."""
  assert getattr(config, "rope_scaling", None) is None, "this reference has no RoPE scaling"
  w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
  h = w["embed_tokens"][np.asarray(tokens)]
  if getattr(config, "scale_embeddings", False):
    h = h * np.sqrt(config.hidden_size)
  inputs, attentions = [], []
  for layer in range(config.num_layers):
    x = _rms_norm(h, w["input_layernorm"][layer], config.rms_eps)
    inputs.append(x)
    this = {name: value[layer] for name, value in w.items()
            if name in BLOCK_LINEARS + GEMMA3_LAYER_WEIGHTS}
    output, probs, heads_out = attention_half(x, this, config, layer)
    attentions.append(probs)
    h = h + output
    m = _rms_norm(h, w["post_attention_layernorm"][layer], config.rms_eps)
    output, gated = mlp_half(m, this, config)
    h = h + output
    if linear_inputs is not None:
      linear_inputs.append({"q_proj": x, "k_proj": x, "v_proj": x, "o_proj": heads_out,
                            "gate_proj": m, "up_proj": m, "down_proj": gated})
  head = w["embed_tokens"] if config.tie_embeddings else w["lm_head"]
  return _rms_norm(h, w["norm"], config.rms_eps) @ head.T, inputs, attentions
