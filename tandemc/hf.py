"""Reading Llama-family models in Hugging Face format (config.json + *.safetensors, sharded or not).

Hugging Face stores linear weights as [out, in]; tandemc stores [in, out], so they are transposed. Llama's
q/k projections are already laid out for the rotate-half RoPE convention tandemc uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tandemc import safetensors_io
from tandemc.config import DecoderConfig
from tandemc.errors import TandemcError
from tandemc.params import check_tensors, decoder_shapes, np_dtype, unflatten

ARCHITECTURES = ("LlamaForCausalLM",)
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "wq", "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv", "self_attn.o_proj.weight": "wo",
    "post_attention_layernorm.weight": "mlp_norm", "mlp.gate_proj.weight": "w_gate", "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_llama_config(directory: Path) -> DecoderConfig:
    file = directory / "config.json"
    if not file.is_file():
        raise TandemcError(f"{directory} has no config.json; expected a Hugging Face model directory")
    try:
        hf = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise TandemcError(f"{file} is not valid JSON: {e.msg}") from None
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "llama" and not set(archs) & set(ARCHITECTURES):
        raise TandemcError(f"{directory}: unsupported architecture {archs or hf.get('model_type')!r}; tandemc "
                           f"imports {', '.join(ARCHITECTURES)}")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise TandemcError(f"{directory}: '{flag}' is true; tandemc's Llama decoder has no biases")
    if hf.get("hidden_act", "silu") != "silu":
        raise TandemcError(f"{directory}: hidden_act {hf['hidden_act']!r} is unsupported; tandemc uses SwiGLU (silu)")
    rope_scaling = hf.get("rope_scaling")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
        raise TandemcError(f"{directory}: rope_scaling {rope_scaling!r} is unsupported")
    n_heads = hf["num_attention_heads"]
    rope_theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return DecoderConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads, d_ff=hf["intermediate_size"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads, rope_theta=float(rope_theta),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_seq_len=hf.get("max_position_embeddings", 2048))


def read_weights(directory: Path) -> dict[str, np.ndarray]:
    """All tensors of a model directory: `model.safetensors`, or the shards named by its index."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise TandemcError(f"{directory} has no model.safetensors or model.safetensors.index.json (pickled "
                           "PyTorch weights are never loaded; convert them to safetensors)")
    tensors = {}
    for shard in shards:
        if not (directory / shard).is_file():
            raise TandemcError(f"{directory}: shard {shard} named by the index is missing")
        tensors.update(safetensors_io.read(directory / shard))
    return tensors


def load_llama(directory: str | Path, dtype: str = "float32") -> tuple[DecoderConfig, dict]:
    """A Hugging Face Llama directory → (DecoderConfig, tandemc decoder parameter pytree)."""
    directory = Path(directory)
    cfg = read_llama_config(directory)
    cfg.validate(str(directory.name))
    tensors = read_weights(directory)
    target = np_dtype(dtype)
    flat = {}
    for name, array in tensors.items():
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        ours = _our_name(name)
        if ours is None:
            raise TandemcError(f"{directory}: unexpected tensor '{name}' in a Llama checkpoint")
        value = np.asarray(array, np.float32)
        if value.ndim == 2 and ours != "embed":
            value = value.T
        flat[ours] = np.ascontiguousarray(value).astype(target)
    if cfg.tie_embeddings:
        flat.pop("lm_head", None)
    check_tensors(decoder_shapes(cfg, ""), {n: (dtype, a.shape) for n, a in flat.items()}, dtype, str(directory))
    return cfg, unflatten(flat)


def _our_name(name: str) -> str | None:
    if name == "model.embed_tokens.weight":
        return "embed"
    if name == "model.norm.weight":
        return "final_norm"
    if name == "lm_head.weight":
        return "lm_head"
    if name.startswith("model.layers."):
        index, rest = name[len("model.layers."):].split(".", 1)
        if rest in _LAYER_NAMES:
            return f"layers.{int(index)}.{_LAYER_NAMES[rest]}"
    return None


def _special_token(directory: Path, hf_config: dict, key: str) -> str:
    """The name of a special token from tokenizer_config.json (or config.json's id via the tokenizer)."""
    tok_cfg = directory / "tokenizer_config.json"
    if tok_cfg.is_file():
        value = json.loads(tok_cfg.read_text()).get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return value
    token_id = hf_config.get(f"{key}_id")
    if isinstance(token_id, int) and (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(directory / "tokenizer.json")).id_to_token(token_id) or ""
    return ""


def import_tandem(primary_dir: str | Path, secondary_dir: str | Path, *, layer_map: tuple[int, ...] = (),
                  gamma_train: int = 2, dtype: str = "float32", seed: int = 0):
    """Two Hugging Face Llama models sharing a tokenizer → (TandemConfig, params, tokenizer.json path or None).

    The secondary also becomes the standalone drafter (the vanilla-SPEED baseline); the tandem projections are
    freshly initialised, ready for `tandemc train --stage tandem`.
    """
    from tandemc.config import TandemConfig, TokenizerConfig
    from tandemc.params import init_params

    primary_dir, secondary_dir = Path(primary_dir), Path(secondary_dir)
    primary_cfg, primary = load_llama(primary_dir, dtype)
    secondary_cfg, secondary = load_llama(secondary_dir, dtype)
    if primary_cfg.vocab_size != secondary_cfg.vocab_size:
        raise TandemcError(f"vocabularies differ: {primary_dir.name} has {primary_cfg.vocab_size} tokens, "
                           f"{secondary_dir.name} has {secondary_cfg.vocab_size}; a tandem needs one shared tokenizer")
    tokenizer_file = primary_dir / "tokenizer.json"
    other = secondary_dir / "tokenizer.json"
    if tokenizer_file.is_file() and other.is_file() and tokenizer_file.read_bytes() != other.read_bytes():
        raise TandemcError(f"{primary_dir.name} and {secondary_dir.name} ship different tokenizer.json files; a "
                           "tandem needs one shared tokenizer")
    if tokenizer_file.is_file():
        hf = json.loads((primary_dir / "config.json").read_text())
        tokenizer = TokenizerConfig(type="hf", file="tokenizer.json",
                                    bos_token=_special_token(primary_dir, hf, "bos_token"),
                                    eos_token=_special_token(primary_dir, hf, "eos_token"),
                                    pad_token=_special_token(primary_dir, hf, "pad_token"))
    else:
        tokenizer_file = None
        tokenizer = TokenizerConfig()
    cfg = TandemConfig(primary=primary_cfg, secondary=secondary_cfg, drafter=secondary_cfg, layer_map=layer_map,
                       gamma_train=gamma_train, tokenizer=tokenizer, dtype=dtype).validate()
    fresh = init_params(cfg, seed)
    params = {"primary": primary, "secondary": secondary, "drafter": secondary, "tandem": fresh["tandem"]}
    return cfg, params, tokenizer_file
