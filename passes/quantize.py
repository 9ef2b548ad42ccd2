"""Weight quantization: integers q and float scales with w ≈ q · scale (symmetric), or w ≈ q · scale + offset
(`scheme=asymmetric`: the block's minimum and maximum map to the integer range's ends).

Scales are per output column and per block of `block` input rows (block 0: the whole column, i.e. per output
channel). Targets lower a quantized matmul natively from the same integers (tandemc.primitives.dequant_matmul:
StableHLO convert + multiply; ONNX DequantizeLinear feeding MatMul), so every target computes the same numbers.

`activations=int8` quantizes the matmul's input too, at run time, per block of the weight's block
(tandemc.primitives.int8_activation_matmul; leaves {"qa", "scale"}): integer dot products, the numerics of ONNX
Runtime's fast MatMulNBits kernels (accuracy level 4). Its float-activation kernels for 8-bit weights dequantize
the whole matrix every call, slower than float32 on CPUs; with int8 activations an int8 artifact beats float.

Asymmetric blocks are the layout of llama.cpp's Q4_1 (w = d·q + m, q in 0..15, blocks of 32): stored as signed
q − 8 with offset m + 8·d, a quantized matrix stays a symmetric one (the same kernels: MatMulNBits, TensorRT's
DequantizeLinear) plus a small float matmul of x's block sums by the offsets (tandemc.model.linear). Re-quantizing a
Q4_1 file's dequantized weights this way gives back its integers exactly wherever every block spans 0..15, as
llama.cpp's Q4_1 quantizer makes it (tandemc/gguf.py checks it for --keep-quantized).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tandemc.config import TandemConfig
from tandemc.errors import TandemcError
from tandemc.params import np_dtype
from tandemc.primitives import quant_block

MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "wqkv", "w_gate_up")
MODELS = ("primary", "secondary", "drafter", "tandem", "draft_vocab")  # draft_vocab: the drafters' shared head
ACTIVATIONS = ("float", "int8")
SCHEMES = ("symmetric", "asymmetric")
KERNEL_BLOCKS = (16, 32, 64, 128, 256)  # the blocks ONNX Runtime's MatMulNBits kernels take


def quantize_matrix(w: np.ndarray, bits: int, block: int, key: str = "q",
                    scheme: str = "symmetric") -> dict[str, np.ndarray]:
    """w [K, N] → {key: int8 (bits 8) or int4 (bits 4) [K, N], "scale": float32 [ceil(K/block), N]} (the last
    block may be shorter). Symmetric: q in ±(2^(bits-1) - 1), scale max|w|/qmax. Asymmetric: q + 2^(bits-1) in
    0..2^bits - 1 spans each block's min..max, and "offset" [blocks, N] = min + 2^(bits-1)·scale."""
    k, n = w.shape
    block = block_for(k, block)
    blocks = -(-k // block)
    padded = np.zeros((blocks * block, n), np.float32)
    padded[:k] = w
    if k % block:  # the short last block's padding repeats its first row, so it does not widen min..max
        padded[k:] = w[(blocks - 1) * block]
    padded = padded.reshape(blocks, block, n)
    if scheme == "asymmetric":
        half = 2 ** (bits - 1)
        low = np.min(padded, axis=1)
        scale = (np.max(padded, axis=1) - low) / (2 * half - 1)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint((padded - low[:, None, :]) / scale[:, None, :]), 0, 2 * half - 1) - half
        extra = {"offset": (low + half * scale).astype(np.float32)}
    else:
        qmax = 2 ** (bits - 1) - 1
        scale = np.max(np.abs(padded), axis=1) / qmax
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(padded / scale[:, None, :]), -qmax, qmax)
        extra = {}
    q = q.astype(np.int8).reshape(-1, n)[:k]
    return {key: q if bits == 8 else q.astype(np_dtype("int4")), "scale": scale, **extra}


def block_for(rows: int, block: int) -> int:
    """The block used for a matrix of `rows` input rows: `block` where its blocks tile the rows with a shorter last
    one that leaves the block recoverable from the scales' shape (primitives.quant_block), else the largest power of
    two below it that does (ONNX Runtime's MatMulNBits takes powers of two from 16), else the whole column."""
    if not block:
        return rows
    b = block
    while b >= 16 and quant_block(rows, -(-rows // b)) != b:
        b //= 2
    return b if b >= 16 else rows


def kinds(params) -> set[str]:
    """Which quantized matrices a parameter tree holds: "q" (weight-only) and/or "qa" (int8 activations)."""
    if isinstance(params, dict):
        found = {k for k in ("q", "qa") if k in params}
        return found.union(*(kinds(v) for v in params.values()))
    if isinstance(params, list):
        return set().union(*(kinds(v) for v in params))
    return set()


def with_float_activations(params):
    """The same integers and scales with the activations left in float: each {"qa", ...} as {"q", ...}. The
    yardstick for what int8 activations change (tandemc.verify)."""
    if isinstance(params, dict):
        return {("q" if k == "qa" else k): with_float_activations(v) for k, v in params.items()}
    if isinstance(params, list):
        return [with_float_activations(v) for v in params]
    return params


def _matrix_names(tree) -> set[str]:
    """The names of the 2-D float matrices in a model's parameter tree (what `keep` may name)."""
    if isinstance(tree, dict):
        return {k for k, v in tree.items() if isinstance(v, np.ndarray) and v.ndim == 2}.union(
            *(_matrix_names(v) for v in tree.values() if isinstance(v, (dict, list))))
    if isinstance(tree, list):
        return set().union(*(_matrix_names(v) for v in tree))
    return set()


def _nbytes(tree) -> int:
    if isinstance(tree, dict):
        return sum(_nbytes(v) for v in tree.values())
    if isinstance(tree, list):
        return sum(_nbytes(v) for v in tree)
    return int(np.asarray(tree).nbytes)


def quantize(config: TandemConfig, params: dict, bits: int = 8, block: int | str = 0,
             models: str = "primary+secondary+drafter+tandem", keep: str = "embed+lm_head",
             activations: str = "float", scheme: str = "symmetric"):
    """Quantize the float matrices of the chosen models (matrices a previous pass quantized stay as they are);
    `keep` names matrices left in float: the embedding table is a lookup, never quantized, and a tied LM head
    that is not kept becomes a quantized copy of the table (the lookup stays float); `activations` float
    (weight-only) or int8, `scheme` symmetric or asymmetric (see the module docstring)."""
    if config.dtype != "float32":
        raise TandemcError(f"quantization starts from float32 weights; export with --dtype float32 (got "
                           f"{config.dtype})")
    block, chosen = int(block), [m for m in str(models).split("+") if m]
    if block and block not in KERNEL_BLOCKS:
        raise TandemcError(f"quantization option block={block}: use 0 (per output channel) or one of "
                           f"{', '.join(map(str, KERNEL_BLOCKS))}")
    for m in chosen:
        if m not in MODELS:
            raise TandemcError(f"quantization option models={models!r}: {m!r} is not one of {', '.join(MODELS)}")
    if activations not in ACTIVATIONS:
        raise TandemcError(f"quantization option activations={activations!r}: use one of {', '.join(ACTIVATIONS)}")
    if activations == "int8" and block not in KERNEL_BLOCKS:
        raise TandemcError(f"activations=int8 needs block={'|'.join(map(str, KERNEL_BLOCKS))} (the int8 kernels' "
                           f"blocks), got block={block}")
    if scheme not in SCHEMES:
        raise TandemcError(f"quantization option scheme={scheme!r}: use one of {', '.join(SCHEMES)}")
    kept = set(filter(None, str(keep).split("+")))
    matrices = {k for m in chosen if m in params for k in _matrix_names(params[m])}
    unknown = kept - matrices - {"embed", "lm_head"}
    if unknown:
        raise TandemcError(f"quantization option keep={keep!r}: {', '.join(sorted(unknown))} names no matrix of the "
                           f"chosen models (they have: {', '.join(sorted(matrices))})")
    key = "qa" if activations == "int8" else "q"
    params, details = dict(params), {"bits": bits, "block": block, "activations": activations, "scheme": scheme,
                                   "models": {}}

    def q(w):
        if not (isinstance(w, np.ndarray) and w.ndim == 2):
            return w
        if key == "qa" and block_for(w.shape[0], block) not in KERNEL_BLOCKS:
            raise TandemcError(f"activations=int8: a matrix of {w.shape[0]} input rows has no block of 16..{block} "
                               f"rows that divides it; quantize it weight-only or keep it")
        return quantize_matrix(w, bits, block, key, scheme)

    for name in chosen:
        if name not in params:
            continue
        before = _nbytes(params[name])
        if name == "draft_vocab":  # the primary's table over the draft vocabulary (program.with_draft_head)
            if "head" not in params[name]:
                raise TandemcError("quantization option models=draft_vocab: no drafter reads the shared head here "
                                   "(fold_draft_head, in -O1, gave each its own lm_head); quantize those as "
                                   "models=secondary+drafter:keep=embed")
            if "head" not in kept:
                params[name] = {**params[name], "head": q(params[name]["head"])}
        elif name == "tandem":
            params[name] = [{k: (v if k in kept or k in ("bias", "bkv") else q(v)) for k, v in proj.items()}
                            for proj in params[name]]
        else:
            p = dict(params[name])
            if "lm_head" not in kept and getattr(config, name).tie_embeddings:
                p["lm_head"] = np.ascontiguousarray(p["embed"].T)
                config = dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name),
                                                                                   tie_embeddings=False)})
            p["layers"] = [{k: (q(v) if k in MATRICES and k not in kept else v) for k, v in layer.items()}
                           for layer in p["layers"]]
            if "lm_head" in p and "lm_head" not in kept:
                p["lm_head"] = q(p["lm_head"])
            params[name] = p
        details["models"][name] = {"bytes_before": before, "bytes_after": _nbytes(params[name])}
    return config, params, details
