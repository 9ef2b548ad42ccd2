"""Exact folds: linear maps applied back to back become one matrix (computed in float64, stored in the dtype)."""

from __future__ import annotations

import dataclasses

import numpy as np

from tandemc import model
from tandemc.config import TandemConfig


def _f64(a) -> np.ndarray:
    return np.asarray(a, np.float64)


def fold_projection(config: TandemConfig, params: dict):
    """FF_j then the secondary's W_k, W_v → one [d_primary, 2·KV·hd] matrix and bias per secondary layer.

    The primary-derived keys/values of a block then cost one matmul per secondary layer instead of two
    (tandem/model.py `tandem_kv`).
    """
    if "tandem" not in params:
        return config, params, {"layers": 0}
    s = config.secondary
    q_width = s.n_heads * s.head_dim
    tandem = []
    for proj, layer in zip(params["tandem"], params["secondary"]["layers"]):
        if "wkv" in proj:
            tandem.append(proj)
            continue
        if "wqkv" in layer:
            wkv = _f64(layer["wqkv"])[:, q_width:]
        else:
            wkv = np.concatenate([_f64(layer["wk"]), _f64(layer["wv"])], axis=1)
        dtype = proj["weight"].dtype
        tandem.append({"wkv": (_f64(proj["weight"]) @ wkv).astype(dtype),
                       "bkv": (_f64(proj["bias"]) @ wkv).astype(dtype)})
    return config, {**params, "tandem": tandem}, {"layers": len(tandem)}


# matrices that read each RMSNorm's output
_READERS = {"attn_norm": ("wq", "wk", "wv", "wqkv"), "mlp_norm": ("w_gate", "w_up", "w_gate_up")}


def fold_norm_scale(config: TandemConfig, params: dict):
    """RMSNorm gains g folded into the matrices that read the normalised values: diag(g)·W; the norm keeps no gain.

    The secondary's W_k, W_v also read the tandem projection (not normalised), so its attention norms are folded
    only once fold_projection has given the projection its own matrices. The final norm folds into an untied LM
    head (a tied head is the embedding table, which the input side reads unscaled).
    """
    params, folded, skipped = dict(params), 0, []
    for name in ("primary", "secondary", "drafter"):
        if name not in params:
            continue
        p = {**params[name], "layers": [dict(layer) for layer in params[name]["layers"]]}
        for j, layer in enumerate(p["layers"]):
            for norm, readers in _READERS.items():
                if norm not in layer:
                    continue
                if (name == "secondary" and norm == "attn_norm" and "tandem" in params
                        and "wkv" not in params["tandem"][j]):
                    skipped.append(f"{name}.layers.{j}.{norm}")
                    continue
                gain = _f64(layer.pop(norm))[:, None]
                for reader in readers:
                    if reader in layer:
                        layer[reader] = (gain * _f64(layer[reader])).astype(layer[reader].dtype)
                folded += 1
        if "lm_head" in p and "final_norm" in p:
            p["lm_head"] = (_f64(p.pop("final_norm"))[:, None] * _f64(p["lm_head"])).astype(p["lm_head"].dtype)
            folded += 1
        params[name] = p
    return config, params, {"norms": folded, "skipped": skipped}


def fold_draft_head(config: TandemConfig, params: dict):
    """A drafter's factored head (head_proj [d, d_primary], then the primary's rows of the draft tokens
    [d_primary, N] and the `other` column) → one untied LM head [d, N + 1].

    Each draft then reads d × (N + 1) weights instead of d × d_primary + d_primary × N: for SmolLM2's drafters
    (d 256, d_primary 576, N 8192) 8.4 MB instead of 19.5 MB in float32, and half the multiply-adds. The table's
    shared copy (draft_vocab.head) goes once no drafter reads it.
    """
    params, folded = dict(params), []
    for name in ("secondary", "drafter"):
        p = params.get(name)
        if p is None or "head_proj" not in p:
            continue
        head = model.shared_head_matrix(params, name).astype(np.asarray(p["head_proj"]).dtype)
        params[name] = {**{k: v for k, v in p.items() if k not in ("head_proj", "other")},
                        "lm_head": np.ascontiguousarray(head)}
        config = dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name),
                                                                           tie_embeddings=False)})
        folded.append(name)
    vocab = params.get("draft_vocab")
    if folded and vocab is not None and "head" in vocab:
        params["draft_vocab"] = {k: v for k, v in vocab.items() if k != "head"}
    return config, params, {"drafters": folded}
