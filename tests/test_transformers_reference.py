"""Hugging Face checkpoints against `transformers`' own `LlamaForCausalLM` (CPU, float32, eager
attention): tiny random checkpoints written by transformers (MHA, GQA, tied and untied, llama3
RoPE scaling, a sharded index, bfloat16 and float16 tensors) load with its logits, and folders we
write (the real SmolLM2, a pruned model) load in transformers with ours."""

import dataclasses
import json

import numpy as np
import pytest

from attnprune_jax import models
from attnprune_jax.attention import Llama3Scaling

pytestmark = pytest.mark.reference
# torch and transformers are imported inside the functions that use them: importing them takes
# about 10 s, which every test worker would pay while collecting, even when this tier is left out.

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def reference_model(*, heads=4, kv_heads=2, tie=False, rope_scaling=None, seed=0):
  """A tiny random `LlamaForCausalLM` whose every weight (norms included) is drawn afresh, large
  enough that attention is far from uniform. head_dim 8, θ = 1e4: with LLAMA3's 64 original
  positions the 4 RoPE frequencies fall in all three regimes (kept, interpolated, divided)."""
  import torch
  import transformers
  config = transformers.LlamaConfig(
      vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8,
      max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tie,
      rope_theta=1e4, rope_scaling=None if rope_scaling is None else dict(rope_scaling),
      bos_token_id=1, eos_token_id=2, attn_implementation="eager")
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      param.copy_(1 + 0.1 * torch.randn_like(param) if "norm" in name
                  else 0.3 * torch.randn_like(param))
  return model


def reference_logits(model, tokens: np.ndarray) -> np.ndarray:
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.float().numpy()


TOKENS = np.random.default_rng(0).integers(0, 96, size=(2, 40))


@pytest.mark.parametrize("name,options,save", [
    ("mha-untied", dict(heads=4, kv_heads=4), {}),
    ("gqa-tied", dict(tie=True), {}),
    ("gqa-llama3", dict(rope_scaling=LLAMA3), {}),
    ("gqa-llama3-sharded", dict(rope_scaling=LLAMA3, tie=True), {"max_shard_size": "20KB"}),
])
def test_transformers_checkpoints_load_with_their_logits(tmp_path, name, options, save):
  reference = reference_model(**options)
  reference.save_pretrained(tmp_path / name, **save)
  files = {path.name for path in (tmp_path / name).iterdir()}
  assert ("model.safetensors.index.json" in files) == bool(save)
  model = models.load(tmp_path / name)
  assert model.config.tie_embeddings == options.get("tie", False)
  assert model.config.num_kv_heads == options.get("kv_heads", 2)
  assert model.config.max_positions == 256
  if "rope_scaling" in options:
    assert model.config.rope_scaling == Llama3Scaling(8.0, 1.0, 4.0, 64)
  want = reference_logits(reference, TOKENS)
  np.testing.assert_allclose(np.asarray(model(TOKENS)), want, rtol=1e-4, atol=1e-4)


def test_llama3_scaling_changes_the_logits(tmp_path):
  """The scaled frequencies matter at these positions: the same weights without them (ours and
  transformers') give other logits, so the agreement above is not by accident."""
  scaled = reference_model(rope_scaling=LLAMA3)
  scaled.save_pretrained(tmp_path / "scaled")
  ours = models.load(tmp_path / "scaled")
  plain = models.Llama(dataclasses.replace(ours.config, rope_scaling=None), ours.weights())
  want = reference_logits(scaled, TOKENS)
  assert not np.allclose(np.asarray(plain(TOKENS)), want, atol=1e-2)
  assert not np.allclose(reference_logits(reference_model(), TOKENS), want, atol=1e-2)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_tensors_are_read_exactly(tmp_path, dtype):
  import torch
  import transformers
  reference = reference_model(rope_scaling=LLAMA3).to(getattr(torch, dtype))
  reference.save_pretrained(tmp_path / "half")
  document = json.loads((tmp_path / "half" / "config.json").read_text())
  assert document["dtype" if "dtype" in document else "torch_dtype"] == dtype
  model = models.load(tmp_path / "half")
  assert model.weights()["q_proj"].dtype == np.float32
  upcast = transformers.LlamaForCausalLM.from_pretrained(
      tmp_path / "half", dtype=torch.float32, attn_implementation="eager").eval()
  np.testing.assert_array_equal(np.asarray(model.weights()["q_proj"][1]),
                                upcast.model.layers[1].self_attn.q_proj.weight.detach().numpy())
  np.testing.assert_allclose(np.asarray(model(TOKENS)), reference_logits(upcast, TOKENS),
                             rtol=1e-4, atol=1e-4)


def test_our_folders_load_in_transformers(tmp_path):
  """A tiny llama3-scaled model written by `models.save`, sharded: transformers reads it with
  the same logits, and its config says the same RoPE scaling."""
  import transformers
  reference = reference_model(rope_scaling=LLAMA3, tie=True)
  reference.save_pretrained(tmp_path / "theirs")
  ours = models.load(tmp_path / "theirs")
  models.huggingface.write_folder(tmp_path / "ours", ours.config, ours.weights(), None,
                                  shard_bytes=20_000)
  assert (tmp_path / "ours" / "model.safetensors.index.json").is_file()
  loaded = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "ours", attn_implementation="eager").eval()
  assert loaded.config.rope_parameters["rope_type"] == "llama3"
  np.testing.assert_allclose(reference_logits(loaded, TOKENS), reference_logits(reference, TOKENS),
                             rtol=1e-5, atol=1e-5)
  assert models.load(tmp_path / "ours").config == ours.config


def test_smollm2_exported_loads_back_identically_and_in_transformers(smollm2, smollm2_folder):
  import transformers
  folder, pruned = smollm2_folder
  loaded = models.load(folder)
  assert loaded.config == smollm2.config
  tokenizer = loaded.tokenizer
  assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.adds_bos) == (
      smollm2.tokenizer.bos_token, smollm2.tokenizer.eos_token, False) == (
      "<|im_start|>", "<|im_end|>", False)
  assert tokenizer.start_token == smollm2.tokenizer.start_token == "<|endoftext|>"
  text = "It is a truth universally acknowledged, that a single man in possession"
  tokens = np.array([[tokenizer.token_id(tokenizer.start_token)] + tokenizer.encode(text)])
  ours = np.asarray(loaded(tokens))
  np.testing.assert_array_equal(ours, np.asarray(smollm2(tokens, weights=pruned)))
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      folder, attn_implementation="eager").eval()
  want = reference_logits(reference, tokens)
  np.testing.assert_allclose(ours, want, rtol=1e-3, atol=2e-3)
  assert (ours.argmax(-1) == want.argmax(-1)).all()
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text)
  assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
