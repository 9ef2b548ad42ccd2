"""The Tandem model in JAX, as pure functions over parameter pytrees.

Both models are Llama-style decoders built from one `layer` function. What differs between the forward modes is
only where a layer's attention gets its keys and values, so `layer` takes an `attend(q, k, v)` callable (queries and
keys not yet rotated: each applies RoPE at its own positions):

- `self_attention`: training, a whole sequence attends to itself causally (the primary, the drafter);
- `tandem_block_attention`: training the secondary; keys before the query's block of γ come from the primary's
  projected representations, keys inside it are the secondary's own;
- `cached_attention`: decoding; the block's keys/values are written into a fixed-size cache [B, KV, S, hd] (the
  layout of Hugging Face's and ONNX Runtime's caches) at their per-row positions and the queries attend over the
  cache, masked by position: one primitive, one fused kernel where a target has one.

In decoding the secondary needs no special layer at all: its cache holds primary-derived keys/values below the
current block (written by `write_tandem_kv` after each verification) and its own inside the block.

Weights may come in the layouts the passes produce (passes/): Q, K, V in one matrix (`wqkv`), SwiGLU gate and up in
one (`w_gate_up`), RMSNorm gains folded away (absent), the tandem projection folded into the secondary's K/V
(`tandem[j].wkv`), and any matrix quantized (`{"q" or "qa": integers, "scale": ...}`, applied by `linear`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from tandemc import primitives
from tandemc.config import DecoderConfig, RouterConfig, TandemConfig

Params = dict
Cache = list  # one {"k": [B, KV, S, hd], "v": [B, KV, S, hd]} per layer
Attend = Callable  # (q [B,T,H,hd], k [B,T,KV,hd], v [B,T,KV,hd]) -> (out [B,T,H*hd], new cache entry or None)


def linear(x, w):
    """x @ w for a float matrix or a quantized one (see passes/quantize.py): {"q", "scale"} weight-only,
    {"qa", "scale"} with the activations quantized to int8 at run time as well, either with an "offset" per block
    (asymmetric: w = q·scale + offset), which adds the block sums of x times the offsets."""
    if not isinstance(w, dict):
        return x @ w
    if "qa" in w:
        y = primitives.int8_activation_matmul(x, w["qa"], w["scale"])
    else:
        y = primitives.dequant_matmul(x, w["q"], w["scale"])
    if "offset" in w:
        y = y + (primitives.block_sums(x, w["offset"].shape[0]) @ w["offset"].astype(x.dtype)).astype(y.dtype)
    return y


def columns(w, start: int):
    """Output columns start.. of a float or quantized matrix."""
    return {k: a[:, start:] for k, a in w.items()} if isinstance(w, dict) else w[:, start:]


def split_last(x, sizes):
    """x [..., sum(sizes)] → the consecutive pieces of the given widths (a fused matmul's outputs)."""
    return jnp.split(x, list(np.cumsum(sizes)[:-1]), axis=-1)


def rms_norm(x, weight, eps):
    """RMSNorm in float32; `weight=None` is the parameter-free normalisation used before the tandem projection."""
    return primitives.rms_norm(x, jnp.ones(x.shape[-1], jnp.float32) if weight is None else weight, eps)


rope = primitives.rope  # rotary embedding, rotate-half convention (as Llama): x [B, T, N, hd] at positions [B, T]


def qkv(p, cfg: DecoderConfig, h):
    """Q, K and V of a layer, before RoPE: [B, T, heads, hd] each."""
    b, t, _ = h.shape
    widths = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim)
    if "wqkv" in p:
        q, k, v = split_last(linear(h, p["wqkv"]), widths)
    else:
        q, k, v = linear(h, p["wq"]), linear(h, p["wk"]), linear(h, p["wv"])
    return heads(q, cfg.n_heads, cfg), heads(k, cfg.n_kv_heads, cfg), heads(v, cfg.n_kv_heads, cfg)


def heads(x, n, cfg: DecoderConfig, positions=None):
    """[B, T, n*hd] → [B, T, n, hd], rotated when positions are given."""
    x = x.reshape(*x.shape[:2], n, cfg.head_dim)
    return x if positions is None else rope(x, positions, cfg.rope_theta)


def mlp(p, h):
    """SwiGLU: down(silu(gate h) * up h), gate and up in one matmul when fused."""
    if "w_gate_up" in p:
        gate, up = jnp.split(linear(h, p["w_gate_up"]), 2, axis=-1)
    else:
        gate, up = linear(h, p["w_gate"]), linear(h, p["w_up"])
    return linear(jax.nn.silu(gate) * up, p["w_down"])


attention = primitives.attention  # grouped-query attention with a boolean visibility mask [B, T, S]


def layer(p, cfg: DecoderConfig, x, attend: Attend):
    """One pre-norm decoder layer: x + attention, then x + SwiGLU MLP."""
    h = rms_norm(x, p.get("attn_norm"), cfg.norm_eps)
    out, extra = attend(*qkv(p, cfg, h))
    x = x + linear(out, p["wo"])
    h = rms_norm(x, p.get("mlp_norm"), cfg.norm_eps)
    return x + mlp(p, h), extra


def decoder(p, cfg: DecoderConfig, tokens, attends: list[Attend], input_offset=None, logit_offset=None,
            embedded=None, head=None):
    """Tokens [B, T] → (float32 logits [B, T, V], residual stream after each layer, per-layer attend extras).

    `input_offset` [B, T, D] and `logit_offset` [B, T, V], when given, are added to the token embeddings and to the
    logits (the primary-state-input variant). `embedded` (the embeddings, instead of looking tokens up in
    p["embed"]) and `head` (a factored LM head: {"proj", "table"[, "other"]}) are how drafters read and write
    tokens (`drafter_io`)."""
    x = primitives.embed(p["embed"], tokens) if embedded is None else embedded
    if input_offset is not None:
        x = x + input_offset.astype(x.dtype)
    hiddens, extras = [], []
    for lp, attend in zip(p["layers"], attends):
        x, extra = layer(lp, cfg, x, attend)
        hiddens.append(x)
        extras.append(extra)
    normed = rms_norm(x, p.get("final_norm"), cfg.norm_eps)
    if head is not None:
        z = linear(normed, head["proj"])
        logits = linear(z, head["table"])
        if "other" in head:
            logits = jnp.concatenate([logits, linear(z, head["other"])], axis=-1)
    else:
        logits = linear(normed, p["embed"].T if cfg.tie_embeddings else p["lm_head"])
    if logit_offset is not None:
        logits = logits + logit_offset.astype(logits.dtype)
    return logits.astype(jnp.float32), hiddens, extras


# --- how drafters read and write tokens (config.draft_vocab, config.shared_embeddings) ------------------------

def drafter_embed(params: Params, name: str, tokens):
    """Primary token ids [...] → drafter `name`'s input embeddings [..., d]: from its own table (of `draft_ids`), or
    with shared_embeddings from the primary's table through its embed_proj."""
    p = params[name]
    if "embed_proj" in p:
        return linear(primitives.embed(params["primary"]["embed"], tokens), p["embed_proj"])
    return primitives.embed(p["embed"], draft_ids(params, tokens))


def _shared_head(params: Params, p) -> dict:
    """shared_embeddings: the LM head as head_proj, then the primary's table over the draft vocabulary (its tokens'
    rows, materialised once as draft_vocab.head in exported programs, and `other` for the id of all other tokens)
    or over the whole vocabulary."""
    table, vocab = params["primary"]["embed"], params.get("draft_vocab")
    if vocab is None:
        return {"proj": p["head_proj"], "table": table.T}
    head = vocab["head"] if "head" in vocab else jnp.take(table, vocab["tokens"], axis=0).T
    return {"proj": p["head_proj"], "table": head, "other": p["other"][:, None]}


def shared_head_matrix(params: Params, name: str) -> np.ndarray:
    """Drafter `name`'s factored head as one float64 matrix [d, N + 1] (or [d, V] without a draft vocabulary):
    head_proj times the primary's rows of the draft tokens, and its `other` column. Exact as a product, and it
    reads a d × N matrix per draft instead of d × d_primary plus d_primary × N (passes: fold_draft_head;
    hf.plain_drafter)."""
    head = _shared_head(params, params[name])
    table = np.asarray(head["table"], np.float64)
    if "other" in head:
        table = np.concatenate([table, np.asarray(head["other"], np.float64)], axis=1)
    return np.asarray(head["proj"], np.float64) @ table


def drafter_io(params: Params, name: str, tokens) -> dict:
    """How drafter `name` (secondary or drafter) reads primary token ids and writes logits over its own ids:
    keyword arguments for `decoder` (arrays only, so they pass through jit)."""
    p = params[name]
    io = {"embedded": drafter_embed(params, name, tokens)}
    if "head_proj" in p:
        io["head"] = _shared_head(params, p)
    return io


def primary_ids(params: Params, ids):
    """The drafters' ids → primary ids (the id of all other tokens maps to the last draft token; it is never
    proposed)."""
    vocab = params.get("draft_vocab")
    return ids if vocab is None else primitives.embed(vocab["tokens"], jnp.minimum(ids, vocab["tokens"].shape[0] - 1))


def draft_ids(params: Params, tokens):
    """Primary token ids → the drafters' ids: the same without a draft vocabulary; with one, each token's position
    in it, or N (the one id of all other tokens)."""
    vocab = params.get("draft_vocab")
    return tokens if vocab is None else primitives.embed(vocab["index"], tokens)


def proposable(params: Params, logits):
    """A drafter's logits with the id of the tokens outside the draft vocabulary masked: it is never proposed."""
    if "draft_vocab" not in params:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < logits.shape[-1] - 1, logits, -jnp.inf)


def draft_space(params: Params, probs):
    """The primary's distributions [..., V] over the drafters' ids [..., N+1]: the draft tokens' probabilities and
    the rest's total in the last id; unchanged without a draft vocabulary."""
    vocab = params.get("draft_vocab")
    if vocab is None:
        return probs
    kept = jnp.take(probs, vocab["tokens"], axis=-1)
    return jnp.concatenate([kept, jnp.maximum(1.0 - jnp.sum(kept, axis=-1, keepdims=True), 0.0)], axis=-1)


# --- where keys and values come from -------------------------------------------------------------------------

def causal_mask(query_pos, key_pos):
    return key_pos[:, None, :] <= query_pos[:, :, None]


def by_head(x):
    """[B, T, KV, hd] → [B, KV, T, hd], the layout `attention` takes keys and values in."""
    return jnp.swapaxes(x, 1, 2)


QUERY_CHUNKS = 8


def causal_attention(q, segments):
    """`attention` of a whole training sequence whose masks hide every key at a later position than the query.

    `segments` are (k [B, T, KV, hd], v, mask [B, T, T]) over the same T positions, their keys side by side. The
    queries go in QUERY_CHUNKS chunks, each against the keys up to its own end only, so the hidden upper triangle is
    never computed: the same result for ~56% of the work (the example primary's CPU training step: 3.95 s →
    3.09 s)."""
    t = q.shape[1]
    bounds = sorted({-(-t * i // QUERY_CHUNKS) for i in range(QUERY_CHUNKS + 1)})
    outs = []
    for lo, hi in zip(bounds, bounds[1:]):
        keys = by_head(jnp.concatenate([k[:, :hi] for k, _, _ in segments], axis=1))
        values = by_head(jnp.concatenate([v[:, :hi] for _, v, _ in segments], axis=1))
        mask = jnp.concatenate([m[:, lo:hi, :hi] for _, _, m in segments], axis=-1)
        outs.append(attention(q[:, lo:hi], keys, values, mask))
    return jnp.concatenate(outs, axis=1)


def self_attention(positions, theta) -> Attend:
    def attend(q, k, v):
        q, k = rope(q, positions, theta), rope(k, positions, theta)
        return causal_attention(q, [(k, v, causal_mask(positions, positions))]), None
    return attend


def tandem_block_attention(k_primary, v_primary, positions, start, theta) -> Attend:
    """Query at position i sees primary-derived keys at positions < start[i] (its block's first position, ≤ i) and
    its own keys at start[i]..i."""
    def attend(q, k, v):
        q, k = rope(q, positions, theta), rope(k, positions, theta)
        from_primary = positions[:, None, :] < start[:, :, None]
        own = (positions[:, None, :] >= start[:, :, None]) & causal_mask(positions, positions)
        return causal_attention(q, [(k_primary, v_primary, from_primary), (k, v, own)]), None
    return attend


def cached_attention(entry, start, theta) -> Attend:
    """The block's tokens sit at start[b].. of each row: rotate, write K/V into the cache there, attend over it."""
    def attend(q, k, v):
        out, ck, cv = primitives.cached_attention(q, k, v, entry["k"], entry["v"], start, theta)
        return out, {"k": ck, "v": cv}
    return attend


# --- forward modes --------------------------------------------------------------------------------------------

def sequence_positions(tokens):
    b, t = tokens.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def forward(p, cfg: DecoderConfig, tokens, embedded=None, head=None):
    """Training forward of a plain decoder (the primary; a drafter through `drafter_forward`): logits and
    per-layer residual streams."""
    positions = sequence_positions(tokens)
    logits, hiddens, _ = decoder(p, cfg, tokens, [self_attention(positions, cfg.rope_theta)] * cfg.n_layers,
                                 embedded=embedded, head=head)
    return logits, hiddens


def drafter_forward(params: Params, cfg: TandemConfig, name: str, tokens):
    """Training forward of a drafter on its own (the standalone drafter; the secondary before tandem training)
    over primary token ids: logits over its ids and per-layer residual streams."""
    return forward(params[name], getattr(cfg, name), tokens, **drafter_io(params, name, tokens))


def tandem_kv(params: Params, cfg: TandemConfig, primary_hiddens, positions):
    """Per secondary layer j: K, V = W_k, W_v applied to FF_j(rms(h_primary^{ℓ(j)})), RoPE at own positions."""
    out, s = [], cfg.secondary
    kv_width = s.n_kv_heads * s.head_dim
    for j, source in enumerate(cfg.layer_map):
        h = rms_norm(primary_hiddens[source], None, cfg.primary.norm_eps)
        proj, layer_p = params["tandem"][j], params["secondary"]["layers"][j]
        if "wkv" in proj:  # fold_projection: W_kv' = FF_j · W_kv, b' = b · W_kv
            k, v = split_last(linear(h, proj["wkv"]) + proj["bkv"], (kv_width, kv_width))
        else:
            y = linear(h, proj["weight"]) + proj["bias"]
            if "wqkv" in layer_p:  # the K and V columns of the fused matrix
                k, v = split_last(linear(y, columns(layer_p["wqkv"], s.n_heads * s.head_dim)), (kv_width, kv_width))
            else:
                k, v = linear(y, layer_p["wk"]), linear(y, layer_p["wv"])
        out.append((heads(k, s.n_kv_heads, s, positions), heads(v, s.n_kv_heads, s)))
    return out


def primary_layers_read(cfg: TandemConfig) -> tuple[int, ...]:
    """The primary layers whose residual streams the tandem secondary reads: the layer map's, and the state layers
    where the primary-state-input variant is on."""
    state = cfg.state_layers if cfg.primary_state_input else ()
    return tuple(sorted(set(cfg.layer_map) | set(state)))


def tandem_forward(params: Params, cfg: TandemConfig, tokens, block: int | None = None, primary_hiddens=None,
                   block_starts=None):
    """Training forward of the tandem secondary; returns its logits [B, T, V].

    Blocks are fixed, of γ = `block` (default γ_train) tokens, unless `block_starts` [B, T] gives each position's
    block start k explicitly (as decoding produces them, wherever verification stopped; blocks of at most `block`
    tokens). `primary_hiddens` maps each layer in `primary_layers_read` to its residual stream (a list of all
    layers will do).
    """
    positions = sequence_positions(tokens)
    block = block or cfg.gamma_train
    if block_starts is None:
        block_starts = (positions // block) * block
    if primary_hiddens is None:
        primary_hiddens = forward(params["primary"], cfg.primary, tokens)[1]
    attends = [tandem_block_attention(k, v, positions, block_starts, cfg.secondary.rope_theta)
               for k, v in tandem_kv(params, cfg, primary_hiddens, positions)]
    io = drafter_io(params, "secondary", tokens)
    if not cfg.primary_state_input:
        return decoder(params["secondary"], cfg.secondary, tokens, attends, **io)[0]
    # Each position reads the state at its block start - 1 (nothing in the first block, which has none).
    before = jnp.maximum(block_starts - 1, 0)[..., None]
    states = [jnp.take_along_axis(primary_hiddens[source], before, axis=1) for source in cfg.state_layers]
    projected = primary_state_projection(params, cfg, states)
    after_first_block = (block_starts > 0)[..., None]

    def run(projected):
        offsets = primary_state_input(params, cfg, projected, tokens)
        offsets = tuple(None if o is None else o * after_first_block for o in offsets)
        logits, hiddens, _ = decoder(params["secondary"], cfg.secondary, tokens, attends, *offsets, **io)
        return logits, hiddens

    logits, hiddens = run(projected)
    if cfg.primary_state_feedback:
        # A draft reads its predecessor's last-layer state, which depends on what that one read: unrolled, pass n
        # is exact for the first n + 1 drafts of every block, as sequential drafting computes them.
        in_block = (positions > block_starts)[..., None]
        for _ in range(block - 1):
            previous = jnp.pad(hiddens[-1][:, :-1], ((0, 0), (1, 0), (0, 0)))
            logits, hiddens = run(projected + in_block * state_feedback(params, cfg, previous))
    return logits


def state_feedback(params: Params, cfg: TandemConfig, secondary_state):
    """What a draft adds to the projected primary state (`primary_state_feedback`): the secondary's last-layer
    residual stream at the draft before it, rms-normalised, @ w_feedback [d_secondary, primary_state_input]."""
    p = params["tandem_input"]
    return linear(rms_norm(secondary_state, None, cfg.secondary.norm_eps).astype(p["w_feedback"].dtype),
                  p["w_feedback"])


def _state_rows(cfg: TandemConfig) -> int:
    """Where w_in splits: its first rows read the primary's state layers, the rest the token's embedding."""
    return len(cfg.state_layers) * cfg.primary.d_model


def primary_state_projection(params: Params, cfg: TandemConfig, states):
    """The half of the variant's MLP that reads the primary's state: [rms(h_1), ..] @ w_in[:n·d_primary] + b_in
    [..., primary_state_input], with states = [h_1, ..] [..., d_primary] the primary's residual streams of
    `cfg.state_layers` at the position just before the block (the freshest thing the primary knows when drafting
    starts). It is fixed for a block, so decoding computes it once per block rather than once per draft."""
    p = params["tandem_input"]
    h = jnp.concatenate([rms_norm(x, None, cfg.primary.norm_eps) for x in states], axis=-1).astype(p["w_in"].dtype)
    return linear(h, p["w_in"][:_state_rows(cfg)]) + p["b_in"]


def primary_state_input(params: Params, cfg: TandemConfig, projected, tokens):
    """The variant's extra secondary inputs: z = silu([rms(h_1), .., e(token)] @ w_in + b_in), from `projected`
    (`primary_state_projection` of h) and e, the secondary's embedding of the token being read; returns
    (z @ w_out [..., d_secondary] for the embedding, z @ w_logits [..., vocab] for the logits, or None where
    `primary_state_logits` is off)."""
    p = params["tandem_input"]
    embedded = drafter_embed(params, "secondary", tokens)
    z = jax.nn.silu(projected + linear(embedded, p["w_in"][_state_rows(cfg):]))
    return linear(z, p["w_out"]), (linear(z, p["w_logits"]) if cfg.primary_state_logits else None)


def empty_cache(cfg: DecoderConfig, batch: int, length: int, dtype) -> Cache:
    shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers)]


def decode_block(p, cfg: DecoderConfig, tokens, positions, cache: Cache, input_offset=None, logit_offset=None,
                 io: dict | None = None):
    """Decoding forward of T tokens per row at contiguous positions: (logits, hiddens, updated cache). `io`: a
    drafter's `drafter_io`."""
    start = positions[:, 0]
    attends = [cached_attention(entry, start, cfg.rope_theta) for entry in cache]
    return decoder(p, cfg, tokens, attends, input_offset, logit_offset, **(io or {}))


def write_tandem_kv(cache: Cache, kvs, start) -> Cache:
    """Overwrite the secondary cache at start.. with primary-derived keys/values."""
    return [{"k": primitives.write_cache(e["k"], k, start), "v": primitives.write_cache(e["v"], v, start)}
            for e, (k, v) in zip(cache, kvs)]


# --- adaptive block length ------------------------------------------------------------------------------------

def router_features(params: Params, cfg: RouterConfig, probs):
    """The secondary's entropy, its top-k probabilities and the secondary's embeddings of those top-k tokens."""
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.maximum(probs, 1e-30)), 0.0), axis=-1)
    top_p, top_i = lax.top_k(probs, cfg.top_k)
    emb = drafter_embed(params, "secondary", primary_ids(params, top_i))
    emb = emb.astype(jnp.float32).reshape(*probs.shape[:-1], -1)
    return jnp.concatenate([entropy[..., None], top_p, emb], axis=-1)


def router_reject_probability(p, features):
    """2-layer MLP → probability that the draft at this position will be rejected."""
    h = jax.nn.relu(features @ p["w1"] + p["b1"])
    return jax.nn.sigmoid((h @ p["w2"] + p["b2"])[..., 0])
