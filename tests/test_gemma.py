"""Gemma 3 as a variant of the Llama module: a tiny random Gemma against the independent numpy
forward (QK-norm, sliding windows with their own RoPE base, output norms, GeGLU, scaled
embeddings), GGUF files in llama.cpp's Gemma 3 layout and Hugging Face folders in
`Gemma3ForCausalLM`'s, the SentencePiece tokenizer's merges on a hand-worked vocabulary, and
what is refused. The real 270M model against transformers: test_gemma_reference.py."""

import dataclasses
import json
import re

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from attnprune_jax import models, objective, pipeline
from attnprune_jax.attention import layer_attention
from attnprune_jax.errors import InputError
from attnprune_jax.models import huggingface
from attnprune_jax.models.llama import Llama, layer_attention_args, layer_weights
from attnprune_jax.settings import TARGETS, PruneSettings
from attnprune_jax.solver_config import BlockSolverConfig, MaskSolverConfig
from attnprune_jax.models.tokenizer import Tokenizer, derived_merges
from conftest import TINY_GEMMA
import reference_numpy
from test_llama import add_architecture

TOKENS = np.random.default_rng(1).integers(0, 64, size=(2, 9))


@pytest.mark.parametrize("dtype,tol", [(jnp.float64, 1e-10), (jnp.float32, 1e-5)])
def test_matches_numpy_forward(dtype, tol, request):
  if dtype == jnp.float64:
    request.getfixturevalue("x64")
  model = Llama.random(TINY_GEMMA, jax.random.key(0), scale=0.3, dtype=dtype)
  logits, captures = model(TOKENS, return_attention=True)
  for b in range(2):
    want, _, attentions = reference_numpy.llama_forward(model.weights(), TOKENS[b], TINY_GEMMA)
    np.testing.assert_allclose(logits[b], want, atol=tol * np.abs(want).max(), rtol=0)
    for layer in range(TINY_GEMMA.num_layers):
      np.testing.assert_allclose(captures["attention"][layer, b], attentions[layer],
                                 atol=tol * 10, rtol=0)
  # The window acts: a sliding layer's row 8 sees tokens 6..8 only, the full layer's all 9.
  probs = np.asarray(captures["attention"])
  assert (probs[0, :, :, 8, :6] == 0).all() and (probs[0, :, :, 8, 6:] > 0).all()
  assert (probs[2, :, :, 8, :] > 0).all()


@pytest.mark.parametrize("change", [
    {"sliding_layers": (), "sliding_window": None, "local_rope_base": None},
    {"local_rope_base": 1e6}, {"query_scale": None},
    {"family": "llama", "sliding_layers": (), "sliding_window": None, "local_rope_base": None,
     "query_scale": None}])
def test_each_gemma_setting_changes_the_logits(change):
  # Each setting the numpy reference honours is one the model honours: none is a no-op here.
  model = Llama.random(TINY_GEMMA, jax.random.key(0), scale=0.3)
  config = dataclasses.replace(TINY_GEMMA, **change)
  other = Llama(config, {n: v for n, v in model.weights().items()
                         if n in config.weight_shapes()})
  assert np.abs(np.asarray(other(TOKENS)) - np.asarray(model(TOKENS))).max() > 1e-3


def test_per_layer_functions_need_the_index_where_layers_differ():
  layer = {name: value[0] for name, value in Llama.random(
      TINY_GEMMA, jax.random.key(0)).weights().items() if name in TINY_GEMMA.layer_weight_names}
  with pytest.raises(InputError, match="give the layer's index"):
    layer_attention_args(layer, TINY_GEMMA)
  assert layer_attention_args(layer, TINY_GEMMA, 1)["window"] == 3
  assert layer_attention_args(layer, TINY_GEMMA, 2)["window"] is None
  assert layer_attention_args(layer, TINY_GEMMA, 0)["rope"].base == 10.0


@pytest.mark.parametrize("change,message", [
    ({"family": "gemma2"}, "family must be one of"),
    ({"sliding_layers": (0, 3)}, r"sliding_layers must be distinct layer indices in \[0, 3\)"),
    ({"sliding_window": None}, "sliding_layers and sliding_window go together"),
    ({"sliding_layers": 3}, "sliding_layers must be distinct layer indices"),
    ({"sliding_layers": (), "sliding_window": None}, "local_rope_base needs sliding_layers"),
    ({"query_scale": -1.0}, "query_scale"),
    ({"family": "llama"}, "Gemma 3's settings; a Llama"),
])
def test_bad_gemma_configs_are_named(change, message):
  with pytest.raises(InputError, match=message):
    dataclasses.replace(TINY_GEMMA, **change)


def test_derived_merges_on_a_hand_worked_vocabulary():
  # Listed best-first: "ab" (rank 3) before "bc" (4); "abc" splits as a+bc and ab+c, both
  # ranked by "abc" (5), the longer left piece first.
  tokens = ["a", "b", "c", "ab", "bc", "abc"]
  assert derived_merges(tokens) == [("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]


def test_sentencepiece_tokenizer_round_trips_and_keeps_user_tokens_whole():
  tokens = (["<pad>", "<eos>", "<bos>", "<unk>", "\n\n", "  "] +
            [f"<0x{b:02X}>" for b in range(256)] + ["▁", "a", "b", "ab", "▁ab", "ü"])
  types = [3, 3, 3, 2, 4, 1] + [6] * 256 + [1] * 6
  tokenizer = Tokenizer.gemma(tokens, types, unk_token="<unk>")
  ids = tokenizer.encode(" ab\n\nab  ab é")
  assert tokenizer.decode(ids) == " ab\n\nab  ab é"
  assert tokens.index("▁ab") in ids and tokens.index("\n\n") in ids  # merged, matched whole
  assert tokenizer.token_id("▁▁") == 5  # a token of spaces is looked up as "▁"s
  assert [tokenizer.id_to_token(i) for i in tokenizer.encode("é")] == ["<0xC3>", "<0xA9>"]


GEMMA_TOKENS = (["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)] +
                ["▁", "a", "b", "▁a"])


def write_tiny_gemma_gguf(path, model: Llama, *, fields=None):
  """A GGUF file of a Gemma 3 `model` in llama.cpp's layout (no q/k permutation, norms stored
  as their factor), tensor names from gguf's own map; `fields` extra (key, value) pairs."""
  config, weights = model.config, {k: np.asarray(v) for k, v in model.weights().items()}
  to_gguf = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, config.num_layers)
  writer = gguf.GGUFWriter(str(path), "gemma3")
  add_architecture(writer, config)
  writer.add_sliding_window(config.sliding_window)
  writer.add_tokenizer_model("llama")
  writer.add_tokenizer_pre("default")
  tokens = GEMMA_TOKENS + [f"<unused{i}>" for i in range(config.vocab_size - len(GEMMA_TOKENS))]
  writer.add_token_list(tokens)
  writer.add_token_types([3, 3, 3, 2] + [6] * 256 + [1] * 4 + [3] * (len(tokens) - 264))
  writer.add_bos_token_id(2)
  writer.add_eos_token_id(1)
  writer.add_unk_token_id(3)
  writer.add_add_bos_token(True)
  for key, value in (fields or {}).items():
    (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)
  for name, value in weights.items():
    for layer in range(config.num_layers) if name in config.layer_weight_names else [None]:
      hf_name = huggingface.tensor_name(name, layer, "gemma3")
      writer.add_tensor(to_gguf.get_name(hf_name, try_suffixes=(".weight",)),
                        np.ascontiguousarray(value if layer is None else value[layer]))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


# What the GGUF reader sets for any Gemma 3 file (llama.cpp's and transformers' defaults).
GGUF_GEMMA = dataclasses.replace(TINY_GEMMA, vocab_size=len(GEMMA_TOKENS) + 4, num_layers=7,
                                 query_scale=None, local_rope_base=1e4,
                                 sliding_layers=(0, 1, 2, 3, 4, 6))


def test_gemma_gguf_round_trips(tmp_path):
  model = Llama.random(GGUF_GEMMA, jax.random.key(3), scale=0.3)
  write_tiny_gemma_gguf(tmp_path / "g.gguf", model)
  loaded = models.load(tmp_path / "g.gguf")
  assert dataclasses.replace(loaded.config, rms_eps=1e-6) == GGUF_GEMMA
  for name, value in model.weights().items():
    np.testing.assert_array_equal(loaded.weights()[name], value, err_msg=name)
  tokenizer = loaded.tokenizer
  assert (tokenizer.start_token, tokenizer.adds_bos) == ("<bos>", True)
  assert tokenizer.encode(" a b") == [GEMMA_TOKENS.index("▁a"), 260, GEMMA_TOKENS.index("b")]


@pytest.mark.parametrize("fields,message", [
    ({"gemma3.attn_logit_softcapping": 50.0}, r"soft-caps its logits \(gemma3\.attn_logit"),
    ({"gemma3.final_logit_softcapping": 30.0}, "soft-caps its logits"),
    ({"gemma3.attention.sliding_window_pattern": 4},
     "sliding-window pattern 4; only full attention on every 6th layer"),
])
def test_gemma_ggufs_with_what_we_do_not_compute_are_refused(tmp_path, fields, message):
  write_tiny_gemma_gguf(tmp_path / "g.gguf", Llama.random(GGUF_GEMMA, jax.random.key(3)),
                        fields=fields)
  with pytest.raises(InputError, match=message):
    models.load(tmp_path / "g.gguf")


def test_gemma_folder_round_trips_with_norms_stored_as_offsets(tmp_path):
  model = Llama.random(TINY_GEMMA, jax.random.key(4), scale=0.3)
  models.save(model, tmp_path / "g")
  document = json.loads((tmp_path / "g" / "config.json").read_text())
  assert (document["model_type"], document["layer_types"]) == (
      "gemma3_text", ["sliding_attention", "sliding_attention", "full_attention"])
  assert document["query_pre_attn_scalar"] == pytest.approx(0.3**-2)
  stored = safetensors.numpy.load_file(tmp_path / "g" / "model.safetensors")
  # Gemma's checkpoints hold w for the factor 1 + w; ours is the factor.
  np.testing.assert_allclose(stored["model.layers.2.pre_feedforward_layernorm.weight"] + 1,
                             model.weights()["post_attention_layernorm"][2], rtol=1e-6)
  np.testing.assert_allclose(stored["model.layers.0.self_attn.k_norm.weight"] + 1,
                             model.weights()["k_norm"][0], rtol=1e-6)
  loaded = models.load(tmp_path / "g")
  assert loaded.config == dataclasses.replace(TINY_GEMMA, query_scale=loaded.config.query_scale)
  assert loaded.config.query_scale == pytest.approx(0.3)
  np.testing.assert_allclose(loaded(TOKENS), model(TOKENS), rtol=0, atol=1e-5)


@pytest.mark.parametrize("change,message", [
    ({"final_logit_softcapping": 30.0}, "sets final_logit_softcapping to 30.0"),
    ({"hidden_activation": "gelu"}, "sets hidden_activation to 'gelu'"),
    ({"query_pre_attn_scalar": 0}, "query_pre_attn_scalar must be > 0"),
    ({"rope_parameters": {"rope_theta": 1e4}}, "rope_parameters must map"),
    ({"layer_types": ["sliding_attention"]}, "layer_types must list"),
    ({"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0}}},
     r"rope_parameters\['full_attention'\] .*only the default RoPE"),
])
def test_gemma_folders_with_what_we_do_not_compute_are_refused(tmp_path, change, message):
  models.save(Llama.random(TINY_GEMMA, jax.random.key(4)), tmp_path / "g")
  path = tmp_path / "g" / "config.json"
  path.write_text(json.dumps(json.loads(path.read_text()) | change))
  with pytest.raises(InputError, match=message):
    models.load(tmp_path / "g")


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("layer", [0, 2], ids=["sliding", "full"])
def test_factored_loss_with_qk_norm_and_window_matches_numpy(layer):
  # One KV group (kv_heads = 1): the loss of random masks against the dense attention, by the
  # numpy forward's head-by-head attention, and its row-blocked form.
  model = Llama.random(TINY_GEMMA, jax.random.key(2), scale=0.3, dtype=jnp.float64)
  weights = layer_weights(model.weights(), layer)
  x = np.random.default_rng(3).normal(size=(2, 9, TINY_GEMMA.hidden_size))
  rng = np.random.default_rng(4)
  masks = {n: 1 + 0.5 * rng.normal(size=weights[n].shape) for n in ("q_proj", "k_proj")}
  args = layer_attention_args(weights, TINY_GEMMA, layer)
  numpy_weights = {n: np.asarray(v) for n, v in weights.items()}
  pruned = numpy_weights | {n: masks[n] * numpy_weights[n] for n in masks}
  want = sum(0.5 * np.sum((reference_numpy.attention_half(x[b], pruned, TINY_GEMMA, layer)[1] -
                           reference_numpy.attention_half(x[b], numpy_weights, TINY_GEMMA,
                                                          layer)[1])**2) for b in range(2))
  want += 0.5 * 0.01 * sum(np.sum(m**2) for m in masks.values())
  target = layer_attention(x, weights["q_proj"], weights["k_proj"], **args)
  got = objective.factored_loss(masks, weights["q_proj"], weights["k_proj"], x, target, 0.01,
                                **args)
  blocked = objective.blocked_factored_loss(masks, weights["q_proj"], weights["k_proj"], x, 0.01,
                                            block=4, **args)
  np.testing.assert_allclose([got, blocked], [want, want], rtol=1e-10)


SMALL_SOLVER = MaskSolverConfig(steps=3, rounds=2, steps_per_round=3, reweight_steps=2,
                                windows_per_step=1)


SMALL_BLOCK = BlockSolverConfig(rounds=2, steps_per_round=3, reweight_steps=2,
                                windows_per_step=1)


@pytest.mark.parametrize("method,targets,solver", [
    ("attn-progressive", "qk", SMALL_SOLVER), ("attn-reweight", "qk", SMALL_SOLVER),
    ("wanda", "all", None), ("attn-block", "all", SMALL_BLOCK),
    ("attn-block-reweight", "attention", SMALL_BLOCK)])
def test_every_kind_of_method_prunes_a_gemma_at_exact_counts(method, targets, solver):
  # Every layer, sliding and full: the solvers run the layer's own window and RoPE.
  model = Llama.random(TINY_GEMMA, jax.random.key(0), scale=0.5)
  rng = np.random.default_rng(0)
  calibration, heldout = rng.integers(0, 64, (2, 12)), rng.integers(0, 64, (2, 12))
  settings = PruneSettings(method, 0.5, None, None, solver, targets=targets)
  result = pipeline.prune_model(model, settings, calibration, heldout)
  for name in TARGETS[targets]:
    zero = np.asarray(result.weights[name]) == 0
    assert (zero.sum(-1) == zero.shape[-1] // 2).all(), name
  errors = [r["attention_error"] for r in result.layers]
  assert all(np.isfinite(errors)) and min(errors) > 0


@pytest.mark.parametrize("targets", ["qk", "all"])
def test_the_pipeline_prunes_on_the_inputs_of_the_numpy_forward(targets):
  """Wanda on the last layer only, against Wanda on the numpy forward's inputs of that layer:
  the pipeline's residual stream must be the model's (√d-scaled embeddings included; seen: a
  pipeline that skipped the scale pruned every layer past the first on wrong inputs)."""
  model = Llama.random(TINY_GEMMA, jax.random.key(5), scale=0.5)
  calibration = np.random.default_rng(5).integers(0, 64, (3, 12))
  last = TINY_GEMMA.num_layers - 1
  settings = PruneSettings("wanda", 0.5, None, (last,), targets=targets)
  pruned = pipeline.prune_model(model, settings, calibration, calibration[:1]).weights
  weights = {k: np.asarray(v, np.float64) for k, v in model.weights().items()}
  inputs = []
  for window in calibration:
    per_window = []
    reference_numpy.llama_forward(weights, window, TINY_GEMMA, linear_inputs=per_window)
    inputs.append(per_window[last])
  for name in TARGETS[targets]:
    x = np.concatenate([window[name] for window in inputs])
    score = np.abs(weights[name][last]) * np.linalg.norm(x, axis=0)
    keep = reference_numpy.binarize_rows(score, score.shape[1] // 2)
    np.testing.assert_array_equal(np.asarray(pruned[name][last]) != 0, keep, err_msg=name)


def test_convergence_refuses_a_qk_norm_model_by_name(tmp_path, capsys):
  from attnprune_jax import cli
  models.save(Llama.random(TINY_GEMMA, jax.random.key(4)), tmp_path / "g")
  argv = ["convergence", "--model", str(tmp_path / "g"), "--out", str(tmp_path / "out")]
  assert cli.main(argv) == 2
  error = capsys.readouterr().err.strip()
  assert len(error.splitlines()) == 1 and re.search("convergence does not apply to .*QK-norm",
                                                    error), error
