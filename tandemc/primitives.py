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
def write_block(cache, block, start):
    """cache [B, S, ...] with block [B, T, ...] written at rows' offsets start [B] (in range by construction)."""
    zeros = (0,) * (cache.ndim - 2)
    return jax.vmap(lambda c, x, s: lax.dynamic_update_slice(c, x.astype(c.dtype), (s, *zeros)))(cache, block, start)


@primitive
def sort_descending(x):
    """Values along the last axis, largest first."""
    return -jnp.sort(-x, axis=-1)
