"""Llama-architecture GGUF files (llama.cpp's format) as tandemc decoders, read with the `gguf` package.

Every tensor type the `gguf` package dequantizes is read as float32. llama.cpp's converter permutes the rows of
attn_q and attn_k (per head, from rotate-half pairs (i, i + d/2) to interleaved pairs (2i, 2i + 1)) for its RoPE
kernel; `unpermute_rows` undoes that, giving back the rotate-half layout tandemc and Hugging Face use. GGUF
matrices are [out, in] like Hugging Face's; tandemc stores [in, out]. The byte-level BPE tokenizer in the metadata
becomes a Hugging Face `tokenizer.json` whose pre-tokenizer reproduces llama.cpp's for the file's `pre` type.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from tandemc.config import DecoderConfig
from tandemc.errors import TandemcError
from tandemc.params import check_tensors, decoder_shapes, np_dtype, unflatten

_LAYER_NAMES = {
    "attn_norm": "attn_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv", "attn_output": "wo",
    "ffn_norm": "mlp_norm", "ffn_gate": "w_gate", "ffn_up": "w_up", "ffn_down": "w_down",
}
_GLOBAL_NAMES = {"token_embd": "embed", "output_norm": "final_norm", "output": "lm_head"}

# GPT-2's pre-tokenizer regex, which `ByteLevel(use_regex=True)` applies; llama.cpp's pre types that use it.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's token types (llama_token_type): 3 control, 4 user-defined.
_CONTROL, _USER_DEFINED = 3, 4


@dataclass
class GGUFModel:
    config: DecoderConfig
    params: dict  # tandemc decoder pytree
    tokenizer_json: dict
    bos_token: str  # "" where the file says not to add a BOS (tokenizer.ggml.add_bos_token false)
    eos_token: str
    pad_token: str
    chat_template: str
    name: str
    export_passes: str = ""


def _reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise TandemcError("reading GGUF files needs the 'gguf' package (pip install 'tandemc[gguf]')") from None
    if not path.is_file():
        raise TandemcError(f"GGUF file {path} does not exist")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, KeyError, IndexError... on bad files
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TandemcError(f"{path.name} is not a readable GGUF file ({detail}); check that the download "
                           "completed") from None


def _field(reader, key: str, default=None, *, required: bool = True):
    field = reader.fields.get(key)
    if field is None:
        if required and default is None:
            raise TandemcError(f"GGUF metadata key '{key}' is missing")
        return default
    try:
        return field.contents()
    except Exception:
        raise TandemcError(f"GGUF metadata key '{key}' is unreadable") from None


def read_config(reader, path: Path) -> DecoderConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise TandemcError(f"{path.name}: architecture {arch!r} is unsupported; tandemc imports Llama-architecture "
                           "GGUF files")
    if f"{arch}.rope.scaling.type" in reader.fields and _field(reader, f"{arch}.rope.scaling.type") not in ("none",):
        raise TandemcError(f"{path.name}: RoPE scaling {_field(reader, f'{arch}.rope.scaling.type')!r} is unsupported")
    d_model = int(_field(reader, "llama.embedding_length"))
    n_heads = int(_field(reader, "llama.attention.head_count"))
    head_dim = int(_field(reader, "llama.attention.key_length", d_model // max(n_heads, 1), required=False))
    rot = int(_field(reader, "llama.rope.dimension_count", head_dim, required=False))
    if rot != head_dim:
        raise TandemcError(f"{path.name}: RoPE over {rot} of {head_dim} head dimensions is unsupported")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(_field(reader, "llama.vocab_size", len(tokens.data) if tokens else None))
    names = {t.name for t in reader.tensors}
    return DecoderConfig(
        vocab_size=vocab, d_model=d_model, n_layers=int(_field(reader, "llama.block_count")), n_heads=n_heads,
        n_kv_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads, required=False)),
        d_ff=int(_field(reader, "llama.feed_forward_length")), head_dim=head_dim,
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0, required=False)),
        norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5, required=False)),
        tie_embeddings="output.weight" not in names,
        max_seq_len=int(_field(reader, "llama.context_length", 2048, required=False)))


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: [out, in] rows per head from (d/2, 2) back to (2, d/2) order."""
    out, cols = w.shape
    return w.reshape(n_heads, out // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(out, cols)


def _our_name(name: str) -> str | None:
    if not name.endswith(".weight"):
        return None
    stem = name[:-len(".weight")]
    if stem in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[stem]
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}"
    return None


def _gguf_name(ours: str) -> str:
    """The inverse of `_our_name`."""
    if ours in _OUR_GLOBAL_NAMES:
        return f"{_OUR_GLOBAL_NAMES[ours]}.weight"
    _, index, leaf = ours.split(".")
    return f"blk.{index}.{_OUR_LAYER_NAMES[leaf]}.weight"


_OUR_GLOBAL_NAMES = {ours: theirs for theirs, ours in _GLOBAL_NAMES.items()}
_OUR_LAYER_NAMES = {ours: theirs for theirs, ours in _LAYER_NAMES.items()}


def dequantized(tensor, path: Path) -> np.ndarray:
    """A GGUF tensor as float32 in numpy (row-major, [out, in] for matrices) order."""
    import gguf

    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise TandemcError(f"{path.name}: tensor '{tensor.name}' has type {tensor.tensor_type.name}, which the gguf "
                           "package cannot dequantize") from None
    values = np.asarray(values, np.float32)
    if values.size != int(np.prod(shape)):
        raise TandemcError(f"{path.name}: tensor '{tensor.name}' holds {values.size} values, its header says "
                           f"{list(shape)}")
    return values.reshape(shape)


def read_weights(reader, cfg: DecoderConfig, path: Path, dtype: str) -> dict:
    target = np_dtype(dtype)
    flat = {}
    for tensor in reader.tensors:
        ours = _our_name(tensor.name)
        if ours is None:
            raise TandemcError(f"{path.name}: unexpected tensor '{tensor.name}' in a Llama GGUF file")
        value = dequantized(tensor, path)
        if ours.endswith(".wq"):
            value = unpermute_rows(value, cfg.n_heads)
        elif ours.endswith(".wk"):
            value = unpermute_rows(value, cfg.n_kv_heads)
        if value.ndim == 2 and ours != "embed":
            value = value.T
        flat[ours] = np.ascontiguousarray(value).astype(target)
    check_tensors(decoder_shapes(cfg, ""), {n: (dtype, a.shape) for n, a in flat.items()}, dtype, path.name)
    return unflatten(flat)


def _strings(reader, key: str) -> list[str]:
    field = reader.fields[key]
    return [bytes(field.parts[i]).decode("utf-8", errors="surrogateescape") for i in field.data]


def tokenizer_json(reader, path: Path) -> dict:
    """The file's byte-level BPE tokenizer as a Hugging Face `tokenizer.json` (vocab, merges, pre-tokenizer,
    special tokens), tokenizing as llama.cpp does for the file's `tokenizer.ggml.pre`."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise TandemcError(f"{path.name}: tokenizer model {model!r} is unsupported; tandemc reads byte-level BPE "
                           "('gpt2') GGUF tokenizers")
    pre = _field(reader, "tokenizer.ggml.pre", "default", required=False)
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre in ("default", "gpt-2"):
        pre_tokenizer = byte_level
    elif pre in _DIGITS_THEN_GPT2:
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    elif pre == "llama-bpe":
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
            {**byte_level, "use_regex": False}]}
    else:
        raise TandemcError(f"{path.name}: pre-tokenizer {pre!r} is unsupported; tandemc knows "
                           f"{', '.join(('default', 'gpt-2', 'llama-bpe') + _DIGITS_THEN_GPT2)}")
    tokens = _strings(reader, "tokenizer.ggml.tokens")
    merges = _strings(reader, "tokenizer.ggml.merges")
    types = [int(t) for t in _field(reader, "tokenizer.ggml.token_type", [1] * len(tokens), required=False)]
    added = [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] == _CONTROL}
             for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": pre_tokenizer, "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {token: i for i, token in enumerate(tokens)}, "merges": merges},
    }


def _special(reader, tokens: list[str], key: str) -> str:
    token_id = _field(reader, f"tokenizer.ggml.{key}_token_id", -1, required=False)
    return tokens[int(token_id)] if 0 <= int(token_id) < len(tokens) else ""


# GGUF block types whose integers tandemc's quantization passes reproduce exactly from the dequantized weights,
# where every block spans its type's integer range as llama.cpp's reference quantizers make it: the pass that does,
# and how to read a block's integers (block bytes → [blocks, 32] ints) to check the span.
_KEEPABLE = {
    "Q4_1": ("quantize_int4:scheme=asymmetric:block=32", 20,
             lambda b: np.concatenate([b[:, 4:] & 15, b[:, 4:] >> 4], axis=1), (0, 15)),
    "Q8_0": ("quantize_int8:block=32", 34, lambda b: np.abs(b[:, 2:].copy().view(np.int8).astype(np.int16)),
             (None, 127)),
}
_FLOAT_TYPES = ("F32", "F16", "BF16")


def kept_quantization_passes(reader, path: Path) -> str:
    """The export passes that give an artifact the file's own integers and block scales (import-gguf
    --keep-quantized): one for the layer matrices, one for the LM head (the token table when tied), each with int8
    activations as llama.cpp computes Q4_1 and Q8_0 dot products. Refused with the reason where a type has no exact
    counterpart, the layer matrices mix types, or a block does not span its integer range (the re-quantization
    would then not give back its integers)."""
    layer_types, head_type = set(), None
    for tensor in reader.tensors:
        ours, kind = _our_name(tensor.name), tensor.tensor_type.name
        if ours is None or ours in ("final_norm",) or ours.endswith("norm"):
            continue
        if kind not in _KEEPABLE and kind not in _FLOAT_TYPES:
            raise TandemcError(f"{path.name}: tensor '{tensor.name}' is {kind}; --keep-quantized keeps "
                               f"{', '.join(_KEEPABLE)} (and float) tensors only: import without it")
        if kind in _KEEPABLE:
            _, block_bytes, integers, (low, high) = _KEEPABLE[kind]
            q = integers(np.asarray(tensor.data, np.uint8).reshape(-1, block_bytes))
            if (low is not None and np.any(q.min(axis=1) != low)) or np.any(q.max(axis=1) != high):
                raise TandemcError(f"{path.name}: tensor '{tensor.name}' has {kind} blocks that do not span "
                                   "their integer range, so re-quantizing would not give back its integers: "
                                   "import without --keep-quantized")
        if ours in ("embed", "lm_head"):
            head_type = kind if ours == "lm_head" or head_type is None else head_type
        else:
            layer_types.add(kind)
    if len(layer_types) > 1:
        raise TandemcError(f"{path.name}: the layer matrices mix {', '.join(sorted(layer_types))}; "
                           "--keep-quantized needs one type for all of them: import without it")
    passes = ["O1"]
    if layer_types and (kind := layer_types.pop()) in _KEEPABLE:
        passes.append(f"{_KEEPABLE[kind][0]}:models=primary:activations=int8")
    if head_type in _KEEPABLE:
        passes.append(f"{_KEEPABLE[head_type][0]}:models=primary:keep=embed:activations=int8")
    return ",".join(passes)


def load_gguf(path: str | Path, dtype: str = "float32", keep_quantized: bool = False) -> GGUFModel:
    """A Llama GGUF file → config, float parameters, tokenizer.json, special tokens and chat template; with
    `keep_quantized`, the export passes that keep its integers."""
    path = Path(path)
    reader = _reader(path)
    export_passes = kept_quantization_passes(reader, path) if keep_quantized else ""
    cfg = read_config(reader, path)
    cfg.validate(path.name)
    tok = tokenizer_json(reader, path)
    tokens = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
    if len(tokens) != cfg.vocab_size:
        raise TandemcError(f"{path.name}: the tokenizer has {len(tokens)} tokens, the model {cfg.vocab_size}")
    params = read_weights(reader, cfg, path, dtype)
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", True, required=False))
    return GGUFModel(cfg, params, tok, bos_token=_special(reader, tokens, "bos") if add_bos else "",
                     eos_token=_special(reader, tokens, "eos"), pad_token=_special(reader, tokens, "padding"),
                     chat_template=str(_field(reader, "tokenizer.chat_template", "", required=False)),
                     name=str(_field(reader, "general.name", path.stem, required=False)),
                     export_passes=export_passes)


def import_gguf(path: str | Path, *, secondary: dict | None = None, layer_map: tuple[int, ...] = (),
                gamma_train: int = 2, dtype: str = "float32", seed: int = 0, keep_quantized: bool = False,
                draft_vocab: int = 0, draft_data: str = "stdlib", drafter: bool = False,
                shared_embeddings: bool = False):
    """A GGUF primary plus a freshly initialised tandem secondary → (TandemConfig, params, tokenizer.json bytes).

    The secondary is `default_secondary` with the DecoderConfig fields in `secondary` replaced; it and its tandem
    projections start random, ready for `tandemc train --stage tandem`; primary mode decodes and exports the
    imported model as it is. The file is parsed once (the gguf package's reader takes ~4 s on SmolLM2-135M).
    `keep_quantized`: the config's export_passes become `kept_quantization_passes`. `draft_vocab` N > 0: the
    drafters propose only the N most frequent tokens of `draft_data`'s training split (data.load_corpus) in the
    imported tokenizer. `drafter`: add a standalone drafter shaped like the secondary (the vanilla-SPEED baseline).
    `shared_embeddings`: the drafters read and write tokens through the primary's table (config.shared_embeddings).
    """
    from tandemc.config import TandemConfig, TokenizerConfig
    from tandemc.params import draft_vocab as draft_vocab_tensors, init_params

    if keep_quantized and dtype != "float32":
        raise TandemcError("--keep-quantized quantizes from float32 weights; drop --dtype or --keep-quantized")
    model = load_gguf(path, dtype, keep_quantized)
    primary = model.config
    tokenizer = TokenizerConfig(type="hf", file="tokenizer.json", bos_token=model.bos_token,
                                eos_token=model.eos_token, pad_token=model.pad_token,
                                chat_template=model.chat_template)
    data = (json.dumps(model.tokenizer_json, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
    drafts = {"vocab_size": draft_vocab + 1} if draft_vocab else {}
    secondary = replace(default_secondary(primary), **drafts, **(secondary or {}))
    cfg = TandemConfig(primary=primary, secondary=secondary, layer_map=layer_map, gamma_train=gamma_train,
                       tokenizer=tokenizer, dtype=dtype, export_passes=model.export_passes, draft_vocab=draft_vocab,
                       shared_embeddings=shared_embeddings, drafter=secondary if drafter else None).validate()
    params = {"primary": model.params, **init_params(cfg, seed, only="secondary."),
              **init_params(cfg, seed + 1, only="tandem."),
              **(init_params(cfg, seed + 2, only="drafter.") if drafter else {})}
    if draft_vocab:
        params["draft_vocab"] = draft_vocab_tensors(_frequent_tokens(data, tokenizer, draft_data, draft_vocab),
                                                    primary.vocab_size)
    return cfg, params, data


def _frequent_tokens(tokenizer_json: bytes, tokenizer_cfg, source: str, count: int):
    """The `count` most frequent tokens of `source`'s training split in this tokenizer."""
    import tempfile

    from tandemc.data import load_corpus, most_frequent_tokens
    from tandemc.tokenizer import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / tokenizer_cfg.file).write_bytes(tokenizer_json)
        tokenizer = load_tokenizer(tokenizer_cfg, Path(tmp))
    return most_frequent_tokens(load_corpus(source, tokenizer).train, count)


def default_secondary(primary: DecoderConfig) -> DecoderConfig:
    """The secondary `import-gguf` adds when none is given: 2 layers, width 128, 2 query heads and 1 KV head of 64,
    d_ff 384, the primary's vocabulary, RoPE and context; a few per cent of SmolLM2-135M's per-token cost, before
    its embedding and LM head."""
    return DecoderConfig(vocab_size=primary.vocab_size, d_model=128, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=384,
                         head_dim=64, rope_theta=primary.rope_theta, norm_eps=primary.norm_eps, tie_embeddings=True,
                         max_seq_len=primary.max_seq_len)


def permute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's Q/K row permutation (the inverse of `unpermute_rows`): rotate-half pairs to interleaved ones."""
    out, cols = w.shape
    return w.reshape(n_heads, 2, out // n_heads // 2, cols).swapaxes(1, 2).reshape(out, cols)


def write_gguf(ckpt, model_name: str, out: str | Path, tokenizer_from: str | Path) -> Path:
    """One model of a tandem checkpoint (`primary`, or the standalone `drafter` as a plain Llama: hf.plain_drafter)
    as a float32 Llama GGUF file, with the tokenizer metadata of the GGUF file the primary came from, so that
    llama.cpp pairs the two (its speculative decoding requires the draft model's vocabulary to be the target's)."""
    import gguf

    from tandemc.atomic import atomic_file
    from tandemc.hf import standalone_model
    from tandemc.params import flatten

    cfg, params = standalone_model(ckpt, model_name)
    reader = _reader(Path(tokenizer_from))
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else 0
    if vocab != cfg.vocab_size:
        raise TandemcError(f"{Path(tokenizer_from).name} has a tokenizer of {vocab} tokens, the {model_name} "
                           f"{cfg.vocab_size}; give the GGUF file this checkpoint's primary came from")
    permuted_heads = {"wq": cfg.n_heads, "wk": cfg.n_kv_heads}  # llama.cpp's RoPE layout (permute_rows)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(f"{model_name} of {ckpt.path.name if ckpt.path else 'a tandem'} (tandemc)")
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.d_model)
        writer.add_block_count(cfg.n_layers)
        writer.add_feed_forward_length(cfg.d_ff)
        writer.add_head_count(cfg.n_heads)
        writer.add_head_count_kv(cfg.n_kv_heads)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32)
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                value = field.contents()
                sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(key, value, field.types[0], sub_type=sub)
        for name, value in flatten(params).items():
            value = np.asarray(value, np.float32)
            if value.ndim == 2 and name != "embed":
                value = value.T  # tandemc [in, out] → GGUF [out, in]
            leaf = name.rsplit(".", 1)[-1]
            if leaf in permuted_heads:
                value = permute_rows(value, permuted_heads[leaf])
            writer.add_tensor(_gguf_name(name), np.ascontiguousarray(value))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(out)
