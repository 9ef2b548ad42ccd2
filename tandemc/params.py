"""Parameter names and shapes: the one table that initialisation and the checkpoint loader both read.

Parameters live in a nested pytree (`params["primary"]["layers"][3]["wq"]`); on disk each leaf is a tensor named
by its dotted path (`primary.layers.3.wq`). Matrices are stored as [in, out] so that `x @ w` applies them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tandemc.config import DecoderConfig, TandemConfig
from tandemc.errors import TandemcError

# A shape is a tuple of (size, label) pairs; the labels name the config fields behind each dimension so that a
# mismatch can be reported in the user's terms.
Shape = tuple[tuple[int, str], ...]


def decoder_shapes(cfg: DecoderConfig, prefix: str, shared_with: DecoderConfig | None = None,
                   other_row: bool = False) -> dict[str, Shape]:
    """Tensors of one decoder, named `{prefix}.embed`, ... (or `embed`, ... when prefix is empty). `shared_with`:
    a drafter that reads and writes tokens through that primary's table, by `embed_proj` and `head_proj` (and
    `other`, the logit row of the draft vocabulary's id for all other tokens, with `other_row`)."""
    def name(rest):
        return f"{prefix}.{rest}" if prefix else rest

    d = (cfg.d_model, name("d_model"))
    v = (cfg.vocab_size, name("vocab_size"))
    f = (cfg.d_ff, name("d_ff"))
    q = (cfg.n_heads * cfg.head_dim, name("n_heads*head_dim"))
    kv = (cfg.n_kv_heads * cfg.head_dim, name("n_kv_heads*head_dim"))
    if shared_with is not None:
        d_p = (shared_with.d_model, "primary.d_model")
        shapes = {name("embed_proj"): (d_p, d), name("head_proj"): (d, d_p)}
        if other_row:
            shapes[name("other")] = (d_p,)
    else:
        shapes = {name("embed"): (v, d)}
    for i in range(cfg.n_layers):
        layer = name(f"layers.{i}")
        shapes.update({
            f"{layer}.attn_norm": (d,), f"{layer}.wq": (d, q), f"{layer}.wk": (d, kv), f"{layer}.wv": (d, kv),
            f"{layer}.wo": (q, d), f"{layer}.mlp_norm": (d,), f"{layer}.w_gate": (d, f),
            f"{layer}.w_up": (d, f), f"{layer}.w_down": (f, d),
        })
    shapes[name("final_norm")] = (d,)
    if not cfg.tie_embeddings and shared_with is None:
        shapes[name("lm_head")] = (d, v)
    return shapes


def checkpoint_shapes(cfg: TandemConfig) -> dict[str, Shape]:
    """Every tensor a checkpoint with this config must hold, and nothing else."""
    shared = {"shared_with": cfg.primary, "other_row": cfg.draft_vocab > 0} if cfg.shared_embeddings else {}
    shapes = {**decoder_shapes(cfg.primary, "primary"), **decoder_shapes(cfg.secondary, "secondary", **shared)}
    d_l = (cfg.primary.d_model, "primary.d_model")
    d_s = (cfg.secondary.d_model, "secondary.d_model")
    for j in range(cfg.secondary.n_layers):
        shapes[f"tandem.{j}.weight"] = (d_l, d_s)
        shapes[f"tandem.{j}.bias"] = (d_s,)
    if cfg.primary_state_input:
        hidden = (cfg.primary_state_input, "primary_state_input")
        n = len(cfg.state_layers)
        rows = "primary.d_model" if n == 1 else f"{n}*primary.d_model"
        shapes["tandem_input.w_in"] = ((n * d_l[0] + d_s[0], f"{rows}+secondary.d_model"), hidden)
        shapes["tandem_input.b_in"] = (hidden,)
        shapes["tandem_input.w_out"] = (hidden, d_s)
        if cfg.primary_state_feedback:
            shapes["tandem_input.w_feedback"] = (d_s, hidden)
        if cfg.primary_state_logits:
            shapes["tandem_input.w_logits"] = (hidden, (cfg.secondary.vocab_size, "secondary.vocab_size"))
    if cfg.router:
        feats = (cfg.router.num_features(cfg.secondary.d_model), "1+router.top_k*(1+secondary.d_model)")
        hidden = (cfg.router.hidden, "router.hidden")
        shapes.update({"router.w1": (feats, hidden), "router.b1": (hidden,),
                       "router.w2": (hidden, (1, "1")), "router.b2": ((1, "1"),)})
    if cfg.drafter:
        shapes.update(decoder_shapes(cfg.drafter, "drafter", **shared))
    if cfg.draft_vocab:
        shapes["draft_vocab.tokens"] = ((cfg.draft_vocab, "draft_vocab"),)
        shapes["draft_vocab.index"] = ((cfg.primary.vocab_size, "primary.vocab_size"),)
    return shapes


INTEGER_TENSORS = ("draft_vocab.tokens", "draft_vocab.index")  # int32 whatever the config's dtype


def draft_vocab(tokens, vocab_size: int) -> dict[str, np.ndarray]:
    """The draft vocabulary's tensors for the primary ids `tokens` (kept in ascending order): `tokens` [N], each
    draft id's primary id, and `index` [vocab_size], each primary id's draft id (N for the tokens outside)."""
    tokens = np.unique(np.asarray(tokens, np.int64))
    if tokens.size == 0 or tokens[0] < 0 or tokens[-1] >= vocab_size:
        raise TandemcError(f"a draft vocabulary needs token ids in 0..{vocab_size - 1}")
    index = np.full(vocab_size, tokens.size, np.int32)
    index[tokens] = np.arange(tokens.size, dtype=np.int32)
    return {"tokens": tokens.astype(np.int32), "index": index}


def check_draft_vocab(params: dict, source: str) -> None:
    """The two tensors describe the same set: ascending distinct ids, and an index that inverts them."""
    dv = params.get("draft_vocab")
    if dv is None:
        return
    tokens, index = np.asarray(dv["tokens"]), np.asarray(dv["index"])
    if not np.array_equal(draft_vocab(tokens, index.size)["index"], index) or np.any(np.diff(tokens) <= 0):
        raise TandemcError(f"{source}: draft_vocab.tokens must list distinct ascending primary ids and "
                           "draft_vocab.index must map each of them to its position (and every other id to N)")


def sizes(shape: Shape) -> tuple[int, ...]:
    return tuple(n for n, _ in shape)


def check_tensors(expected: dict[str, Shape], tensors: dict[str, tuple[str, tuple[int, ...]]], dtype: str,
                  source: str) -> None:
    """tensors: name → (dtype name, shape). Raises on the first missing/extra/mis-shaped/mistyped tensor."""
    missing = sorted(set(expected) - set(tensors))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise TandemcError(f"{source}: missing tensor '{missing[0]}'{more} required by the config")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise TandemcError(f"{source}: unexpected tensor '{extra[0]}'{more} that the config does not describe")
    for name, shape in expected.items():
        actual_dtype, actual = tensors[name]
        wanted = "int32" if name in INTEGER_TENSORS else dtype
        if tuple(actual) != sizes(shape):
            labels = ", ".join(label for _, label in shape)
            raise TandemcError(f"{source}: tensor '{name}' has shape {tuple(actual)} but the config implies "
                               f"{sizes(shape)} = ({labels})")
        if actual_dtype != wanted:
            raise TandemcError(f"{source}: tensor '{name}' has dtype {actual_dtype} but "
                               + (f"config field 'dtype' is {dtype}" if wanted == dtype else "it must be int32"))


def init_params(cfg: TandemConfig, seed: int = 0, only: str = "") -> dict[str, Any]:
    """Random initialisation: fan-in scaled normals, unit norm gains, zero biases (numpy, so 1B fits in RAM).
    `only`: initialise just the tensors whose names start with it (one new part of an existing checkpoint)."""
    rng = np.random.default_rng(seed)
    dtype = np_dtype(cfg.dtype)
    flat = {}
    for name, shape in checkpoint_shapes(cfg).items():
        if not name.startswith(only) or name in INTEGER_TENSORS:
            continue
        dims = sizes(shape)
        leaf = name.rsplit(".", 1)[1]
        if leaf.endswith("norm"):
            value = np.ones(dims, np.float32)
        elif leaf.startswith("b"):
            value = np.zeros(dims, np.float32)
        elif leaf == "embed":
            value = rng.standard_normal(dims, np.float32) * np.float32(dims[1] ** -0.5)
        else:
            std = dims[0] ** -0.5
            if leaf in ("wo", "w_down"):
                std /= np.sqrt(2.0 * _layers_of(cfg, name))
            value = rng.standard_normal(dims, np.float32) * np.float32(std)
        flat[name] = value.astype(dtype)
    if cfg.draft_vocab and "draft_vocab.".startswith(only[:len("draft_vocab.")]):  # the first N ids until chosen
        flat.update({f"draft_vocab.{k}": v for k, v in draft_vocab(np.arange(cfg.draft_vocab),
                                                                    cfg.primary.vocab_size).items()})
    return unflatten(flat)


def _layers_of(cfg: TandemConfig, name: str) -> int:
    return getattr(cfg, name.split(".", 1)[0]).n_layers


def np_dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, name)) if name in ("bfloat16", "int4") else np.dtype(name)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists → {"a.0.b": leaf}."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    out = {}
    for key, sub in items:
        out.update(flatten(sub, f"{prefix}.{key}" if prefix else str(key)))
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.0.b": leaf} → nested dicts, with integer path components becoming list indices."""
    root: dict = {}
    for name, leaf in flat.items():
        node = root
        parts = name.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = leaf
    return _lists(root)


def _lists(node):
    if not isinstance(node, dict):
        return node
    if node and all(k.isdigit() for k in node):
        return [_lists(node[str(i)]) for i in range(len(node))]
    return {k: _lists(v) for k, v in node.items()}


def count(tree: Any) -> int:
    return int(sum(np.prod(np.shape(x)) for x in flatten(tree).values()))
