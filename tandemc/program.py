"""A Program: what the compiler works on — a tandem config, its parameters and the export options.

Passes map a Program to a Program (design.md §2); tracing turns one into static graphs. Export options fix every
shape up front (batch, cache lengths, prefill chunk, block length, generate length), and invalid combinations are
refused here, before anything is traced.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from tandemc.config import DTYPES, TandemConfig
from tandemc.decoding import MODES, check_mode, drafter_config
from tandemc.errors import TandemcError
from tandemc.params import np_dtype


@dataclass(frozen=True)
class ExportOptions:
    """Static shapes and the decoding mode of the exported graphs (the CLI flags of `tandemc export`)."""

    mode: str = "speed"
    block_length: int = 0  # γ; 0 = the checkpoint's gamma_train (ignored in `primary` mode)
    block_lengths: tuple[int, ...] = ()  # step graphs at these γ too (0: primary steps); the runtime picks per step
    max_seq_len: tuple[int, ...] = (256,)  # cache-length buckets S: prompt + new tokens must fit in one
    batch: int = 1
    prefill_chunk: int = 64  # C: prompt tokens per prefill call
    max_new_tokens: int = 64  # the in-graph `generate` loop's length
    dtype: str = "float32"  # weights and caches
    mesh: tuple[int, int] | None = None  # (data, model): batch rows over `data`, heads and MLP width over `model`

    def gamma(self, cfg: TandemConfig) -> int:
        if self.mode == "primary":
            return 0
        return self.block_length or cfg.gamma_train

    def step_gammas(self, cfg: TandemConfig) -> tuple[int, ...]:
        """Every block length with a step graph, the default γ among them."""
        return tuple(sorted({self.gamma(cfg), *self.block_lengths}))

    def validate(self, cfg: TandemConfig) -> "ExportOptions":
        check_mode(cfg, self.mode, self.gamma(cfg) if self.mode in MODES else 1)
        if self.block_lengths and self.mode == "primary":
            raise TandemcError("--block-lengths needs a drafting mode (speed, tandem, adaptive or vanilla), not primary")
        if 0 in self.block_lengths and self.mode == "vanilla":
            raise TandemcError("--block-lengths 0 (primary steps) keeps a tandem secondary's cache current from the "
                               "primary's states, but a standalone drafter would miss those tokens: use 1 or more "
                               "with --mode vanilla")
        if not all(0 <= g <= 64 for g in self.block_lengths):
            raise TandemcError(f"--block-lengths values must be in 0..64 (0: primary-only steps), got "
                               f"{','.join(map(str, self.block_lengths))}")
        if self.dtype not in DTYPES:
            raise TandemcError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.batch < 1:
            raise TandemcError(f"--batch must be >= 1, got {self.batch}")
        if self.mesh is not None:
            data, model = self.mesh
            if data < 1 or model < 1:
                raise TandemcError(f"--mesh sizes must be positive, got {data}x{model}")
            if self.batch % data:
                raise TandemcError(f"--batch {self.batch} must be a multiple of the mesh's data axis ({data})")
        if not self.max_seq_len or list(self.max_seq_len) != sorted(set(self.max_seq_len)):
            raise TandemcError(f"--max-seq-len must list distinct cache lengths in increasing order, got "
                               f"{','.join(map(str, self.max_seq_len))}")
        limit = min(c.max_seq_len for c in (cfg.primary, drafter_config(cfg, self.mode)) if c)
        if self.max_seq_len[0] < 2 or self.max_seq_len[-1] > limit:
            raise TandemcError(f"--max-seq-len values must be in 2..{limit} (the models' max_seq_len), got "
                               f"{','.join(map(str, self.max_seq_len))}")
        if not 1 <= self.prefill_chunk <= self.max_seq_len[-1]:
            raise TandemcError(f"--prefill-chunk must be in 1..{self.max_seq_len[-1]}, got {self.prefill_chunk}")
        if not 1 <= self.max_new_tokens < self.max_seq_len[-1]:
            raise TandemcError(f"--max-new-tokens must be in 1..{self.max_seq_len[-1] - 1} (below the largest "
                               f"cache length), got {self.max_new_tokens}")
        return self

    def cache_array_length(self, seq_len: int, cfg: TandemConfig) -> int:
        """Cache rows for bucket S: a verify block writes γ positions past the last committed token, and the last
        prefill chunk may run past the prompt up to a multiple of C. Nothing is ever written out of range."""
        chunks = -(-seq_len // self.prefill_chunk)
        return max(seq_len + max(self.step_gammas(cfg)), chunks * self.prefill_chunk)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "max_seq_len": list(self.max_seq_len),
                "block_lengths": list(self.block_lengths),
                "mesh": list(self.mesh) if self.mesh else None}


@dataclass(frozen=True)
class Program:
    """Config + parameters (numpy pytree) + export options, and the reports of the passes applied so far."""

    config: TandemConfig
    params: dict[str, Any]
    options: ExportOptions
    passes: tuple[dict, ...] = field(default_factory=tuple)

    @staticmethod
    def make(config: TandemConfig, params: dict[str, Any], options: ExportOptions) -> "Program":
        options = options.validate(config)
        config = dataclasses.replace(config, dtype=options.dtype)
        return Program(config, with_draft_head(config, cast_params(params, options.dtype)), options)

    @property
    def gamma(self) -> int:
        return self.options.gamma(self.config)


def cast_params(params: dict[str, Any], dtype: str) -> dict[str, Any]:
    """Every weight in `dtype` (checkpoints hold one dtype throughout, docs/checkpoint.md); integer tensors (the
    draft vocabulary) stay as they are."""
    target = np_dtype(dtype)
    return jax.tree.map(lambda a: np.asarray(a) if np.issubdtype(np.asarray(a).dtype, np.integer)
                        else np.asarray(a).astype(target), params)


def with_draft_head(cfg: TandemConfig, params: dict[str, Any]) -> dict[str, Any]:
    """Drafters that share the primary's table over a draft vocabulary read its draft tokens' rows at every draft;
    a program holds them once, transposed, as draft_vocab.head [primary.d_model, draft_vocab] (model._shared_head),
    instead of gathering them in every call."""
    if not (cfg.shared_embeddings and cfg.draft_vocab):
        return params
    table = np.asarray(params["primary"]["embed"])
    head = np.ascontiguousarray(table[np.asarray(params["draft_vocab"]["tokens"])].T)
    return {**params, "draft_vocab": {**params["draft_vocab"], "head": head}}


def program_for_artifact(ckpt, manifest: dict) -> Program:
    """The Program an artifact was exported from, rebuilt from its checkpoint and the manifest's decode options."""
    d = manifest["decode"]
    gamma = d["block_length"] if d["mode"] != "primary" else 0
    options = ExportOptions(mode=d["mode"], block_length=gamma,
                            block_lengths=tuple(g for g in d.get("block_lengths", ()) if g != gamma),
                            max_seq_len=tuple(d["cache_buckets"]),
                            batch=d["batch"], prefill_chunk=d["prefill_chunk"], max_new_tokens=d["max_new_tokens"],
                            dtype=d["dtype"])
    from tandemc.export import make_program

    program = make_program(ckpt, options, [(p["name"], p["options"]) for p in manifest["passes"]])
    if program.config.to_dict() != manifest["model"]:
        raise TandemcError("the checkpoint's config differs from the one the artifact was exported from; pass the "
                           "checkpoint given to `tandemc export`")
    return program
