"""Hugging Face-style folders: round trips of tiny MHA/GQA/untied models and of the real
SmolLM2 (tokenizer, pruned q_proj), the exact tensor names, and the errors."""

import json
import re
import warnings

import jax
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import tokenizers
import tokenizers.processors

from attnprune_jax import cli, data, models
from attnprune_jax.attention import Llama3Scaling
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


def test_saved_real_model_with_pruned_q_proj_loads_with_the_same_logits(smollm2, smollm2_folder):
  folder, pruned = smollm2_folder
  loaded = models.load(folder)
  assert loaded.config == smollm2.config
  q = pruned["q_proj"]
  assert (np.asarray(loaded.weights()["q_proj"][0]) == 0).sum() >= q[0].size // 2
  tokens = np.array([[0] + loaded.tokenizer.encode(TEXT)])
  assert loaded.tokenizer.encode(TEXT) == smollm2.tokenizer.encode(TEXT)
  want = smollm2(tokens, weights=pruned)
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
    ({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}, "model_type 'qwen2'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     "rope_scaling has rope_type 'yarn'; supported: 'default'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling has rope_type 'linear'"),
    ({"rope_scaling": [1, 2]}, "rope_scaling must be an object or null"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}},
     r"rope_parameters of rope_type 'llama3' lacks \['low_freq_factor', 'high_freq_factor', "
     "'original_max_position_embeddings'\\]"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
                       "high_freq_factor": 1.0, "original_max_position_embeddings": 64}},
     "high_freq_factor must be > low_freq_factor"),
    ({"hidden_act": "gelu"}, "sets hidden_act to 'gelu'; only 'silu'"),
    ({"attention_bias": True}, "sets attention_bias to True; only False"),
    ({"mlp_bias": True}, "sets mlp_bias to True; only False"),
    ({"pretraining_tp": 2}, "sets pretraining_tp to 2; only 1"),
    ({"max_position_embeddings": 0}, "max_positions must be a positive integer"),
    ({"partial_rotary_factor": 0.5}, "sets partial_rotary_factor to 0.5; only 1.0"),
    ({"quantization_config": {"quant_method": "fp8"}}, "sets quantization_config to"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                          "partial_rotary_factor": 0.5}}, "partial_rotary_factor to 0.5"),
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


def test_rope_entries_are_read_as_transformers_reads_them(saved):
  """`rope_scaling` if not empty, else `rope_parameters`; θ inside the entry wins."""
  llama3 = {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
            "original_max_position_embeddings": 64, "rope_theta": 5e5}
  edit_config(saved, rope_scaling={}, rope_parameters=llama3, rope_theta=1e4)
  config = read_folder(saved)[0]
  assert config.rope_base == 5e5 and config.rope_scaling == Llama3Scaling(8.0, 1.0, 4.0, 64)
  edit_config(saved, rope_scaling={"type": "default"})
  assert read_folder(saved)[0].rope_scaling is None
  edit_config(saved, rope_scaling=None, rope_parameters={"rope_type": "default", "rope_theta": "x"})
  with pytest.raises(InputError, match="the RoPE entry's rope_theta must be a number"):
    read_folder(saved)


def test_quantized_tensors_are_refused_by_dtype(saved):
  tensors = safetensors.numpy.load_file(saved / "model.safetensors")
  name = "model.layers.0.mlp.up_proj.weight"
  tensors[name] = tensors[name].astype(np.int8)
  safetensors.numpy.save_file(tensors, saved / "model.safetensors")
  with pytest.raises(InputError, match=f"tensor '{name}' in model.safetensors has dtype I8"):
    read_folder(saved)


@pytest.fixture
def bos_folder(smollm2, tmp_path):
  """A tiny model whose tokenizer.json (SmolLM2's) has a Llama 3-style post-processor that puts
  BOS (here <|im_start|>, id 1) before every text, and config.json's BOS/EOS ids."""
  config = LlamaConfig(vocab_size=smollm2.tokenizer.vocab_size, hidden_size=8,
                       intermediate_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                       head_dim=4, rope_base=1e4, rms_eps=1e-5)
  write_folder(tmp_path / "m", config, random_model(config, 7).weights(), None)
  hf = tokenizers.Tokenizer.from_str(smollm2.tokenizer.to_json_str())
  hf.post_processor = tokenizers.processors.TemplateProcessing(
      single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
  (tmp_path / "m" / "tokenizer.json").write_text(hf.to_str())
  edit_config(tmp_path / "m", bos_token_id=1, eos_token_id=[2, 0])
  return tmp_path / "m"


def test_the_start_token_is_bos_where_the_checkpoint_adds_it(bos_folder):
  tokenizer = read_folder(bos_folder)[2]
  assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
  assert tokenizer.adds_bos and tokenizer.start_token == "<|im_start|>"
  windows = data.evaluation_windows(tokenizer, count=2, ctx=8)
  assert (windows[:, 0] == 1).all() and (windows[:, 1:] != 1).all()
  # tokenizer_config.json has the last word: no BOS added, so <|endoftext|> starts a window.
  (bos_folder / "tokenizer_config.json").write_text(json.dumps(
      {"bos_token": {"content": "<|endoftext|>"}, "add_bos_token": False}))
  tokenizer = read_folder(bos_folder)[2]
  assert (tokenizer.bos_token, tokenizer.adds_bos) == ("<|endoftext|>", False)
  assert (data.evaluation_windows(tokenizer, count=1, ctx=4)[:, 0] == 0).all()


@pytest.mark.parametrize("settings,config,message", [
    ({"add_bos_token": "false"}, {}, "add_bos_token must be true or false, got 'false'"),
    ({"bos_token": "<|nope|>"}, {},
     "tokenizer_config.json: bos_token must be a token of tokenizer.json, got '<|nope|>'"),
    ({}, {"eos_token_id": 10**6}, "config.json: eos_token_id: token id 1000000 is not in"),
    ({"add_bos_token": True}, {"bos_token_id": None}, "sets add_bos_token but names no bos"),
])
def test_bad_special_tokens_are_named(bos_folder, settings, config, message):
  (bos_folder / "tokenizer_config.json").write_text(json.dumps(settings))
  edit_config(bos_folder, **config)
  with pytest.raises(InputError, match=re.escape(message)):
    read_folder(bos_folder)


@pytest.mark.parametrize("changes,message", [
    ({"rope_theta": "10000"}, "rope_theta must be a number, got '10000'"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps must be a number, got '1e-5'"),
    ({"hidden_size": 2**30}, "has shape (24,), expected (1073741824,)"),
    ({"vocab_size": 2**31 - 1}, "model.embed_tokens.weight' has shape (64, 24), expected"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 1e308, "low_freq_factor": 1,
                       "high_freq_factor": 4, "original_max_position_embeddings": 64}},
     "factor must be at most 3.403e+38"),
])
def test_absurd_config_values_are_named_before_any_allocation(saved, changes, message):
  edit_config(saved, **changes)
  with pytest.raises(InputError, match=re.escape(message)):
    read_folder(saved)


@pytest.mark.parametrize("shard", ["../elsewhere/model.safetensors", "/tmp/model.safetensors",
                                   ""])
def test_index_shards_must_be_files_of_the_folder(saved, shard):
  (saved / "model.safetensors").rename(saved / "model-1.safetensors")
  with safetensors.safe_open(saved / "model-1.safetensors", framework="numpy") as handle:
    names = handle.keys()
  weight_map = dict.fromkeys(names, "model-1.safetensors") | {"model.norm.weight": shard}
  (saved / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  with pytest.raises(InputError, match="shards must be files of the folder itself"):
    read_folder(saved)
  weight_map["model.norm.weight"] = "model-1.safetensors"
  (saved / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  assert read_folder(saved)[0] == CONFIGS["gqa"]


def test_values_beyond_float32_are_refused_quietly(saved):
  tensors = safetensors.numpy.load_file(saved / "model.safetensors")
  name = "model.layers.1.mlp.down_proj.weight"
  tensors[name] = tensors[name].astype(np.float64)
  tensors[name][0, 0] = 1e300
  safetensors.numpy.save_file(tensors, saved / "model.safetensors")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    with pytest.raises(InputError, match=f"'{name}' in model.safetensors contains NaN or Inf "
                                         r"\(or values beyond float32\)"):
      read_folder(saved)


def test_unreadable_tokenizer_files_are_named(bos_folder):
  (bos_folder / "tokenizer.json").write_bytes(b"\xff\xfe\x80 not text")
  with pytest.raises(InputError, match="tokenizer.json: 'utf-8' codec can't decode"):
    read_folder(bos_folder)
  (bos_folder / "tokenizer.json").write_text("{}")
  with pytest.raises(InputError, match=r"m: tokenizer.json: text is not a valid tokenizer.json"):
    read_folder(bos_folder)


@pytest.mark.parametrize("index,message", [
    (-1, "token id -1 is not in the vocabulary"),
    (2**70, f"token id {2**70} is not in the vocabulary"),
    (True, "a token id must be an integer, got True"),
    ("2", "a token id must be an integer, got '2'")])
def test_bad_token_ids_in_the_config_are_named(bos_folder, index, message):
  edit_config(bos_folder, eos_token_id=index)
  with pytest.raises(InputError, match=re.escape(f"config.json: eos_token_id: {message}")):
    read_folder(bos_folder)


def test_commands_name_a_folder_without_a_tokenizer(saved, capsys):
  assert cli.main(["eval", "--model", str(saved), "--tokens", "64", "--ctx", "32", "--quiet"]) == 2
  assert "the model has no tokenizer (a checkpoint folder without tokenizer.json?)" in \
      capsys.readouterr().err
