"""The three forward modes agree: training forward (whole sequence, block mask) ≡ incremental decoding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CONFIGS, make
from tandemc import model

TOL = 1e-5  # float32, max |Δlogits|
decode_block = jax.jit(model.decode_block, static_argnums=1)
tandem_forward = jax.jit(model.tandem_forward, static_argnums=(1, 3))  # noqa: E501
forward = jax.jit(model.forward, static_argnums=1)
write_tandem_kv = jax.jit(model.write_tandem_kv)
tandem_kv = jax.jit(model.tandem_kv, static_argnums=1)


def incremental_primary(p, cfg, tokens, chunks):
    cache = model.empty_cache(cfg, tokens.shape[0], tokens.shape[1], jnp.float32)
    out, start = [], 0
    for size in chunks:
        block = tokens[:, start:start + size]
        positions = jnp.broadcast_to(jnp.arange(start, start + block.shape[1]), block.shape)
        logits, _, cache = decode_block(p, cfg, block, positions, cache)
        out.append(logits)
        start += size
    return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_primary_training_forward_matches_block_decoding(name):
    cfg, params = make(CONFIGS[name])
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.primary.vocab_size, (2, 19)))
    full, _ = forward(params["primary"], cfg.primary, tokens)
    chunked = incremental_primary(params["primary"], cfg.primary, tokens, [5, 1, 5, 1, 5, 1, 1])
    assert full.shape == chunked.shape
    assert float(jnp.max(jnp.abs(full - chunked))) <= TOL


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("block", [1, 2, 3, 5])
def test_tandem_training_forward_matches_incremental(name, block):
    """Secondary single-token steps over a cache filled from primary block steps ≡ the block-masked forward."""
    cfg, params = make(CONFIGS[name])
    b, t = 2, 13
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.primary.vocab_size, (b, t)))
    reference = tandem_forward(params, cfg, tokens, block)

    primary_cache = model.empty_cache(cfg.primary, b, t, jnp.float32)
    secondary_cache = model.empty_cache(cfg.secondary, b, t, jnp.float32)
    steps, states = [], None
    for start in range(0, t, block):
        end = min(start + block, t)
        projected, feedback = None, 0.0  # the variant's input: from the primary's state before the block (none for
        # the first), and from the draft before it where primary_state_feedback is on
        if cfg.primary_state_input and states is not None:
            projected = model.primary_state_projection(params, cfg, states)
        for i in range(start, end):  # (c) secondary single-token steps inside the block
            token = tokens[:, i:i + 1]
            offsets = () if projected is None else model.primary_state_input(params, cfg, projected + feedback, token)
            logits, secondary, secondary_cache = decode_block(
                params["secondary"], cfg.secondary, token, jnp.full((b, 1), i), secondary_cache, *offsets,
                io=model.drafter_io(params, "secondary", token))
            if cfg.primary_state_feedback:  # what the next draft of the block adds: this one's last-layer state
                feedback = model.state_feedback(params, cfg, secondary[-1])
            steps.append(logits)
        positions = jnp.broadcast_to(jnp.arange(start, end), (b, end - start))  # (b) primary block step
        _, hiddens, primary_cache = decode_block(params["primary"], cfg.primary, tokens[:, start:end],
                                                       positions, primary_cache)
        secondary_cache = write_tandem_kv(secondary_cache, tandem_kv(params, cfg, hiddens, positions),
                                          jnp.full((b,), start))
        states = [hiddens[source][:, -1:] for source in cfg.state_layers]
    incremental = jnp.concatenate(steps, axis=1)
    assert float(jnp.max(jnp.abs(reference - incremental))) <= TOL


def test_tandem_secondary_depends_on_primary_only_before_its_block():
    """Changing a token inside the current block changes nothing the primary contributes to that block."""
    cfg, params = make(CONFIGS["gqa-4to2"])
    tokens = np.random.default_rng(3).integers(0, cfg.primary.vocab_size, (1, 8))
    base = tandem_forward(params, cfg, jnp.asarray(tokens), 4)
    changed = tokens.copy()
    changed[0, 5] = (changed[0, 5] + 1) % cfg.primary.vocab_size  # block [4, 8)
    other = tandem_forward(params, cfg, jnp.asarray(changed), 4)
    assert float(jnp.max(jnp.abs(base[:, :5] - other[:, :5]))) == 0.0  # causal
    assert float(jnp.max(jnp.abs(base[:, 5:] - other[:, 5:]))) > 1e-3  # the changed token matters
    # ...and a change before the block reaches the block only through the primary: zero the projections and the
    # secondary can no longer see it.
    params_blind = {**params, "tandem": [{"weight": jnp.zeros_like(p["weight"]), "bias": p["bias"]}
                                         for p in params["tandem"]]}
    earlier = tokens.copy()
    earlier[0, 1] = (earlier[0, 1] + 1) % cfg.primary.vocab_size
    a = tandem_forward(params_blind, cfg, jnp.asarray(tokens), 4)
    c = tandem_forward(params_blind, cfg, jnp.asarray(earlier), 4)
    assert float(jnp.max(jnp.abs(a[:, 4:] - c[:, 4:]))) == 0.0
    assert float(jnp.max(jnp.abs(a[:, 1:4] - c[:, 1:4]))) > 1e-3


@pytest.mark.parametrize("state_layers", [(), (1, 2)])
def test_primary_state_input_reads_its_layers_just_before_each_block(state_layers):
    """The variant's extra input at every position of a block comes from the primary's state layers (default: the
    last) at the block's start - 1, and from nowhere else in those layers."""
    cfg, params = make(dataclasses.replace(CONFIGS["custom-map"], primary_state_layers=state_layers))
    assert cfg.state_layers == (state_layers or (cfg.primary.n_layers - 1,))
    assert cfg.primary_state_input and not set(cfg.layer_map) & set(cfg.state_layers)  # K/V never read them
    tokens = jnp.asarray(np.random.default_rng(4).integers(0, cfg.primary.vocab_size, (1, 12)))
    hiddens = jax.jit(model.forward, static_argnums=1)(params["primary"], cfg.primary, tokens)[1]

    def logits_with_layer_bumped(layer, position):
        bumped = list(hiddens)
        bumped[layer] = hiddens[layer].at[:, position].add(1.0)
        return model.tandem_forward(params, cfg, tokens, 4, primary_hiddens=bumped)

    base = model.tandem_forward(params, cfg, tokens, 4, primary_hiddens=hiddens)
    for layer in range(cfg.primary.n_layers):
        for position in range(12):
            changed = np.asarray(jnp.max(jnp.abs(logits_with_layer_bumped(layer, position) - base), axis=-1))[0]
            expected = np.zeros(12, bool)
            if layer in cfg.layer_map:
                expected[(position // 4 + 1) * 4:] = True  # K/V: every later block
            elif layer in cfg.state_layers and position % 4 == 3 and position < 11:
                expected[position + 1:position + 5] = True  # the state: exactly the next block
            np.testing.assert_array_equal(changed > 1e-4, expected, err_msg=f"layer {layer}, position {position}")


def test_default_layer_map_ends_at_last_primary_layer():
    from tandemc.config import default_layer_map

    assert default_layer_map(6, 2) == (2, 5)
    assert default_layer_map(5, 2) == (1, 4)  # L_S does not divide L_L
    assert default_layer_map(3, 3) == (0, 1, 2)
    assert default_layer_map(4, 1) == (3,)


def test_router_outputs_probabilities():
    cfg, params = make(CONFIGS["custom-map"])
    probs = jnp.asarray(np.random.default_rng(0).dirichlet(np.ones(cfg.primary.vocab_size), 5), jnp.float32)
    feats = model.router_features(params, cfg.router, probs)
    assert feats.shape == (5, cfg.router.num_features(cfg.secondary.d_model))
    p = model.router_reject_probability(params["router"], feats)
    assert p.shape == (5,) and bool(jnp.all((p > 0) & (p < 1)))


@pytest.mark.parametrize("rows", [3, 20])  # one dynamic_update_slice per row; above UNROLLED_ROWS, a select
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_writes_put_each_rows_block_at_its_offset_exactly(rows, dtype):
    from jax import lax

    from tandemc.primitives import write_cache

    rng = np.random.default_rng(rows)
    cache = jnp.asarray(rng.normal(size=(rows, 2, 16, 4)), dtype)
    block = jnp.asarray(rng.normal(size=(rows, 3, 2, 4)), dtype)
    start = jnp.asarray(rng.integers(0, 14, size=rows), jnp.int32)
    want = jax.vmap(lambda c, x, s: lax.dynamic_update_slice(c, jnp.swapaxes(x, 0, 1), (0, s, 0)))(cache, block, start)
    got = write_cache(cache, block, start)
    assert got.dtype == cache.dtype and np.array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
