"""Numerical parity of tandemc's decoder with an independent implementation: Hugging Face transformers' Llama."""

import json

import jax
import numpy as np
import pytest

from tandemc import model
from tandemc.errors import TandemcError
from tandemc.hf import load_llama

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4  # max |Δlogits|, float32


def hf_llama(tmp_path, name, **overrides):
    kwargs = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=500.0,
                  tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(len(name))
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    with torch.no_grad():  # random norms so the gains are tested too
        for module in hf.modules():
            if isinstance(module, transformers.models.llama.modeling_llama.LlamaRMSNorm):
                module.weight.uniform_(0.5, 1.5)
    path = tmp_path / name
    hf.save_pretrained(path, safe_serialization=True, **({"max_shard_size": "50KB"} if "shard" in name else {}))
    return hf, path


@pytest.mark.parametrize("name, overrides", [
    ("gqa", {}),
    ("tied", {"tie_word_embeddings": True, "num_key_value_heads": 6}),
    ("head-dim", {"head_dim": 10, "num_attention_heads": 3, "num_key_value_heads": 1}),
    ("sharded", {}),
])
def test_logits_match_transformers(tmp_path, name, overrides):
    hf, path = hf_llama(tmp_path, name, **overrides)
    if name == "sharded":
        assert (path / "model.safetensors.index.json").is_file()
    cfg, params = load_llama(path)
    tokens = np.random.default_rng(0).integers(0, 97, (2, 40))
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.numpy()
    got, _ = jax.jit(model.forward, static_argnums=1)(params, cfg, tokens)
    err = float(np.max(np.abs(np.asarray(got) - expected)))
    print(f"{name}: max |Δlogits| = {err:.2e}")
    assert err <= TOL


def test_rejects_unsupported_models(tmp_path):
    _, path = hf_llama(tmp_path, "plain")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"],
                                                  "model_type": "gpt2"}))
    with pytest.raises(TandemcError, match="unsupported architecture"):
        load_llama(path)
    (path / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(TandemcError, match="'attention_bias' is true"):
        load_llama(path)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(TandemcError, match="pickled PyTorch weights are never loaded"):
        load_llama(path)
