"""Hugging Face-style folders: round trips of tiny MHA/GQA/untied models and of the real
SmolLM2 (tokenizer, pruned q_proj), the exact tensor names, and the errors."""

import json
import re

import jax
import numpy as np
import pytest
import safetensors
import safetensors.numpy

from attnprune_jax import models
from attnprune_jax.errors import InputError
from attnprune_jax.models.huggingface import read_folder, write_folder
from attnprune_jax.models.llama import Llama, LlamaConfig
from attnprune_jax.models.tokenizer import Tokenizer


def tiny_config(heads, kv_heads, *, tie=True, layers=2):
  return LlamaConfig(vocab_size=64, hidden_size=24, intermediate_size=40, num_layers=layers,
                     num_heads=heads, num_kv_heads=kv_heads, head_dim=8, rope_base=10000.0,
                     rms_eps=1e-5, tie_embeddings=tie)


CONFIGS = {"mha": tiny_config(3, 3), "gqa": tiny_config(4, 2),
           "gqa-untied": tiny_config(4, 2, tie=False, layers=3)}


def random_model(config: LlamaConfig, seed: int) -> Llama:
  """Float32 normal weights from numpy (`Llama.random` compiles a kernel per shape: slower)."""
  rng = np.random.default_rng(seed)
  return Llama(config, {name: rng.normal(size=shape).astype(np.float32)
                        for name, shape in config.weight_shapes().items()})


def expected_tensor_names(config: LlamaConfig) -> set[str]:
  names = {"model.embed_tokens.weight", "model.norm.weight"}
  if not config.tie_embeddings:
    names.add("lm_head.weight")
  for i in range(config.num_layers):
    names |= {f"model.layers.{i}.input_layernorm.weight",
              f"model.layers.{i}.post_attention_layernorm.weight"}
    names |= {f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
    names |= {f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
  return names


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tiny_models_round_trip(tmp_path, name):
  config = CONFIGS[name]
  model = random_model(config, 0)
  folder = tmp_path / "model"
  models.save(model, folder)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging folder left
  assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
  with safetensors.safe_open(folder / "model.safetensors", framework="np") as f:
    assert set(f.keys()) == expected_tensor_names(config)
    q = f.get_tensor("model.layers.1.self_attn.q_proj.weight")
    assert q.dtype == np.float32 and q.shape == (config.num_heads * 8, 24)
    np.testing.assert_array_equal(q, model.weights()["q_proj"][1])
  document = json.loads((folder / "config.json").read_text())
  assert document["architectures"] == ["LlamaForCausalLM"] and document["rope_scaling"] is None
  assert document["num_key_value_heads"] == config.num_kv_heads
  assert document["tie_word_embeddings"] == config.tie_embeddings

  loaded = models.load(folder)
  assert loaded.config == config and loaded.tokenizer is None
  want = model.weights()
  assert set(loaded.weights()) == set(want)
  for key, value in want.items():
    np.testing.assert_array_equal(loaded.weights()[key], value)
  tokens = np.random.default_rng(1).integers(0, 64, size=(2, 9))
  np.testing.assert_array_equal(loaded(tokens), model(tokens))


def test_head_dim_defaults_to_hidden_size_over_heads(tmp_path):
  model = random_model(CONFIGS["mha"], 1)
  models.save(model, tmp_path / "m")
  document = json.loads((tmp_path / "m" / "config.json").read_text())
  del document["head_dim"]
  (tmp_path / "m" / "config.json").write_text(json.dumps(document))
  assert read_folder(tmp_path / "m")[0] == CONFIGS["mha"]


def test_rope_theta_is_read_from_rope_parameters_too(tmp_path):
  models.save(random_model(CONFIGS["mha"], 1), tmp_path / "m")
  document = json.loads((tmp_path / "m" / "config.json").read_text())
  del document["rope_theta"]
  document["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
  (tmp_path / "m" / "config.json").write_text(json.dumps(document))
  assert read_folder(tmp_path / "m")[0].rope_base == 5e5


TEXT = "<|endoftext|>Emma<|im_start|>user 2024: naïve café 😀<|im_end|>\n"


def test_real_tokenizer_round_trips(smollm2):
  original = smollm2.tokenizer
  restored = Tokenizer.from_json_str(original.to_json_str())
  ids = original.encode(TEXT)
  assert ids[0] == 0 and restored.encode(TEXT) == ids
  assert restored.decode(ids) == TEXT
  assert restored.token_id("<|endoftext|>") == original.token_id("<|endoftext|>") == 0
  assert restored.special_tokens == original.special_tokens
  assert restored.vocab_size == original.vocab_size == 49152


def test_saved_real_model_with_pruned_q_proj_loads_with_the_same_logits(smollm2, tmp_path):
  q = np.asarray(smollm2.weights()["q_proj"])
  rng = np.random.default_rng(2)
  keep = rng.permutation(q[0].size) < q[0].size // 2
  pruned = q.copy()
  pruned[0] *= keep.reshape(q[0].shape)
  models.save(smollm2, tmp_path / "pruned", weights={"q_proj": pruned})
  loaded = models.load(tmp_path / "pruned")
  assert loaded.config == smollm2.config
  assert (np.asarray(loaded.weights()["q_proj"][0]) == 0).sum() >= q[0].size // 2
  tokens = np.array([[0] + loaded.tokenizer.encode(TEXT)])
  assert loaded.tokenizer.encode(TEXT) == smollm2.tokenizer.encode(TEXT)
  want = smollm2(tokens, weights={"q_proj": pruned})
  np.testing.assert_array_equal(loaded(tokens), want)
  assert not np.allclose(want, smollm2(tokens), atol=1e-3)


@pytest.fixture
def saved(tmp_path):
  """A folder holding a tiny GQA model."""
  model = random_model(CONFIGS["gqa"], 3)
  models.save(model, tmp_path / "m")
  return tmp_path / "m"


def edit_config(folder, **changes):
  document = json.loads((folder / "config.json").read_text()) | changes
  (folder / "config.json").write_text(json.dumps(document))


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_missing_files(saved, missing):
  (saved / missing).unlink()
  with pytest.raises(FileNotFoundError, match=f"folder .*m has no {missing}"):
    models.load(saved)


@pytest.mark.parametrize("changes,message", [
    ({"architectures": ["MistralForCausalLM"]}, "architectures.*Mistral"),
    ({"model_type": "gpt2"}, "model_type 'gpt2'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}},
     "rope_parameters .*'llama3'.*only rope_type 'default'"),
])
def test_unsupported_configs(saved, changes, message):
  edit_config(saved, **changes)
  with pytest.raises(ValueError, match=message):
    read_folder(saved)


def test_misshaped_and_missing_tensors(saved):
  tensors = safetensors.numpy.load_file(saved / "model.safetensors")
  name = "model.layers.1.self_attn.k_proj.weight"
  safetensors.numpy.save_file(tensors | {name: tensors[name][:8]}, saved / "model.safetensors")
  shapes = r"has shape \(8, 24\), expected \(16, 24\)"
  with pytest.raises(ValueError, match=f"tensor '{name}' {shapes}"):
    read_folder(saved)
  del tensors[name]
  safetensors.numpy.save_file(tensors, saved / "model.safetensors")
  with pytest.raises(ValueError, match=f"lacks the tensor '{name}'"):
    read_folder(saved)


def test_non_finite_tensors_are_refused(saved):
  tensors = safetensors.numpy.load_file(saved / "model.safetensors")
  name = "model.layers.0.self_attn.q_proj.weight"
  tensors[name][3, 4] = np.inf
  safetensors.numpy.save_file(tensors, saved / "model.safetensors")
  with pytest.raises(InputError, match=f"tensor '{name}' in model.safetensors contains NaN or Inf"):
    read_folder(saved)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
  config = CONFIGS["gqa"]
  tokens = [chr(c) for c in range(33, 33 + config.vocab_size + 1)]
  tokenizer = Tokenizer(tokens, [], [1] * len(tokens), model="gpt2", pre="smollm")
  weights = random_model(config, 6).weights()
  write_folder(tmp_path / "m", config, weights, tokenizer)
  with pytest.raises(InputError, match="tokenizer.json has 65 tokens, more than the vocab_size 64"):
    read_folder(tmp_path / "m")


def test_bad_weights_and_existing_folders_are_refused(saved, tmp_path):
  config = CONFIGS["gqa"]
  weights = {k: np.asarray(v) for k, v in random_model(config, 4).weights().items()}
  nan = weights["q_proj"].copy()
  nan[1, 2, 3] = np.nan
  with pytest.raises(ValueError, match=r"weights\['q_proj'\] contains NaN or Inf"):
    write_folder(tmp_path / "nan", config, weights | {"q_proj": nan}, None)
  with pytest.raises(ValueError, match=r"weights\['k_proj'\] must have shape \(2, 16, 24\)"):
    write_folder(tmp_path / "shape", config, weights | {"k_proj": weights["q_proj"]}, None)
  with pytest.raises(ValueError, match="weights must have the keys"):
    write_folder(tmp_path / "keys", config, weights | {"lm_head": weights["embed_tokens"]}, None)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
  with pytest.raises(FileExistsError, match="not an empty folder"):
    write_folder(saved, config, weights, None)
  (tmp_path / "empty").mkdir()
  write_folder(tmp_path / "empty", config, weights, None)
  assert read_folder(tmp_path / "empty")[0] == config


def test_a_failed_write_leaves_no_folder(tmp_path, monkeypatch):
  def crash(*args, **kwargs):
    raise OSError("disk full")
  monkeypatch.setattr(safetensors.numpy, "save_file", crash)
  with pytest.raises(OSError, match="disk full"):
    models.save(random_model(CONFIGS["mha"], 5), tmp_path / "m")
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change,message", [
    ({"hidden_size": "abc"}, "hidden_size must be an integer, got 'abc'"),
    ({"num_attention_heads": None}, "num_attention_heads must be an integer, got None"),
    ({"num_attention_heads": 0}, "num_heads must be a positive integer, got 0"),
    ({"hidden_size": 8.5}, "hidden_size must be an integer, got 8.5"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ({"rope_theta": -1}, "rope_base must be > 0"),
])
def test_malformed_config_values_are_named(tmp_path, change, message):
  folder = tmp_path / "model"
  models.save(Llama.random(CONFIGS["gqa"], jax.random.key(0)), folder)
  document = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps(document | change))
  with pytest.raises(InputError, match=re.escape(message)):
    models.load(folder)


def test_a_config_that_is_not_a_json_object_is_named(tmp_path):
  folder = tmp_path / "model"
  models.save(Llama.random(CONFIGS["gqa"], jax.random.key(0)), folder)
  (folder / "config.json").write_text("[1, 2]")
  with pytest.raises(InputError, match="must hold a JSON object, got list"):
    models.load(folder)
  (folder / "config.json").write_bytes(b"\xff\xfe")
  with pytest.raises(InputError, match="is not valid JSON"):
    models.load(folder)
