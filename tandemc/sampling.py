"""Token distributions, inverse-CDF sampling and the portable uniform-random stream.

Greedy decoding is sampling from a one-hot distribution at the argmax: with one-hot distributions, speculative
rejection sampling reduces exactly to greedy draft-and-verify. The graphs compute the greedy case directly
(argmaxes, no distributions) behind a conditional on the temperature, tested equal to the one-hot path. Random numbers
are inputs (uniforms in [0, 1)), never drawn inside a graph, so every target draws the same tokens from the same
seed. `uniforms` is a counter-based generator (splitmix64) that any runtime can reimplement in a few lines.
"""

from __future__ import annotations

import math

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from tandemc import primitives
from tandemc.errors import TandemcError


class Sampling(NamedTuple):
    """Sampling controls, as arrays so one compiled graph serves every setting. temperature 0 means greedy."""

    temperature: jax.Array  # float32 scalar
    top_k: jax.Array  # int32 scalar, 0 = off
    top_p: jax.Array  # float32 scalar, >= 1 = off

    @staticmethod
    def make(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> "Sampling":
        return Sampling(np.float32(temperature), np.int32(top_k), np.float32(top_p))


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not (math.isfinite(temperature) and temperature >= 0 and top_k >= 0 and 0 < top_p <= 1):
        raise TandemcError("need a finite --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")


def token_distribution(logits, s: Sampling):
    """logits [..., V] → probabilities after temperature, top-k then top-p; one-hot argmax when temperature is 0.

    A conditional, so greedy decoding runs only the argmax and every target can skip the sampling branch.
    """
    return lax.cond(s.temperature > 0, _sampled, _greedy, logits.astype(jnp.float32), s)


def next_token(logits, s: Sampling, u):
    """One token per row: `sample(token_distribution(logits, s), u)`, computed as a bare argmax when greedy (the
    one-hot's inverse CDF is the argmax for every u in [0, 1)), so greedy graphs skip the distribution."""
    return lax.cond(s.temperature > 0, lambda x, s, u: sample(_sampled(x, s), u),
                    lambda x, s, u: jnp.argmax(x, axis=-1).astype(jnp.int32), logits.astype(jnp.float32), s, u)


def draft_token(logits, s: Sampling, u, vocab=None):
    """A draft: (token, the distribution it was drawn from). Greedy returns the argmax and zeros in place of the
    one-hot, which greedy verification never reads (decoding.accept_greedy), so greedy graphs skip both.

    `vocab`, a draft vocabulary (params["draft_vocab"]), maps the drafter's ids back to the primary's: the token
    becomes tokens[id] and the distribution is spread over the primary's vocabulary (index's ids, the last one
    masked by the caller, `model.proposable`)."""
    width = logits.shape[-1] if vocab is None else vocab["index"].shape[0]

    def token(d):
        return d if vocab is None else primitives.embed(vocab["tokens"], d)

    def sampled(x, s, u):
        q = _sampled(x, s)
        return token(sample(q, u)), (q if vocab is None else primitives.take_columns(q, vocab["index"]))

    def greedy(x, s, u):
        return token(jnp.argmax(x, axis=-1).astype(jnp.int32)), jnp.zeros(x.shape[:-1] + (width,), jnp.float32)

    return lax.cond(s.temperature > 0, sampled, greedy, logits.astype(jnp.float32), s, u)


def _greedy(logits, s: Sampling):
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)


def _sampled(logits, s: Sampling):
    z = logits / jnp.maximum(s.temperature, 1e-6)
    return primitives.softmax(jnp.where(z >= primitives.filter_threshold(z, s.top_k, s.top_p), z, -jnp.inf))


def sample(probs, u):
    """Inverse-CDF sample: the first index whose cumulative probability exceeds u·total. probs [..., V], u [...]."""
    cdf = jnp.cumsum(probs, axis=-1)
    target = (u * cdf[..., -1])[..., None]
    index = jnp.sum(cdf <= target, axis=-1)
    return jnp.minimum(index, probs.shape[-1] - 1).astype(jnp.int32)


def sample_margin(probs, u):
    """How close `sample(probs, u)` came to picking another token: the distance of u·total from the nearest edge of
    the chosen token's CDF interval, as a fraction of the total mass. Two correct compilers may pick differently
    when this is within what their rounding moves the CDF; `verify` uses it to tell such near-ties from errors."""
    cdf = jnp.cumsum(probs, axis=-1)
    total = cdf[..., -1]
    target = u * total
    index = sample(probs, u)[..., None]
    upper = primitives.take_along_last(cdf, index)[..., 0]
    lower = upper - primitives.take_along_last(probs, index)[..., 0]
    return jnp.abs(jnp.minimum(upper - target, target - lower)) / total


def filter_margin(logits, s: Sampling):
    """How close the top-k and top-p filters of `token_distribution` came to keeping another set of tokens: the
    log-probability gap between the k-th and (k+1)-th tokens, and the distance of the nucleus mass from top_p at
    its edge. Either within rounding of zero makes the kept set, and so every probability, compiler-dependent;
    +inf where a filter is off."""
    vocab = logits.shape[-1]
    z = logits.astype(jnp.float32) / jnp.maximum(s.temperature, 1e-6)
    ordered = primitives.sort_descending(z)
    k = jnp.clip(s.top_k, 1, vocab - 1)
    gap = (primitives.take_along_last(ordered, jnp.broadcast_to(k - 1, z.shape[:-1])[..., None])
           - primitives.take_along_last(ordered, jnp.broadcast_to(k, z.shape[:-1])[..., None]))[..., 0]
    top_k = jnp.where((s.top_k > 0) & (s.top_k < vocab), gap, jnp.inf)
    in_top_k = (s.top_k <= 0) | (jnp.arange(vocab) < s.top_k)
    ordered_probs = primitives.softmax(jnp.where(in_top_k, ordered, -jnp.inf))
    mass_before = jnp.cumsum(ordered_probs, axis=-1) - ordered_probs
    edge = jnp.min(jnp.where(in_top_k, jnp.abs(mass_before - s.top_p), jnp.inf), axis=-1)
    return jnp.minimum(top_k, jnp.where(s.top_p < 1.0, edge, jnp.inf))


def decision_margin(logits, s: Sampling, u):
    """The margin of `next_token(logits, s, u)`: the smaller of `filter_margin` and `sample_margin`; +inf when
    greedy (greedy decisions are argmaxes, checked strictly)."""
    def sampled(x, s, u):
        return jnp.minimum(filter_margin(x, s), sample_margin(_sampled(x, s), u))

    return lax.cond(s.temperature > 0, sampled, lambda x, s, u: jnp.full(x.shape[:-1], jnp.inf), logits.astype(
        jnp.float32), s, u)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(_MASK64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed: int, call: int, rows: int, width: int) -> np.ndarray:
    """Uniforms [rows, width] in [0, 1) for decoding call `call` (0 = prefill, n = step n).

    u[r, w] = top 24 bits of h / 2^24, with h = sm(sm(sm(sm(seed) ^ call) ^ r) ^ w) and sm = splitmix64 — a pure
    function of (seed, call, row, slot), exactly representable in float32.
    """
    with np.errstate(over="ignore"):
        h = _splitmix64(np.array([seed & _MASK64], np.uint64))
        h = _splitmix64(h ^ np.uint64(call))
        h = _splitmix64(h[:, None] ^ np.arange(rows, dtype=np.uint64)[:, None])
        h = _splitmix64(h ^ np.arange(width, dtype=np.uint64)[None, :])
    return ((h >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)).reshape(rows, width)
