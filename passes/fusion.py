"""Exact fusions: matrices that read the same input become one matrix, so a step makes fewer, larger matmuls."""

from __future__ import annotations

import dataclasses

import numpy as np

from tandemc.config import TandemConfig

DECODERS = ("primary", "secondary", "drafter")


def _each_layer(params: dict, fn) -> int:
    """Apply fn to every decoder layer's parameter dict (in place on copies); returns how many changed."""
    changed = 0
    for name in DECODERS:
        if name in params:
            params[name] = {**params[name], "layers": [dict(layer) for layer in params[name]["layers"]]}
            for layer in params[name]["layers"]:
                changed += bool(fn(layer))
    return changed


def _concat(layer: dict, names: tuple[str, ...], fused: str) -> bool:
    if fused in layer or not all(isinstance(layer.get(n), np.ndarray) for n in names):
        return False  # already fused, or quantized (fuse before quantizing)
    layer[fused] = np.concatenate([layer.pop(n) for n in names], axis=1)
    return True


def fuse_qkv(config: TandemConfig, params: dict):
    """wq, wk, wv [d, ·] → wqkv [d, (H + 2·KV)·hd]; the model splits the product."""
    params = dict(params)
    return config, params, {"layers": _each_layer(params, lambda layer: _concat(layer, ("wq", "wk", "wv"), "wqkv"))}


def fuse_gate_up(config: TandemConfig, params: dict):
    """w_gate, w_up [d, d_ff] → w_gate_up [d, 2·d_ff]."""
    params = dict(params)
    return config, params, {"layers": _each_layer(params, lambda layer: _concat(layer, ("w_gate", "w_up"),
                                                                                 "w_gate_up"))}


def dedupe_tied(config: TandemConfig, params: dict):
    """A decoder whose LM head is exactly its embedding table transposed is tied, so the table is stored once."""
    params, tied = dict(params), []
    for name in DECODERS:
        p = params.get(name)
        head = p.get("lm_head") if p else None
        if isinstance(head, np.ndarray) and head.shape == p["embed"].T.shape and np.array_equal(head, p["embed"].T):
            params[name] = {k: v for k, v in p.items() if k != "lm_head"}
            config = dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name),
                                                                              tie_embeddings=True)})
            tied.append(name)
    return config, params, {"tied": tied}
