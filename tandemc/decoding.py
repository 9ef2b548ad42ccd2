"""Reference decoding: the ground truth every compiled target is checked against.

Decoding is two pure functions over an explicit state at fixed shapes — `prefill` and `step` — driven by a
Python loop in `generate`. The same functions are what later stages trace into static graphs.

State (per row b of a fixed batch):
    token[b]     the last committed token c, not yet seen by the primary
    pos[b]       its position p
    prev[b]      the token at p-1 (the standalone drafter re-reads it; see `step`)
    generated[b] tokens emitted so far;  limit[b] the row's max_new_tokens;  done[b]
    primary, secondary: KV caches [B, S, n_kv, head_dim] per layer (the secondary's slot holds the
    tandem secondary's cache, or the standalone drafter's in `vanilla` mode)

One `step` at block length γ (design.md §1): the drafter proposes d_1..d_γ from c; the primary verifies
[c, d_1..d_γ] at p..p+γ in one block; a = accepted prefix length (speculative rejection sampling, which is
exact greedy verification when temperature is 0); emit d_1..d_a and the primary's token y at p+a+1; the
tandem secondary's cache at p..p+γ is overwritten with primary-derived keys/values (entries past p+a are stale,
masked by position and overwritten later).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from tandemc import model, primitives
from tandemc.config import TandemConfig
from tandemc.errors import TandemcError
from tandemc.sampling import (Sampling, decision_margin, draft_token, filter_margin, next_token, sample,
                              sample_margin, token_distribution, uniforms)

MODES = ("speed", "tandem", "adaptive", "primary", "vanilla")
TANDEM_MODES = ("speed", "tandem", "adaptive")  # modes drafting with the tandem secondary


def drafter_name(mode: str) -> str | None:
    """Which model drafts in `mode`: the tandem secondary, the standalone drafter, or none."""
    return {"primary": None, "vanilla": "drafter"}.get(mode, "secondary")


def drafter_config(cfg: TandemConfig, mode: str):
    name = drafter_name(mode)
    return getattr(cfg, name) if name else None


def init_state(cfg: TandemConfig, mode: str, batch: int, cache_len: int) -> dict:
    """The decode state before the first prefill call: all zeros (`prefill` sets each row's limit)."""
    dtype = jnp.dtype(cfg.dtype)
    draft_cfg = drafter_config(cfg, mode)

    def zeros():  # a fresh buffer per field: the state is donated, and a donated buffer must appear once
        return jnp.zeros((batch,), jnp.int32)

    state = {
        "token": zeros(), "pos": zeros(), "prev": zeros(), "generated": zeros(), "limit": zeros(),
        "done": jnp.zeros((batch,), bool),
        "primary": model.empty_cache(cfg.primary, batch, cache_len, dtype),
        "secondary": model.empty_cache(draft_cfg, batch, cache_len, dtype) if draft_cfg else [],
    }
    if reads_primary_state(cfg, mode):  # the drafts' extra input, from the primary's state before the block
        state["primary_state"] = jnp.zeros((batch, cfg.primary_state_input), dtype)
    return state


def reads_primary_state(cfg: TandemConfig, mode: str) -> bool:
    return mode in TANDEM_MODES and cfg.primary_state_input > 0


def block_state(params, cfg: TandemConfig, hiddens, rows):
    """The variant's projected primary state for the next block: the state layers' streams at `rows` [B]."""
    return model.primary_state_projection(params, cfg, [primitives.take_rows(hiddens[source], rows)
                                                        for source in cfg.state_layers])


def prefill(params, cfg: TandemConfig, mode: str, state, tokens, start, lengths, limit, u, sampling: Sampling,
            eos_id, margins: bool = False):
    """Run one chunk of prompts through the primary and fill the drafter's cache.

    tokens [B, C] sit at positions start[b]..start[b]+C-1 of prompts whose full lengths are lengths[b]; a row whose
    last prompt token falls in this chunk picks its first token from the primary there (uniform u[:, 0]) and is
    ready to step, with limit[b] new tokens allowed (0 marks an unused row, done at once). Calling with chunks in
    order (start 0, C, 2C, ...) is the same as one call over the whole prompt; positions past a row's prompt get
    scratch keys/values that decoding overwrites before any query can see them. `margins` (the reference, for
    `verify`): state["margin"] gets each row's first-token `decision_margin`.
    """
    b, t = tokens.shape
    positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)
    with jax.named_scope("primary"):
        logits, hiddens, primary_cache = model.decode_block(params["primary"], cfg.primary, tokens, positions,
                                                             state["primary"])
    secondary_cache = state["secondary"]
    if mode in TANDEM_MODES:
        with jax.named_scope("tandem_kv"):
            secondary_cache = model.write_tandem_kv(secondary_cache, model.tandem_kv(params, cfg, hiddens, positions),
                                                    start)
    elif mode == "vanilla":
        with jax.named_scope("drafter"):
            _, _, secondary_cache = model.decode_block(params["drafter"], cfg.drafter, tokens, positions,
                                                       secondary_cache, io=model.drafter_io(params, "drafter", tokens))
    last = lengths - 1 - start
    ends_here = (last >= 0) & (last < t)
    last = jnp.clip(last, 0, t - 1)
    first = next_token(primitives.take_rows(logits, last), sampling, u[:, 0])
    generated = jnp.ones((b,), jnp.int32)

    def pick(new, old):
        return jnp.where(ends_here.reshape((b,) + (1,) * (new.ndim - 1)), new, old)

    new_state = {
        **state, "token": pick(first, state["token"]), "pos": pick(lengths.astype(jnp.int32), state["pos"]),
        "prev": pick(primitives.take_rows(tokens, last), state["prev"]),
        "generated": pick(generated, state["generated"]),
        "limit": pick(limit.astype(jnp.int32), state["limit"]),
        "done": pick((first == eos_id) | (generated >= limit), state["done"]),
        "primary": primary_cache, "secondary": secondary_cache,
    }
    if margins:
        new_state["margin"] = pick(decision_margin(primitives.take_rows(logits, last), sampling, u[:, 0]),
                                   state["margin"])
    if reads_primary_state(cfg, mode):
        new_state["primary_state"] = pick(block_state(params, cfg, hiddens, last), state["primary_state"])
    return new_state


def step(params, cfg: TandemConfig, mode: str, gamma: int, state, u, sampling: Sampling, eos_id,
         margins: bool = False):
    """One draft-verify iteration. u [B, 2γ+1]: γ for drafting, γ for acceptance, 1 for the final token.

    Returns (new state, outputs): emitted [B, γ+1], n_emitted [B], accepted [B], drafted [B] and the primary's
    logits [B, γ+1, V] over the verified block; row b's new tokens are emitted[b, :n_emitted[b]]. Rows already
    done keep their state and emit nothing. In `adaptive` mode drafting stops at the first draft the router
    predicts will be rejected (γ is then the maximum block length); the remaining drafts are skipped, not computed,
    once every active row has stopped. `margins` (the reference, for `verify`) adds
    outputs["margin"] [B]: the smallest margin of the step's decisions that shaped its tokens (`step_margin`).
    """
    b = state["token"].shape[0]
    c, p, active = state["token"], state["pos"], ~state["done"]
    draft_cfg = drafter_config(cfg, mode)
    draft_params = params[drafter_name(mode)] if draft_cfg else None
    secondary_cache = state["secondary"]

    drafts, draft_probs, draft_margins, router_margins = [], [], [], []
    n_drafted = jnp.full((b,), gamma, jnp.int32)
    if gamma > 0:
        if mode == "vanilla":
            # The drafter never saw d_γ when the whole previous draft was accepted: re-read the token at p-1
            # (a harmless rewrite of identical keys/values otherwise).
            tokens, positions = jnp.stack([state["prev"], c], 1), jnp.stack([p - 1, p], 1)
        else:
            tokens, positions = c[:, None], p[:, None]

        def draft(t, tokens, positions, secondary_cache, n_drafted, projected):
            """One draft: (token, its distribution, its decision margin, the router's margin, cache, n_drafted,
            the projected primary state the next draft reads)."""
            offsets = (model.primary_state_input(params, cfg, projected[:, None], tokens)
                       if reads_primary_state(cfg, mode) else ())
            logits, hiddens, secondary_cache = model.decode_block(
                draft_params, draft_cfg, tokens, positions, secondary_cache, *offsets,
                io=model.drafter_io(params, drafter_name(mode), tokens))
            proposal = model.proposable(params, logits[:, -1])
            d, q = draft_token(proposal, sampling, u[:, t], params.get("draft_vocab"))
            margin = decision_margin(proposal, sampling, u[:, t]) if margins else jnp.zeros((b,), jnp.float32)
            router_margin = jnp.zeros((b,), jnp.float32)
            if mode == "adaptive":  # stop drafting at the first draft the router expects to be rejected
                features = model.router_features(params, cfg.router, jax.nn.softmax(proposal))
                probability = model.router_reject_probability(params["router"], features)
                n_drafted = jnp.where((n_drafted == gamma) & (probability > cfg.router.threshold), t, n_drafted)
                router_margin = jnp.abs(probability - cfg.router.threshold).reshape(b)
            if reads_primary_state(cfg, mode) and cfg.primary_state_feedback:
                projected = state["primary_state"] + model.state_feedback(params, cfg, hiddens[-1][:, -1])
            return d, q, margin, router_margin, secondary_cache, n_drafted, projected

        def skip(t, tokens, positions, secondary_cache, n_drafted, projected):
            """A draft not computed (adaptive, every row stopped): token 0 with no distribution, never proposed."""
            zero = jnp.zeros((b,), jnp.float32)
            q = jnp.zeros((b, draft_probs[0].shape[-1]), draft_probs[0].dtype)
            return jnp.zeros((b,), jnp.int32), q, zero, zero, secondary_cache, n_drafted, projected

        projected = state.get("primary_state")  # what the first draft reads (None: no primary-state input)
        for t in range(gamma):
            with jax.named_scope(f"draft{t}"):  # names the graph's nodes, so profiles show each draft's cost
                if mode == "adaptive" and t > 0:
                    # Once the router has stopped every row, the remaining drafts are never computed: a
                    # conditional (ONNX If, StableHLO case) skips them, which is where adaptive length saves time.
                    drafting = jnp.any(active & (n_drafted == gamma))
                    d, q, margin, router_margin, secondary_cache, n_drafted, projected = lax.cond(
                        drafting, lambda *a, t=t: draft(t, *a), lambda *a, t=t: skip(t, *a),
                        tokens, positions, secondary_cache, n_drafted, projected)
                else:
                    d, q, margin, router_margin, secondary_cache, n_drafted, projected = draft(
                        t, tokens, positions, secondary_cache, n_drafted, projected)
            drafts.append(d)
            draft_probs.append(q)
            draft_margins.append(margin)
            if mode == "adaptive":
                router_margins.append(router_margin)
            tokens, positions = d[:, None], (p + t + 1)[:, None]

    block = jnp.stack([c] + drafts, axis=1)
    block_pos = p[:, None] + jnp.arange(gamma + 1, dtype=jnp.int32)
    with jax.named_scope("verify"):
        logits, hiddens, primary_cache = model.decode_block(params["primary"], cfg.primary, block, block_pos,
                                                            state["primary"])
    if gamma > 0:
        d = jnp.stack(drafts, axis=1)
        proposed = jnp.arange(gamma)[None, :] < n_drafted[:, None]
        accept_all = mode == "tandem"
        a, y = lax.cond(sampling.temperature > 0,
                        lambda *args: accept_sampled(*args, accept_all=accept_all),
                        lambda *args: accept_greedy(*args, accept_all=accept_all),
                        logits.astype(jnp.float32), d, jnp.stack(draft_probs, axis=1), proposed, u, sampling)
        padded = jnp.concatenate([d, jnp.zeros((b, 1), jnp.int32)], axis=1)
        emitted = jnp.where(jnp.arange(gamma + 1) < a[:, None], padded, y[:, None])
        new_prev = jnp.where(a > 0, primitives.take_rows(padded, jnp.maximum(a - 1, 0)), c)
    else:  # primary only: one token from the primary's distribution
        a = jnp.zeros((b,), jnp.int32)
        y = next_token(logits[:, 0], sampling, u[:, 0])
        emitted, new_prev = y[:, None], c
    n_emitted = a + 1
    if margins:
        margin = step_margin(logits, drafts, draft_probs, draft_margins, router_margins, n_drafted, a, u, sampling,
                             accept_all=mode == "tandem")
    slots = jnp.arange(gamma + 1)

    if mode in TANDEM_MODES:
        with jax.named_scope("tandem_kv"):
            secondary_cache = model.write_tandem_kv(secondary_cache, model.tandem_kv(params, cfg, hiddens, block_pos),
                                                    p)

    new_state_extra = {}
    if reads_primary_state(cfg, mode):  # the next block starts after y: keep the state at the last kept position
        new_state_extra["primary_state"] = jnp.where(
            active[:, None], block_state(params, cfg, hiddens, a), state["primary_state"])

    hit_eos = jnp.any((slots < n_emitted[:, None]) & (emitted == eos_id), axis=1)
    generated = state["generated"] + jnp.where(active, n_emitted, 0)
    new_state = {
        **state,
        "token": jnp.where(active, y, c), "pos": jnp.where(active, p + n_emitted, p),
        "prev": jnp.where(active, new_prev, state["prev"]), "generated": generated,
        "done": state["done"] | (active & (hit_eos | (generated >= state["limit"]))),
        "primary": primary_cache, "secondary": secondary_cache, **new_state_extra,
    }
    outputs = {"emitted": emitted, "n_emitted": jnp.where(active, n_emitted, 0), "accepted": jnp.where(active, a, 0),
               "drafted": jnp.where(active, n_drafted, 0), "logits": logits}
    if margins:
        outputs["margin"] = jnp.where(active, margin, jnp.inf)
    return new_state, outputs


def step_margin(logits, drafts, draft_probs, draft_margins, router_margins, n_drafted, a, u, sampling: Sampling, *,
                accept_all: bool):
    """The smallest margin [B] among the decisions that shaped a step's tokens: each draft up to the first
    rejection (its sampling, and in adaptive mode the router's threshold), each acceptance test up to the first
    rejection (|log(u·q(d)) − log p(d)|), the primary's top-k/top-p filters at those positions and the final
    token's sampling. Margins are +inf under greedy decoding, whose decisions are argmaxes checked strictly."""
    gamma = len(drafts)
    b = a.shape[0]
    if gamma == 0:  # primary mode: one token from the primary
        return decision_margin(logits[:, 0], sampling, u[:, 0])
    proposed = jnp.arange(gamma)[None, :] < n_drafted[:, None]
    # drafts up to and including the first rejected one
    decisive = (jnp.arange(gamma)[None, :] <= a[:, None]) & proposed
    margin = jnp.min(jnp.where(decisive, jnp.stack(draft_margins, axis=1), jnp.inf), axis=1)
    if router_margins:  # the router decided at every draft up to the one where drafting stopped
        routed = jnp.arange(gamma)[None, :] <= jnp.minimum(n_drafted, gamma - 1)[:, None]
        margin = jnp.minimum(margin, jnp.min(jnp.where(routed, jnp.stack(router_margins, axis=1), jnp.inf), axis=1))

    def sampled(logits, d, q, u, a, sampling):
        target = token_distribution(logits, sampling)  # as accept_sampled computes it
        p_d, q_d = draft_probabilities(target, q, d)
        tests = jnp.abs(jnp.log(u[:, gamma:2 * gamma] * q_d) - jnp.log(p_d))
        tests = jnp.min(jnp.where(decisive & (not accept_all), tests, jnp.inf), axis=1)
        filters = jnp.min(jnp.where(jnp.arange(gamma + 1)[None, :] <= a[:, None], filter_margin(logits, sampling),
                                    jnp.inf), axis=1)
        final = sample_margin(final_distribution(target, q, proposed, a), u[:, 2 * gamma])
        return jnp.minimum(jnp.minimum(tests, filters), final)

    accepted = lax.cond(sampling.temperature > 0, sampled, lambda *args: jnp.full((b,), jnp.inf),
                        logits.astype(jnp.float32), jnp.stack(drafts, axis=1), jnp.stack(draft_probs, axis=1), u, a,
                        sampling)
    return jnp.minimum(margin, accepted)


def first_reject(accept):
    """The number of leading accepts [B]: the index of the first reject, with a sentinel reject at the end."""
    sentinel = jnp.ones((accept.shape[0], 1), bool)
    return jnp.argmax(jnp.concatenate([~accept, sentinel], axis=1).astype(jnp.int32), axis=1).astype(jnp.int32)


def accept_greedy(logits, d, q, proposed, u, sampling: Sampling, *, accept_all: bool):
    """Greedy verification: accept the drafts that equal the primary's argmax; the final token is the primary's
    argmax after the last accepted one. Exactly `accept_sampled` with one-hot distributions (u < 1 accepts a draft
    iff the primary's one-hot is 1 there; the residual of two different one-hots is the primary's), computed
    without any distribution."""
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, γ+1]
    gamma = d.shape[1]
    accept = jnp.ones_like(proposed) if accept_all else (d == best[:, :gamma]) & proposed
    a = first_reject(accept)
    return a, primitives.take_rows(best, a)


def accept_sampled(logits, d, q, proposed, u, sampling: Sampling, *, accept_all: bool):
    """Leviathan et al. rejection sampling over the block: accept d_t when u·q(d_t) < p(d_t); at the first
    rejection draw from norm(max(0, p − q)), after all accepted from p (the bonus token)."""
    gamma = d.shape[1]
    target = token_distribution(logits, sampling)  # [B, γ+1, V]; target[:, j] predicts position p+j+1
    p_d, q_d = draft_probabilities(target, q, d)
    accept = jnp.ones_like(proposed) if accept_all else (u[:, gamma:2 * gamma] * q_d < p_d) & proposed
    a = first_reject(accept)
    return a, sample(final_distribution(target, q, proposed, a), u[:, 2 * gamma])


def draft_probabilities(target, q, d):
    """p(d_t) and q(d_t) [B, γ]: each draft's probability under the primary's and the drafter's distributions."""
    gamma = d.shape[1]
    return (primitives.take_along_last(target[:, :gamma], d[..., None])[..., 0],
            primitives.take_along_last(q, d[..., None])[..., 0])


def final_distribution(target, q, proposed, a):
    """The distribution the step's last token is drawn from [B, V]: norm(max(0, p − q)) at the first rejection,
    p itself after all proposed drafts were accepted. Drafts never proposed contribute no q: after an early stop
    the final token comes from p."""
    b = a.shape[0]
    q_ext = jnp.concatenate([jnp.where(proposed[..., None], q, 0.0), jnp.zeros((b, 1, q.shape[-1]), q.dtype)], axis=1)
    p_a, q_a = primitives.take_rows(target, a), primitives.take_rows(q_ext, a)
    residual = jnp.maximum(p_a - q_a, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    return jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_a)


@dataclass
class Stats:
    """Counts over all rows of one generate call."""

    steps: int = 0  # draft-verify iterations (calls of `step`)
    row_steps: int = 0  # iterations summed over rows that were still generating
    drafted: int = 0
    accepted: int = 0
    new_tokens: int = 0

    def __add__(self, other: "Stats") -> "Stats":
        return Stats(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def as_dict(self) -> dict:
        return {
            "steps": self.steps, "row_steps": self.row_steps, "drafted": self.drafted, "accepted": self.accepted,
            "new_tokens": self.new_tokens,
            "mean_accepted_per_step": self.accepted / self.row_steps if self.row_steps else 0.0,
            "mean_tokens_per_step": (self.accepted + self.row_steps) / self.row_steps if self.row_steps else 0.0,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
        }


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per row, up to and including EOS
    stats: dict = field(default_factory=dict)
    accepted: list[list[int]] = field(default_factory=list)  # per row, drafts accepted at each of its steps
    logits: list[np.ndarray] = field(default_factory=list)  # with record_logits: the step outputs' logits
    # with record_margins (the reference): per row, the first token's decision margin, then each of its steps'
    margins: list[list[float]] = field(default_factory=list)
    block_lengths: list[int] = field(default_factory=list)  # the γ each step ran at (host-driven loops)


_prefill = jax.jit(prefill, static_argnames=("cfg", "mode", "margins"), donate_argnames=("state",))
_step = jax.jit(step, static_argnames=("cfg", "mode", "gamma", "margins"), donate_argnames=("state",))


def check_mode(cfg: TandemConfig, mode: str, gamma: int) -> None:
    """The decoding mode exists, the checkpoint has what it needs, and the block length is usable."""
    if mode not in MODES:
        raise TandemcError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "vanilla" and cfg.drafter is None:
        raise TandemcError("mode 'vanilla' needs a standalone drafter, and this checkpoint has none; use "
                           "mode speed or add drafter.* weights")
    if mode == "adaptive" and cfg.router is None:
        raise TandemcError("mode 'adaptive' needs a router, and this checkpoint has none; train one with "
                           "`tandemc train --stage router` or use mode speed")
    if mode != "primary" and not 1 <= gamma <= 64:
        raise TandemcError(f"block length must be in 1..64, got {gamma}")


def check_prompts(prompts, max_new_tokens: int) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise TandemcError("every prompt must hold at least one token")
    if max_new_tokens < 1:
        raise TandemcError(f"max_new_tokens must be >= 1, got {max_new_tokens}")


def check_request(cfg: TandemConfig, mode: str, prompts, max_new_tokens: int, gamma: int, max_seq_len: int):
    check_mode(cfg, mode, gamma)
    check_prompts(prompts, max_new_tokens)
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > max_seq_len:
        raise TandemcError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} = "
                           f"{longest + max_new_tokens} exceeds the cache length {max_seq_len}; shorten the "
                           "prompt, lower max_new_tokens or raise max_seq_len")


def generate(params, cfg: TandemConfig, prompts: list[list[int]], *, mode: str = "speed",
             block_length: int | None = None, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int = -1,
             max_seq_len: int | None = None, record_logits: bool = False, record_margins: bool = False) -> Generation:
    """Generate up to max_new_tokens per prompt (token id lists) with the chosen mode; see module docstring.
    `block_length`: γ, or a schedule (tandemc.schedule) choosing it step by step. `record_margins`: how close each
    sampling decision came to going another way (`Generation.margins`)."""
    from tandemc.schedule import Fixed

    check_mode(cfg, mode, 1)  # before the mode picks a cache length
    if mode == "primary" or block_length is None or isinstance(block_length, (int, np.integer)):
        schedule = Fixed(0 if mode == "primary" else int(cfg.gamma_train if block_length is None else block_length))
    else:
        schedule = block_length
    gamma = max(schedule.gammas)
    if max_seq_len is None:
        max_seq_len = min(c.max_seq_len for c in (cfg.primary, drafter_config(cfg, mode)) if c)
    check_request(cfg, mode, prompts, max_new_tokens, gamma, max_seq_len)
    sampling = Sampling.make(temperature, top_k, top_p)
    eos = np.int32(eos_id)
    # The verify block writes up to γ positions past the last committed token.
    state = init_state(cfg, mode, len(prompts), max_seq_len + gamma)
    if record_margins:
        state["margin"] = jnp.full((len(prompts),), jnp.inf)

    def prefill_call(state, tokens, start, lengths, limit, u):
        return _prefill(params, cfg, mode, state, tokens, start, lengths, limit, u, sampling, eos,
                        margins=record_margins)

    def step_call(state, u, gamma):
        return _step(params, cfg, mode, gamma, state, u, sampling, eos, margins=record_margins)

    return decode_loop(prefill_call, step_call, state, prompts, batch=len(prompts),
                       chunk=max(len(p) for p in prompts), schedule=schedule, max_new_tokens=max_new_tokens, seed=seed,
                       eos_id=eos_id, greedy=temperature == 0, record_logits=record_logits,
                       record_margins=record_margins)


def pad_prompts(prompts: list[list[int]], batch: int, width: int, max_new_tokens: int):
    """Prompts as zero-padded tokens [batch, width], lengths [batch] and per-row limits [batch]; missing rows get a
    one-token prompt and limit 0, so they are done right after prefill."""
    tokens = np.zeros((batch, width), np.int32)
    lengths = np.ones((batch,), np.int32)
    limit = np.zeros((batch,), np.int32)
    for i, prompt in enumerate(prompts):
        tokens[i, :len(prompt)] = prompt
        lengths[i] = len(prompt)
        limit[i] = max_new_tokens
    return tokens, lengths, limit


def decode_loop(prefill_call, step_call, state, prompts: list[list[int]], *, batch: int, chunk: int, schedule,
                max_new_tokens: int, seed: int, eos_id: int, greedy: bool = False, record_logits: bool = False,
                record_margins: bool = False, read=lambda state, name: np.asarray(state[name])) -> Generation:
    """Drive prefill chunks, then steps until every row is done: the host loop every backend shares.

    `prefill_call(state, tokens [B, C], start [B], lengths [B], limit [B], u [B, 1])` and
    `step_call(state, u, gamma)` return the new state and, for a step, its outputs; `read(state, name)` gives a
    state field (`token`, `done`) as a host array. `schedule` (tandemc.schedule) picks each step's block length γ
    and is told what the step did. Up to `batch` prompts (see `pad_prompts`). Uniforms come from the documented
    stream (call 0 for every prefill chunk, call n for step n, 2γ + 1 per row), so any backend on the same schedule
    draws the same tokens; `greedy` decoding reads none, so it gets zeros. `record_margins`: the state has a
    `margin` field and steps a `margin` output (the reference's, `step(margins=True)`), collected into
    `Generation.margins`.
    """
    n = len(prompts)
    tokens, lengths, limit = pad_prompts(prompts, batch, -(-max(len(p) for p in prompts) // chunk) * chunk,
                                         max_new_tokens)
    padded = tokens.shape[1]
    u0 = np.zeros((batch, 1), np.float32) if greedy else uniforms(seed, 0, batch, 1)
    for start in range(0, padded, chunk):
        state = prefill_call(state, tokens[:, start:start + chunk], np.full((batch,), start, np.int32), lengths,
                             limit, u0)
    out = [[int(t)] for t in read(state, "token")[:n]]
    margins = [[float(m)] for m in read(state, "margin")[:n]] if record_margins else []
    stats = Stats()
    accepted_per_step: list[list[int]] = [[] for _ in prompts]
    block_lengths: list[int] = []
    logits: list[np.ndarray] = []
    call = 0
    done = read(state, "done")
    while not done.all():
        call += 1
        active = ~done
        gamma = schedule.next()
        u = np.zeros((batch, 2 * gamma + 1), np.float32) if greedy else uniforms(seed, call, batch, 2 * gamma + 1)
        start_time = time.perf_counter()
        state, outputs = step_call(state, u, gamma)
        done = read(state, "done")
        emitted, n_emitted, accepted, drafted = (np.asarray(outputs[k])
                                                 for k in ("emitted", "n_emitted", "accepted", "drafted"))
        schedule.observe(gamma, drafted[active], accepted[active], time.perf_counter() - start_time)
        block_lengths.append(gamma)
        stats.steps += 1
        stats.row_steps += int(active.sum())
        stats.drafted += int(drafted.sum())
        stats.accepted += int(accepted.sum())
        step_margins = np.asarray(outputs["margin"]) if record_margins else None
        if record_logits:
            logits.append(np.where(active[:, None, None], np.asarray(outputs["logits"]), np.nan))
        for row in np.flatnonzero(active[:n]):
            out[row].extend(int(t) for t in emitted[row, :n_emitted[row]])
            accepted_per_step[row].append(int(accepted[row]))
            if record_margins:
                margins[row].append(float(step_margins[row]))
    tokens_out = [_truncate(row, max_new_tokens, eos_id) for row in out]
    stats.new_tokens = sum(len(r) for r in tokens_out)
    return Generation(tokens_out, stats.as_dict(), accepted_per_step, logits, margins, block_lengths)


def _truncate(row: list[int], limit: int, eos_id: int) -> list[int]:
    row = row[:limit]
    if eos_id in row:
        row = row[:row.index(eos_id) + 1]
    return row
