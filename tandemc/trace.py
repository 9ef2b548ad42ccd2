"""Tracing: a Program's decode functions as static graphs over flat, named arrays.

Every graph takes positional arrays — the weights, then (for `prefill`/`step`) the decode state, then the call's
inputs — and returns flat arrays. Names come from the pytree paths, so a manifest can list each graph's I/O and
say which state output feeds which state input on the next call (docs/artifact.md). The functions are
`decoding.prefill`/`decoding.step` themselves; `generate` is both run in-graph by `lax.while_loop`.

Graphs per cache-length bucket S:
    prefill  state, tokens [B, C], start [B], lengths [B], limit [B], u [B, 1], sampling, eos → state
    step     state, u [B, 2γ+1], sampling, eos → state, emitted [B, γ+1], n_emitted [B], accepted [B],
             drafted [B], logits [B, γ+1, V]
    generate tokens [B, P], lengths [B], limit [B], u_prefill [B, 1], u_steps [N, B, 2γ+1], sampling, eos →
             new_tokens [B, N], n_tokens [B], steps [B], accepted [B], drafted [B]  (P = ⌈S/C⌉·C, N = max_new)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from tandemc import decoding, primitives
from tandemc.program import Program
from tandemc.sampling import Sampling

SAMPLING_INPUTS = [("temperature", (), "float32"), ("top_k", (), "int32"), ("top_p", (), "float32"),
                   ("eos_id", (), "int32")]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def struct(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.shape, jnp.dtype(self.dtype))

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class Graph:
    """A traceable function over flat arrays, with named inputs (weights first) and outputs."""

    name: str  # "prefill", "step" (step_g<γ> at other block lengths) or "generate"
    seq_len: int  # the cache-length bucket S
    fn: Callable[..., tuple]
    weights: list[TensorSpec]
    inputs: list[TensorSpec]  # after the weights: state (prefill, step), then per-call inputs
    outputs: list[TensorSpec]
    state_wiring: dict[str, str]  # output name → the input it feeds on the next call
    max_position: int = 0  # positions seen are below this (rows already finished may run past the cache)

    @property
    def key(self) -> str:
        return f"{self.name}.s{self.seq_len}"

    def arg_structs(self) -> list[jax.ShapeDtypeStruct]:
        return [t.struct() for t in self.weights + self.inputs]


def path_name(path) -> str:
    parts = []
    for entry in path:
        parts.append(str(getattr(entry, "key", getattr(entry, "idx", entry))))
    return ".".join(parts)


def named_leaves(tree: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, leaf) in jax's flattening order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(prefix + path_name(path), leaf) for path, leaf in leaves]


def specs_of(tree: Any, prefix: str = "") -> list[TensorSpec]:
    return [TensorSpec(name, tuple(leaf.shape), jnp.dtype(leaf.dtype).name) for name, leaf in named_leaves(tree, prefix)]


def mode_params(params: dict[str, Any], mode: str) -> dict[str, Any]:
    """Only the weights a mode's graphs read."""
    tandem = ["primary", "secondary", "tandem", "tandem_input", "draft_vocab"]  # the last two where present
    names = {"primary": ["primary"], "vanilla": ["primary", "drafter", "draft_vocab"],
             "adaptive": tandem + ["router"]}.get(mode, tandem)
    return {name: params[name] for name in names if name in params}


def build_graphs(program: Program) -> list[Graph]:
    """prefill, step (one per block length of `--block-lengths`) and generate for every cache-length bucket."""
    cfg, opts = program.config, program.options
    mode, gamma, batch = opts.mode, program.gamma, opts.batch
    step_gammas = opts.step_gammas(cfg)
    weights_tree = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), mode_params(program.params, mode))
    weight_specs = specs_of(weights_tree)
    weights_def = jax.tree.structure(weights_tree)
    n_w = len(weight_specs)
    sampling_specs = [TensorSpec(n, s, d) for n, s, d in SAMPLING_INPUTS]
    vocab = cfg.primary.vocab_size

    def controls(flat):
        temperature, top_k, top_p, eos_id = flat
        return Sampling(temperature, top_k, top_p), eos_id

    graphs = []
    for seq_len in opts.max_seq_len:
        cache_len = opts.cache_array_length(seq_len, cfg)
        state_tree = jax.eval_shape(lambda: decoding.init_state(cfg, mode, batch, cache_len))
        state_specs = specs_of(state_tree, "state.")
        state_def = jax.tree.structure(state_tree)
        n_s = len(state_specs)
        wiring = {s.name.replace("state.", "new_state.", 1): s.name for s in state_specs}
        new_state_specs = [TensorSpec(s.name.replace("state.", "new_state.", 1), s.shape, s.dtype)
                           for s in state_specs]

        def split(args):
            weights = jax.tree.unflatten(weights_def, args[:n_w])
            state = jax.tree.unflatten(state_def, args[n_w:n_w + n_s])
            return weights, state, args[n_w + n_s:]

        def prefill_fn(*args):
            weights, state, rest = split(args)
            tokens, start, lengths, limit, u = rest[:5]
            sampling, eos_id = controls(rest[5:])
            new = decoding.prefill(weights, cfg, mode, state, tokens, start, lengths, limit, u, sampling, eos_id)
            return tuple(jax.tree.leaves(new))

        chunk = opts.prefill_chunk
        vec = lambda name: TensorSpec(name, (batch,), "int32")  # noqa: E731
        graphs.append(Graph("prefill", seq_len, prefill_fn, weight_specs,
                            state_specs + [TensorSpec("tokens", (batch, chunk), "int32"), vec("start"),
                                           vec("lengths"), vec("limit"), TensorSpec("u", (batch, 1), "float32")]
                            + sampling_specs, new_state_specs, wiring))

        for step_gamma in step_gammas:  # the default γ's graph is "step", the others "step_g<γ>"
            def step_fn(*args, step_gamma=step_gamma):
                weights, state, rest = split(args)
                sampling, eos_id = controls(rest[1:])
                new, out = decoding.step(weights, cfg, mode, step_gamma, state, rest[0], sampling, eos_id)
                return (*jax.tree.leaves(new), out["emitted"], out["n_emitted"], out["accepted"], out["drafted"],
                        out["logits"])

            step_outputs = [TensorSpec("emitted", (batch, step_gamma + 1), "int32"), vec("n_emitted"),
                            vec("accepted"), vec("drafted"), TensorSpec("logits", (batch, step_gamma + 1, vocab),
                                                                        "float32")]
            graphs.append(Graph(step_graph_name(step_gamma, gamma), seq_len, step_fn, weight_specs,
                                state_specs + [TensorSpec("u", (batch, 2 * step_gamma + 1), "float32")]
                                + sampling_specs, new_state_specs + step_outputs, wiring))

        prompt_width = -(-seq_len // chunk) * chunk
        n_new = opts.max_new_tokens

        def generate_fn(*args, cache_len=cache_len, prompt_width=prompt_width):
            weights = jax.tree.unflatten(weights_def, args[:n_w])
            tokens, lengths, limit, u_prefill, u_steps = args[n_w:n_w + 5]
            sampling, eos_id = controls(args[n_w + 5:])
            return generate_in_graph(weights, program, cache_len, tokens, lengths, limit, u_prefill, u_steps,
                                     sampling, eos_id)

        graphs.append(Graph("generate", seq_len, generate_fn, weight_specs,
                            [TensorSpec("tokens", (batch, prompt_width), "int32"), vec("lengths"), vec("limit"),
                             TensorSpec("u_prefill", (batch, 1), "float32"),
                             TensorSpec("u_steps", (n_new, batch, 2 * gamma + 1), "float32")] + sampling_specs,
                            [TensorSpec("new_tokens", (batch, n_new), "int32"), vec("n_tokens"), vec("steps"),
                             vec("accepted"), vec("drafted")], {}))
        for graph in graphs[-2 - len(step_gammas):]:
            graph.max_position = cache_len + 2 * max(step_gammas) + 1
    return graphs


def step_graph_name(gamma: int, default: int) -> str:
    """"step" runs the artifact's default block length; "step_g<γ>" the others of `--block-lengths`."""
    return "step" if gamma == default else f"step_g{gamma}"


def generate_in_graph(weights, program: Program, cache_len: int, tokens, lengths, limit, u_prefill, u_steps,
                      sampling: Sampling, eos_id):
    """The whole request in one graph: prefill chunks while any row has prompt left, then steps until every row
    is done or N steps ran; tokens are truncated at each row's limit and at EOS (inclusive), as on the host."""
    cfg, opts = program.config, program.options
    mode, gamma, chunk = opts.mode, program.gamma, opts.prefill_chunk
    batch, n_new = tokens.shape[0], u_steps.shape[0]
    state = decoding.init_state(cfg, mode, batch, cache_len)

    def prefill_body(carry):
        start, state = carry
        block = lax.dynamic_slice_in_dim(tokens, start, chunk, axis=1)
        state = decoding.prefill(weights, cfg, mode, state, block, jnp.full((batch,), start, jnp.int32), lengths,
                                 limit, u_prefill, sampling, eos_id)
        return start + chunk, state

    _, state = lax.while_loop(lambda c: c[0] < jnp.max(lengths), prefill_body, (jnp.int32(0), state))
    width = n_new + gamma + 1
    out = jnp.concatenate([state["token"][:, None], jnp.zeros((batch, width - 1), jnp.int32)], axis=1)
    zeros = jnp.zeros((batch,), jnp.int32)

    def step_body(carry):
        n, state, out, steps, accepted, drafted = carry
        active = ~state["done"]
        offset = state["generated"]
        state, o = decoding.step(weights, cfg, mode, gamma, state, u_steps[n], sampling, eos_id)
        written = primitives.write_block(out, o["emitted"], offset)
        out = jnp.where(active[:, None], written, out)
        return (n + 1, state, out, steps + active.astype(jnp.int32), accepted + o["accepted"],
                drafted + o["drafted"])

    def more(carry):
        n, state = carry[0], carry[1]
        return (n < n_new) & ~jnp.all(state["done"])

    _, state, out, steps, accepted, drafted = lax.while_loop(
        more, step_body, (jnp.int32(0), state, out, zeros, zeros, zeros))
    n_tokens = jnp.minimum(state["generated"], limit)
    index = jnp.arange(width)[None, :]
    is_eos = (out == eos_id) & (index < n_tokens[:, None])
    first_eos = jnp.argmax(is_eos, axis=1)
    n_tokens = jnp.where(jnp.any(is_eos, axis=1), first_eos + 1, n_tokens)
    tokens_out = jnp.where(index[:, :n_new] < n_tokens[:, None], out[:, :n_new], 0)
    return tokens_out, n_tokens, steps, accepted, drafted

