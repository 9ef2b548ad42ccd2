"""Llama-family models in Hugging Face format (config.json + *.safetensors, sharded or not), both ways.

Hugging Face stores linear weights as [out, in]; tandemc stores [in, out], so they are transposed. Llama's
q/k projections are already laid out for the rotate-half RoPE convention tandemc uses. Reading builds tandems
from pretrained models (`tandemc import-hf`); writing lets users run a tandemc model in the tools they know
(`tandemc export-hf`: transformers, ONNX Runtime GenAI's model builder).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from tandemc import safetensors_io
from tandemc.config import DecoderConfig
from tandemc.errors import TandemcError
from tandemc.model import shared_head_matrix
from tandemc.params import check_tensors, decoder_shapes, flatten, np_dtype, unflatten

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


def _hf_name(ours: str) -> str:
    """The inverse of `_our_name`."""
    fixed = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}
    if ours in fixed:
        return fixed[ours]
    _, index, leaf = ours.split(".")
    return f"model.layers.{index}.{_HF_LAYER_NAMES[leaf]}"


_HF_LAYER_NAMES = {ours: theirs for theirs, ours in _LAYER_NAMES.items()}


def save_llama(directory: Path, cfg: DecoderConfig, params: dict, special_ids: dict[str, int]) -> None:
    """Write one tandemc decoder as a Hugging Face LlamaForCausalLM (config.json + model.safetensors)."""
    tensors = {}
    for ours, value in flatten(params).items():
        value = np.asarray(value)
        tensors[_hf_name(ours)] = np.ascontiguousarray(value.T if value.ndim == 2 and ours != "embed" else value)
    dtype = safetensors_io.dtype_name(tensors["model.embed_tokens.weight"])
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_seq_len, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": dtype,
        **{f"{key}_id": value for key, value in special_ids.items() if value >= 0},
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps(
        {f"{key}_id": value for key, value in special_ids.items() if value >= 0}, indent=2) + "\n")
    safetensors_io.write(directory / "model.safetensors", tensors, {"format": "pt"})


def byte_tokenizer_json() -> dict:
    """tandemc's byte tokenizer as a `tokenizer.json`: byte-level BPE without merges, token i = byte i.

    The byte-to-character table is GPT-2's (printable bytes map to themselves, the rest to U+0100 onwards), which
    every `tokenizer.json` reader implements for ByteLevel pre-tokenization.
    """
    from tandemc.tokenizer import ByteTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    vocab = {chars[b]: b for b in range(256)}
    tok = ByteTokenizer()
    special = [("<bos>", tok.bos_id), ("<eos>", tok.eos_id), ("<pad>", tok.pad_id)]
    vocab.update({name: token_id for name, token_id in special})
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": token_id, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for name, token_id in special],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": []},
    }


def plain_drafter(ckpt) -> tuple[DecoderConfig, dict]:
    """The standalone drafter as a plain Llama over the primary's whole vocabulary, for runtimes that pair a model
    with a draft model of the same tokenizer (transformers' assisted generation, llama.cpp's speculative decoding).

    What a draft vocabulary or the primary's shared table (config.draft_vocab, config.shared_embeddings) factor is
    materialised: each token's embedding is the one the drafter reads, and the LM head scores every draft token as
    the drafter does. A Llama head has no bias, so the tokens outside the draft vocabulary, which tandemc never
    proposes, score exactly 0: a runtime proposes one only where every draft token scores below 0."""
    cfg, p = ckpt.config, dict(ckpt.params["drafter"])
    vocab, table = ckpt.params.get("draft_vocab"), np.asarray(ckpt.params["primary"]["embed"], np.float32)
    if vocab is None and "embed_proj" not in p:
        return cfg.drafter, p
    if "embed_proj" in p:
        embed = table @ np.asarray(p.pop("embed_proj"), np.float32)
        head = shared_head_matrix(ckpt.params, "drafter")
        head = head if vocab is None else head[:, :-1]  # less the `other` column: those tokens score 0 below
        p.pop("head_proj"), p.pop("other", None)
    else:
        embed = np.asarray(p["embed"], np.float32)[vocab["index"]]
        head = np.asarray(p["embed"] if cfg.drafter.tie_embeddings else p["lm_head"].T, np.float32)[:-1].T
    if vocab is not None:
        full = np.zeros((head.shape[0], table.shape[0]), np.float32)
        full[:, vocab["tokens"]] = head
        head = full
    dtype = np.asarray(ckpt.params["primary"]["embed"]).dtype
    p.update(embed=embed.astype(dtype), lm_head=head.astype(dtype))
    return dataclasses.replace(cfg.drafter, vocab_size=table.shape[0], tie_embeddings=False), p


def standalone_model(ckpt, model_name: str) -> tuple[DecoderConfig, dict]:
    """The config and parameters of a tandem's model that stands alone as a Llama: the primary, or the drafter
    (`plain_drafter`). The tandem secondary reads the primary's representations and has no such form."""
    if model_name not in ("primary", "drafter"):
        raise TandemcError(f"--model must be 'primary' or 'drafter', got {model_name!r} (the tandem secondary "
                           "reads the primary's representations and has no standalone Llama form)")
    if model_name == "drafter" and ckpt.config.drafter is None:
        raise TandemcError("this checkpoint has no standalone drafter; export --model primary")
    return (ckpt.config.primary, ckpt.params["primary"]) if model_name == "primary" else plain_drafter(ckpt)


def export_llama(ckpt, model_name: str, out: str | Path, force: bool = False) -> Path:
    """One model of a tandem checkpoint (`primary` or `drafter`) as a Hugging Face Llama directory.

    The tandem secondary is not a standalone model (its attention reads the primary's representations), so it
    cannot be written in this format; the drafter is the secondary-sized model that can.
    """
    from tandemc.atomic import atomic_directory

    cfg, params = standalone_model(ckpt, model_name)
    tok = ckpt.tokenizer
    special = {"bos_token": tok.bos_id, "eos_token": tok.eos_id, "pad_token": tok.pad_id}
    with atomic_directory(out, force, sources=(ckpt.path,)) as tmp:
        save_llama(tmp, cfg, params, special)
        if ckpt.config.tokenizer.type == "hf":
            (tmp / "tokenizer.json").write_bytes((Path(ckpt.path) / ckpt.config.tokenizer.file).read_bytes())
            names = {"bos_token": ckpt.config.tokenizer.bos_token, "eos_token": ckpt.config.tokenizer.eos_token,
                     "pad_token": ckpt.config.tokenizer.pad_token}
        else:
            (tmp / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json(), ensure_ascii=False) + "\n")
            names = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
        (tmp / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False,
             **{key: value for key, value in names.items() if value}}, indent=2) + "\n")
    return Path(out)


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
