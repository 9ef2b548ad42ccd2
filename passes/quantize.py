"""Weight-only symmetric quantization: integers q and float scales with w ≈ q · scale.

Scales are per output column and per block of `block` input rows (block 0: the whole column, i.e. per output
channel). Targets lower a quantized matmul natively from the same integers (tandemc.primitives.dequant_matmul:
StableHLO convert + multiply; ONNX DequantizeLinear feeding MatMul), so every target computes the same numbers.
"""

from __future__ import annotations

import numpy as np

from tandemc.config import TandemConfig
from tandemc.errors import TandemcError
from tandemc.params import np_dtype

MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "wqkv", "w_gate_up")
MODELS = ("primary", "secondary", "drafter", "tandem")


def quantize_matrix(w: np.ndarray, bits: int, block: int) -> dict[str, np.ndarray]:
    """w [K, N] → {"q": int8 (bits 8) or int4 (bits 4) [K, N] in ±(2^(bits-1) - 1),
    "scale": float32 [K/block, N]}."""
    k, n = w.shape
    block = block_for(k, block)
    qmax = 2 ** (bits - 1) - 1
    blocks = np.asarray(w, np.float32).reshape(k // block, block, n)
    scale = np.max(np.abs(blocks), axis=1) / qmax
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[:, None, :]), -qmax, qmax).astype(np.int8).reshape(k, n)
    return {"q": q if bits == 8 else q.astype(np_dtype("int4")), "scale": scale}


def block_for(rows: int, block: int) -> int:
    """The block used for a matrix of `rows` input rows: `block` where it divides them, else the largest power of
    two below it that does (ONNX Runtime's MatMulNBits takes powers of two from 16), else the whole column."""
    if not block or rows % block == 0:
        return block or rows
    b = 1 << (block.bit_length() - 1)
    while b >= 16 and rows % b:
        b //= 2
    return b if b >= 16 else rows


def _nbytes(tree) -> int:
    if isinstance(tree, dict):
        return sum(_nbytes(v) for v in tree.values())
    if isinstance(tree, list):
        return sum(_nbytes(v) for v in tree)
    return int(np.asarray(tree).nbytes)


def quantize(config: TandemConfig, params: dict, bits: int = 8, block: int | str = 0,
             models: str = "primary+secondary+drafter+tandem", keep: str = "embed+lm_head"):
    """Quantize the matrices of the chosen models; `keep` names matrices left in float (the embedding table is a
    lookup, never quantized)."""
    if config.dtype != "float32":
        raise TandemcError(f"quantization starts from float32 weights; export with --dtype float32 (got "
                           f"{config.dtype})")
    block, chosen = int(block), [m for m in str(models).split("+") if m]
    for m in chosen:
        if m not in MODELS:
            raise TandemcError(f"quantization option models={models!r}: {m!r} is not one of {', '.join(MODELS)}")
    kept = set(str(keep).split("+"))
    params, details = dict(params), {"bits": bits, "block": block, "models": {}}

    def q(w):
        return quantize_matrix(w, bits, block) if isinstance(w, np.ndarray) and w.ndim == 2 else w

    for name in chosen:
        if name not in params:
            continue
        before = _nbytes(params[name])
        if name == "tandem":
            params[name] = [{k: (v if k in kept or k in ("bias", "bkv") else q(v)) for k, v in proj.items()}
                            for proj in params[name]]
        else:
            p = dict(params[name])
            p["layers"] = [{k: (q(v) if k in MATRICES and k not in kept else v) for k, v in layer.items()}
                           for layer in p["layers"]]
            if "lm_head" in p and "lm_head" not in kept:
                p["lm_head"] = q(p["lm_head"])
            params[name] = p
        details["models"][name] = {"bytes_before": before, "bytes_after": _nbytes(params[name])}
    return config, params, details
