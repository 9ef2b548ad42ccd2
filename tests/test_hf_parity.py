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


@pytest.mark.slow
def test_import_hf_builds_a_tandem_that_reproduces_both_models(tmp_path):
    from click.testing import CliRunner
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tandemc.checkpoint import load_checkpoint
    from tandemc.cli import cli
    from tandemc.decoding import generate

    big, big_path = hf_llama(tmp_path, "big", num_hidden_layers=4)
    small, small_path = hf_llama(tmp_path, "small", hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=1, intermediate_size=40)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w2"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    for path in (big_path, small_path):
        tok.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w1", "eos_token": "w0"}))
    out = tmp_path / "tandem"
    result = CliRunner().invoke(cli, ["import-hf", "--primary", str(big_path), "--secondary", str(small_path),
                                      "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    ckpt = load_checkpoint(out)
    assert ckpt.config.layer_map == (3,) and ckpt.tokenizer.eos_id == 0 and ckpt.tokenizer.bos_id == 1
    tokens = np.random.default_rng(1).integers(0, 97, (1, 12))
    forward = jax.jit(model.forward, static_argnums=1)
    with torch.no_grad():
        for name, hf in (("primary", big), ("drafter", small)):
            got, _ = forward(ckpt.params[name], getattr(ckpt.config, name), tokens)
            assert float(np.max(np.abs(np.asarray(got) - hf(torch.tensor(tokens)).logits.numpy()))) <= TOL
    # The imported pair decodes; greedy SPEED reproduces the primary.
    params = jax.tree.map(jax.numpy.asarray, ckpt.params)
    prompt = [ckpt.tokenizer.encode("w5 w9 w11")]
    assert (generate(params, ckpt.config, prompt, mode="speed", block_length=3, max_new_tokens=10).tokens ==
            generate(params, ckpt.config, prompt, mode="primary", max_new_tokens=10).tokens)


def test_import_hf_rejects_mismatched_vocabularies(tmp_path):
    from tandemc.hf import import_tandem

    _, a = hf_llama(tmp_path, "a")
    _, b = hf_llama(tmp_path, "b", vocab_size=98)
    with pytest.raises(TandemcError, match="vocabularies differ: a has 97 tokens, b has 98"):
        import_tandem(a, b)


@pytest.mark.parametrize("model_name", ["primary", "drafter"])
def test_export_hf_writes_a_llama_that_transformers_runs_identically(tmp_path, model_name):
    """`tandemc export-hf` is import-hf's inverse: transformers reproduces tandemc's logits, import gives back the
    same tensors, and the byte tokenizer's tokenizer.json encodes and decodes exactly as tandemc does."""
    from click.testing import CliRunner
    from tokenizers import Tokenizer

    from tandemc.checkpoint import save_checkpoint
    from tandemc.cli import cli
    from tandemc.config import preset
    from tandemc.params import flatten, init_params
    from tandemc.tokenizer import ByteTokenizer

    cfg = preset("tiny").validate()
    ckpt_path = save_checkpoint(tmp_path / "ckpt", cfg, init_params(cfg, 3))
    out = tmp_path / "hf"
    result = CliRunner().invoke(cli, ["export-hf", str(ckpt_path), "--model", model_name, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    params = init_params(cfg, 3)[model_name]
    model_cfg = getattr(cfg, model_name)
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    tokens = np.random.default_rng(2).integers(0, model_cfg.vocab_size, (2, 20))
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.numpy()
    got, _ = jax.jit(model.forward, static_argnums=1)(params, model_cfg, tokens)
    assert float(np.max(np.abs(np.asarray(got) - expected))) <= TOL
    back_cfg, back = load_llama(out)
    assert back_cfg == model_cfg
    assert all(np.array_equal(a, flatten(back)[n]) for n, a in flatten(params).items())
    text = 'def f(x):\n\treturn "héllo" ✓ \x00\x7f'
    tok, byte_tok = Tokenizer.from_file(str(out / "tokenizer.json")), ByteTokenizer()
    assert tok.encode(text).ids == byte_tok.encode(text, add_bos=False)
    assert tok.decode(byte_tok.encode(text)) == text
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == byte_tok.eos_id


def test_export_hf_refuses_the_tandem_secondary(tmp_path):
    from click.testing import CliRunner

    from tandemc.cli import cli

    result = CliRunner().invoke(cli, ["export-hf", str(tmp_path), "--model", "secondary", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "secondary" in result.output


@pytest.mark.parametrize("shared", [False, True])
def test_export_hf_materialises_a_factored_drafter_as_a_plain_llama(tmp_path, shared):
    """A drafter over a draft vocabulary (own tables, or the primary's table through projections) becomes a Llama
    over the primary's whole vocabulary: transformers scores every draft token as tandemc's drafter does and every
    other token 0, so its greedy drafts are tandemc's wherever a draft token scores above 0."""
    from conftest import decoder

    from tandemc.checkpoint import load_checkpoint, save_checkpoint
    from tandemc.config import TandemConfig
    from tandemc.hf import export_llama
    from tandemc.params import init_params

    small = decoder(41, 16, 2, 2, 1, 8, tie=not shared)
    cfg = TandemConfig(decoder(259, 32, 2, 4, 2, 8, tie=True), small, drafter=small, draft_vocab=40,
                       shared_embeddings=shared).validate()
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "ckpt", cfg, init_params(cfg, 5)))
    export_llama(ckpt, "drafter", tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tokens = np.random.default_rng(4).integers(0, 259, (2, 12))
    with torch.no_grad():
        theirs = hf(torch.tensor(tokens)).logits.numpy()
    ours = np.asarray(model.drafter_forward(jax.tree.map(jax.numpy.asarray, ckpt.params), cfg, "drafter", tokens)[0])
    draft_tokens = np.asarray(ckpt.params["draft_vocab"]["tokens"])
    assert theirs.shape[-1] == 259
    assert float(np.max(np.abs(theirs[..., draft_tokens] - ours[..., :-1]))) <= TOL
    assert np.all(np.delete(theirs, draft_tokens, axis=-1) == 0.0)
