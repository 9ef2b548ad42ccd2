"""Model configuration: the schema-versioned `config.json` of a tandem checkpoint.

Configs are frozen dataclasses so they can be static arguments of `jax.jit`. Parsing is strict: an unknown
field, a missing field or a wrongly typed value is an error that names the field (`primary.n_heads`).
"""

from __future__ import annotations

import dataclasses
import math
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from tandemc.errors import TandemcError

SCHEMA_VERSION = 1
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class DecoderConfig:
    """A Llama-style decoder: RMSNorm, rotary embeddings, SwiGLU MLP, grouped-query attention."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    head_dim: int = 0  # 0 means d_model // n_heads
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 2048

    def __post_init__(self):
        if self.head_dim == 0:
            if self.n_heads > 0 and self.d_model % self.n_heads:
                raise TandemcError(f"config: d_model {self.d_model} is not divisible by n_heads {self.n_heads}; set "
                                   "head_dim explicitly")
            object.__setattr__(self, "head_dim", self.d_model // max(self.n_heads, 1))

    def validate(self, where: str) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "head_dim",
                     "max_seq_len"):
            if getattr(self, name) < 1:
                raise TandemcError(f"config field '{where}.{name}' must be a positive integer, "
                                   f"got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise TandemcError(f"config field '{where}.n_kv_heads' ({self.n_kv_heads}) must divide "
                               f"'{where}.n_heads' ({self.n_heads})")
        if self.head_dim % 2:
            raise TandemcError(f"config field '{where}.head_dim' ({self.head_dim}) must be even for "
                               "rotary embeddings")
        if not (math.isfinite(self.rope_theta) and math.isfinite(self.norm_eps)
                and self.rope_theta > 0 and self.norm_eps > 0):
            raise TandemcError(f"config fields '{where}.rope_theta' and '{where}.norm_eps' must be positive and "
                               "finite")

    def num_parameters(self) -> int:
        d, hd = self.d_model, self.head_dim
        attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * d * self.d_ff
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.n_layers * per_layer + d + head


@dataclass(frozen=True)
class RouterConfig:
    """The adaptive-block-length router: a 2-layer MLP predicting that a draft will be rejected."""

    top_k: int = 4
    hidden: int = 64
    threshold: float = 0.8

    def validate(self, vocab_size: int) -> None:
        if not 1 <= self.top_k <= vocab_size:
            raise TandemcError(f"config field 'router.top_k' must be in 1..{vocab_size}, got {self.top_k}")
        if self.hidden < 1:
            raise TandemcError(f"config field 'router.hidden' must be positive, got {self.hidden}")
        if not 0.0 <= self.threshold <= 1.0:
            raise TandemcError(f"config field 'router.threshold' must be in [0, 1], got {self.threshold}")

    def num_features(self, d_secondary: int) -> int:
        """Entropy, the top-k probabilities and the top-k tokens' secondary embeddings."""
        return 1 + self.top_k + self.top_k * d_secondary


@dataclass(frozen=True)
class TokenizerConfig:
    """`byte`: the built-in byte-level tokenizer. `hf`: a Hugging Face `tokenizer.json` beside the config."""

    type: str = "byte"
    file: str = ""
    bos_token: str = ""
    eos_token: str = ""
    pad_token: str = ""
    chat_template: str = ""  # Jinja, as the model's publisher wrote it (GGUF tokenizer.chat_template)

    def validate(self) -> None:
        if self.type not in ("byte", "hf"):
            raise TandemcError(f"config field 'tokenizer.type' must be 'byte' or 'hf', got {self.type!r}")
        if self.type == "hf" and not self.file:
            raise TandemcError("config field 'tokenizer.file' is required when tokenizer.type is 'hf'")


def default_layer_map(n_primary: int, n_secondary: int) -> tuple[int, ...]:
    """ℓ(j) = round((j+1)·L_L/L_S) − 1: evenly spaced, the last secondary layer reads the last primary layer."""
    return tuple(int(round((j + 1) * n_primary / n_secondary)) - 1 for j in range(n_secondary))


@dataclass(frozen=True)
class TandemConfig:
    """A primary, a tandem secondary reading the primary's layers, and optional router and drafter."""

    primary: DecoderConfig
    secondary: DecoderConfig
    layer_map: tuple[int, ...] = ()  # empty means the default map
    gamma_train: int = 2
    # Variant (docs/training.md): hidden width of an MLP that feeds the primary's last-layer state before the block
    # into the secondary's input at every draft; 0 (default) is the paper's tandem.
    primary_state_input: int = 0
    # With the variant: the MLP's hidden also feeds the secondary's logits (tandem_input.w_logits), past the
    # secondary's narrow residual stream.
    primary_state_logits: bool = False
    # With the variant: the primary layers whose states before the block the MLP reads, side by side; empty means
    # the last layer only. Reading a middle layer beside the last is EAGLE-3's fusion of feature levels.
    primary_state_layers: tuple[int, ...] = ()
    # With the variant: each draft after a block's first also reads the secondary's own last-layer state at the
    # draft before it (tandem_input.w_feedback), added to the primary's projected state, so what the primary knew
    # before the block is carried forward through it rather than read unchanged at every draft (EAGLE's
    # feature-level autoregression).
    primary_state_feedback: bool = False
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    router: RouterConfig | None = None
    drafter: DecoderConfig | None = None
    dtype: str = "float32"
    # Draft vocabulary (docs/training.md): with N > 0 the drafters (secondary and drafter) propose only the N
    # primary tokens listed in the tensor draft_vocab.tokens; their own vocabulary is those N plus one id (N) for
    # every other token, which they read but never propose. 0: they share the primary's vocabulary.
    draft_vocab: int = 0
    # The drafters read and write tokens through the primary's token table (frozen, never stored with them) and two
    # projections of their own (embed_proj, head_proj) instead of tables of their own (docs/training.md).
    shared_embeddings: bool = False
    # The passes `export` runs when given neither -O nor --passes ("" = -O1); import-gguf --keep-quantized sets the
    # ones that give the artifact the GGUF file's own integers.
    export_passes: str = ""
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        if not self.layer_map:
            object.__setattr__(self, "layer_map",
                               default_layer_map(self.primary.n_layers, self.secondary.n_layers))
        object.__setattr__(self, "layer_map", tuple(self.layer_map))
        object.__setattr__(self, "primary_state_layers", tuple(self.primary_state_layers))

    def validate(self) -> "TandemConfig":
        if self.schema_version != SCHEMA_VERSION:
            raise TandemcError(f"config field 'schema_version' is {self.schema_version}; this tandemc reads "
                               f"version {SCHEMA_VERSION}: upgrade tandemc or re-export the checkpoint")
        self.primary.validate("primary")
        self.secondary.validate("secondary")
        if not 0 <= self.draft_vocab < self.primary.vocab_size:
            raise TandemcError(f"config field 'draft_vocab' must be in 0..{self.primary.vocab_size - 1} (0: off), "
                               f"got {self.draft_vocab}")
        models = [("secondary", self.secondary)] + ([("drafter", self.drafter)] if self.drafter else [])
        for name, cfg in models:
            if name == "drafter":
                cfg.validate("drafter")
            if self.draft_vocab and cfg.vocab_size != self.draft_vocab + 1:
                raise TandemcError(f"config field '{name}.vocab_size' ({cfg.vocab_size}) must be draft_vocab + 1 "
                                   f"({self.draft_vocab + 1}): the draft tokens and one id for all others")
            if not self.draft_vocab and cfg.vocab_size != self.primary.vocab_size:
                raise TandemcError(f"config field '{name}.vocab_size' ({cfg.vocab_size}) differs from "
                                   f"'primary.vocab_size' ({self.primary.vocab_size}); the models must share "
                                   "one vocabulary (or set draft_vocab)")
        if len(self.layer_map) != self.secondary.n_layers:
            raise TandemcError(f"config field 'layer_map' has {len(self.layer_map)} entries; it needs one per "
                               f"secondary layer ({self.secondary.n_layers})")
        for j, src in enumerate(self.layer_map):
            if not 0 <= src < self.primary.n_layers:
                raise TandemcError(f"config field 'layer_map[{j}]' is {src}; it must name a primary layer in "
                                   f"0..{self.primary.n_layers - 1}")
        if self.primary_state_input < 0:
            raise TandemcError(f"config field 'primary_state_input' must be >= 0 (0: off), got "
                               f"{self.primary_state_input}")
        if self.primary_state_logits and not self.primary_state_input:
            raise TandemcError("config field 'primary_state_logits' needs 'primary_state_input' > 0 (the MLP it "
                               "reads); set both or neither")
        if self.primary_state_layers and not self.primary_state_input:
            raise TandemcError("config field 'primary_state_layers' needs 'primary_state_input' > 0 (the MLP that "
                               "reads them); set both or neither")
        if self.primary_state_feedback and not self.primary_state_input:
            raise TandemcError("config field 'primary_state_feedback' needs 'primary_state_input' > 0 (the MLP it "
                               "feeds); set both or neither")
        for j, src in enumerate(self.primary_state_layers):
            if not 0 <= src < self.primary.n_layers:
                raise TandemcError(f"config field 'primary_state_layers[{j}]' is {src}; it must name a primary layer "
                                   f"in 0..{self.primary.n_layers - 1}")
        if len(set(self.primary_state_layers)) != len(self.primary_state_layers):
            raise TandemcError(f"config field 'primary_state_layers' names a layer twice "
                               f"({list(self.primary_state_layers)}); list each once")
        if self.gamma_train < 1:
            raise TandemcError(f"config field 'gamma_train' must be >= 1, got {self.gamma_train}")
        if self.dtype not in DTYPES:
            raise TandemcError(f"config field 'dtype' must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        self.tokenizer.validate()
        if self.router:
            self.router.validate(self.secondary.vocab_size)
        return self

    @property
    def state_layers(self) -> tuple[int, ...]:
        """The primary layers the primary-state-input variant reads (`primary_state_layers`, or the last)."""
        return self.primary_state_layers or (self.primary.n_layers - 1,)

    def with_router_threshold(self, threshold: float) -> "TandemConfig":
        """This config with the router's stopping threshold τ replaced (it has a router)."""
        return dataclasses.replace(self, router=dataclasses.replace(self.router, threshold=threshold))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["layer_map"] = list(self.layer_map)
        out["primary_state_layers"] = list(self.primary_state_layers)
        return {"schema_version": out.pop("schema_version"), **out}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    @staticmethod
    def from_dict(data: Any) -> "TandemConfig":
        if not isinstance(data, dict):
            raise TandemcError("config.json must hold a JSON object")
        if "schema_version" not in data:
            raise TandemcError("config field 'schema_version' is missing; is this a tandemc checkpoint?")
        version = data["schema_version"]
        if version != SCHEMA_VERSION:
            raise TandemcError(f"config field 'schema_version' is {version!r}; this tandemc reads version "
                               f"{SCHEMA_VERSION}: upgrade tandemc or re-export the checkpoint")
        return _parse(TandemConfig, data, "").validate()


def _parse(cls, data: Any, where: str):
    """Build dataclass `cls` from a JSON object, naming the offending field on any mismatch."""
    if not isinstance(data, dict):
        raise TandemcError(f"config field '{where}' must be a JSON object")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise TandemcError(f"config field '{_join(where, key)}' is not a known field; remove it or check "
                               "the spelling")
    kwargs = {}
    for name, f in fields.items():
        path = _join(where, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise TandemcError(f"config field '{path}' is missing")
            continue
        kwargs[name] = _coerce(hints[name], data[name], path)
    return cls(**kwargs)


def _coerce(hint, value, path):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(options[0], value, path)
    if dataclasses.is_dataclass(hint):
        return _parse(hint, value, path)
    if origin is tuple:
        if not isinstance(value, list):
            raise TandemcError(f"config field '{path}' must be a list")
        return tuple(_coerce(int, v, f"{path}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise TandemcError(f"config field '{path}' must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TandemcError(f"config field '{path}' must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TandemcError(f"config field '{path}' must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise TandemcError(f"config field '{path}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint} at {path}")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


BYTE_VOCAB = 259  # 256 bytes + BOS, EOS, PAD


def _pair(primary: DecoderConfig, secondary: DecoderConfig, router_hidden: int) -> TandemConfig:
    return TandemConfig(primary=primary, secondary=secondary, drafter=secondary,
                        router=RouterConfig(top_k=4, hidden=router_hidden))


PRESETS: dict[str, TandemConfig] = {
    # For tests: compiles and runs in seconds.
    "tiny": _pair(DecoderConfig(BYTE_VOCAB, 64, 2, 4, 2, 128, max_seq_len=256),
                  DecoderConfig(BYTE_VOCAB, 32, 1, 2, 1, 64, max_seq_len=256), 16),
    # The shape of the bundled example: a primary several times the secondary's cost.
    "small": _pair(DecoderConfig(BYTE_VOCAB, 256, 6, 8, 4, 688, max_seq_len=1024),
                   DecoderConfig(BYTE_VOCAB, 96, 2, 3, 1, 256, max_seq_len=1024), 64),
    # ~100M-parameter primary for benchmarks.
    "100m": _pair(DecoderConfig(BYTE_VOCAB, 768, 16, 12, 4, 2048, max_seq_len=2048),
                  DecoderConfig(BYTE_VOCAB, 256, 2, 4, 2, 688, max_seq_len=2048), 64),
    # ~1B-parameter primary (TinyLlama-shaped) to exercise pipelines at scale.
    "1b": _pair(DecoderConfig(BYTE_VOCAB, 2048, 22, 32, 4, 5632, max_seq_len=2048),
                DecoderConfig(BYTE_VOCAB, 512, 4, 8, 2, 1408, max_seq_len=2048), 128),
}


def preset(name: str) -> TandemConfig:
    if name not in PRESETS:
        raise TandemcError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
