"""Small named operations: one JAX definition, and a native operator per target where one exists.

Each is a jitted function whose name (`tandemc.<op>`) survives in the traced jaxpr, so a target's lowering can map it
to a native operator (ONNX Gather, GatherElements, GatherND, ScatterND, TopK) instead of decoding XLA's general
gather/scatter; anything that does not recognise the name inlines the JAX body, which stays the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

PREFIX = "tandemc."


def primitive(fn):
    fn.__name__ = fn.__qualname__ = PREFIX + fn.__name__
    return jax.jit(fn)


def quant_block(rows: int, blocks: int) -> int:
    """The block of a quantized matrix of `rows` input rows with `blocks` scales per column: blocks tile the rows
    from the top and the last may be shorter (as ONNX's blocked DequantizeLinear allows); passes/quantize.py only
    makes blocks this recovers."""
    return -(-rows // blocks)


def _padded_rows(a, blocks: int):
    """a [K, ...] with zero rows appended to fill its last block: [blocks, block, ...]."""
    k = a.shape[0]
    block = quant_block(k, blocks)
    return jnp.pad(a, [(0, blocks * block - k)] + [(0, 0)] * (a.ndim - 1)).reshape(blocks, block, *a.shape[1:])


def block_sums(x, blocks: int):
    """x [..., K] → [..., blocks] in float32: sums of x over the blocks of a quantized matrix's input rows."""
    k = x.shape[-1]
    block = quant_block(k, blocks)
    x = x.astype(jnp.float32)
    if blocks * block > k:  # a short last block
        x = jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (blocks * block - k,), x.dtype)], axis=-1)
    return jnp.sum(x.reshape(*x.shape[:-1], blocks, block), axis=-1)


@primitive
def dequant_matmul(x, q, scale):
    """x [..., K] @ dequantize(q [K, N] integers, scale [blocks, N]): symmetric weight-only quantization, scales
    per block of input rows and output column (one block: per output channel)."""
    k = q.shape[0]
    w = q.astype(jnp.float32) * jnp.repeat(scale, quant_block(k, scale.shape[0]), axis=0)[:k]
    return x @ w.astype(x.dtype)


@primitive
def int8_activation_matmul(x, q, scale):
    """x [..., K] @ dequantize(q, scale) with x quantized too, at run time: per block of the weight's input rows,
    symmetric int8 (step max|x|/127, round half to even), integer dot products per block, scaled and summed in
    float32. These are the numerics of ONNX Runtime's MatMulNBits at accuracy level 4, its int8 kernels."""
    blocks = scale.shape[0]
    xb = _padded_rows(jnp.moveaxis(x.astype(jnp.float32), -1, 0), blocks)  # [blocks, block, ...]
    step = jnp.max(jnp.abs(xb), axis=1, keepdims=True) / 127
    xq = jnp.round(xb * jnp.where(step > 0, 1 / step, 0)).astype(jnp.int8)
    dots = jnp.einsum("kb...,kbn->...kn", xq, _padded_rows(q.astype(jnp.int8), blocks),
                      preferred_element_type=jnp.int32)
    step = jnp.moveaxis(step[:, 0], 0, -1)[..., None]  # [..., blocks, 1]
    return jnp.sum(dots.astype(jnp.float32) * step * scale, axis=-2).astype(x.dtype)


@primitive
def embed(table, ids):
    """table [V, D], ids [...] → [..., D]."""
    return table[ids]


@primitive
def take_along_last(x, index):
    """x [..., V], index [..., K] → x[..., index] along the last axis."""
    return jnp.take_along_axis(x, index, axis=-1)


@primitive
def take_rows(x, index):
    """x [B, T, ...], index [B] → x[b, index[b], ...]."""
    return x[jnp.arange(x.shape[0]), index]


@primitive
def take_columns(x, index):
    """x [..., N] at the columns index [M] → [..., M]."""
    return jnp.take(x, index, axis=-1)


@primitive
def write_block(buffer, block, start):
    """buffer [B, S, ...] with block [B, T, ...] written at rows' offsets start [B] (in range by construction)."""
    return write_rows(buffer, block.astype(buffer.dtype), start, axis=1)


UNROLLED_ROWS = 8  # batch sizes up to this write each row with its own dynamic_update_slice


def write_rows(buffer, block, start, axis):
    """Each row b of block written into buffer at start[b] along `axis`, without the scatter with batching
    dimensions that JAX makes of a vmapped dynamic_update_slice (IREE cannot compile it, docs/artifact.md). Up to
    UNROLLED_ROWS rows: one dynamic_update_slice per row, in place where the buffer is donated. Larger batches
    (thousands of rows in the sampling tests: an unrolled chain crashed XLA's CPU compiler) select each position
    from the block or the buffer, the block's row for it picked by a one-hot product (exact: one term is nonzero)."""
    rows, span = buffer.shape[0], block.shape[axis]
    if rows <= UNROLLED_ROWS:
        for b in range(rows):
            starts = [jnp.int32(0)] * buffer.ndim
            starts[0], starts[axis] = jnp.int32(b), start[b].astype(jnp.int32)
            buffer = lax.dynamic_update_slice(buffer, block[b:b + 1], starts)
        return buffer
    offset = jnp.arange(buffer.shape[axis])[None, :] - start.astype(jnp.int32)[:, None]  # [B, S]
    one_hot = (offset[..., None] == jnp.arange(span)).astype(block.dtype)  # [B, S, T]
    moved = jnp.moveaxis(block, axis, 1)  # [B, T, ...]
    placed = jnp.einsum("bst,bt...->bs...", one_hot, moved, precision=lax.Precision.HIGHEST)
    written = ((offset >= 0) & (offset < span)).reshape(offset.shape + (1,) * (buffer.ndim - 2))
    return jnp.moveaxis(jnp.where(written, placed, jnp.moveaxis(buffer, axis, 1)), 1, axis)


@primitive
def sort_descending(x):
    """Values along the last axis, largest first."""
    return -jnp.sort(-x, axis=-1)


@primitive
def filter_threshold(z, top_k, top_p):
    """[..., 1]: the smallest logit that top-k then top-p keep of z [..., V]. Top-k keeps the logits ≥ the k-th
    largest (ties kept; k ≤ 0 is off); top-p then keeps a token while the renormalised probability of the tokens
    ranked before it is below top_p (≥ 1 is off). Computed by sorting; targets without a sort of the vocabulary
    lower it by bisection (targets/onnx.py, gpu profile)."""
    vocab = z.shape[-1]
    ordered = sort_descending(z)
    rank = jnp.arange(vocab)
    in_top_k = (top_k <= 0) | (rank < top_k)
    ordered_probs = softmax(jnp.where(in_top_k, ordered, -jnp.inf))
    mass_before = jnp.cumsum(ordered_probs, axis=-1) - ordered_probs
    keep = in_top_k & ((top_p >= 1.0) | (mass_before < top_p))
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
    return take_along_last(ordered, n_keep - 1)


@primitive
def rms_norm(x, weight, eps):
    """x · rsqrt(mean(x²) + eps) · weight over the last axis, computed in float32."""
    x32 = x.astype(jnp.float32)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


@primitive
def softmax(x):
    """Softmax over the last axis."""
    return jax.nn.softmax(x, axis=-1)


@primitive
def rope(x, positions, theta):
    """Rotary embedding (rotate-half convention, as Llama) of x [B, T, N, hd] at positions [B, T]."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, 2 * half, 2, dtype=jnp.float32) / (2 * half)))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@primitive
def write_cache(cache, block, start):
    """cache [B, KV, S, hd] with block [B, T, KV, hd] written at positions start[b]..start[b]+T-1 of each row (in
    range by construction; XLA clamps otherwise)."""
    return write_rows(cache, jnp.swapaxes(block, 1, 2).astype(cache.dtype), start, axis=2)


@primitive
def attention(q, k, v, mask):
    """Grouped-query attention. q [B,T,H,hd]; k, v [B,KV,S,hd]; mask [B,T,S], True where a key is visible."""
    b, t, h, hd = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k).astype(jnp.float32) * (hd ** -0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    weights = softmax(scores).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->btkgd", weights, v).reshape(b, t, h * hd)


@primitive
def cached_attention(q, k, v, cache_k, cache_v, start, theta):
    """Decoding attention of T new tokens per row at positions start..start+T-1: RoPE on q and k, k and v written
    into the caches [B, KV, S, hd] at start, then the queries attend causally over the cache. Returns (out
    [B, T, H*hd], cache_k, cache_v). One kernel on ONNX Runtime's CPU (GroupQueryAttention over a shared buffer)."""
    positions = start[:, None] + jnp.arange(q.shape[1], dtype=start.dtype)
    q, k = rope(q, positions, theta), rope(k, positions, theta)
    cache_k, cache_v = write_cache(cache_k, k, start), write_cache(cache_v, v, start)
    key_pos = jnp.arange(cache_k.shape[2], dtype=positions.dtype)
    return attention(q, cache_k, cache_v, key_pos[None, None, :] <= positions[:, :, None]), cache_k, cache_v
