"""The per-pass check: the JAX reference before and after a pass, on the same token sequences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tandemc import model
from tandemc.decoding import generate
from tandemc.program import Program

CHECK_SHAPE = (4, 48)  # random token sequences when no prompts are given
ACCEPTANCE_TOKENS = 32


def _tokens(program: Program, prompts) -> np.ndarray:
    if prompts:
        width = min(len(p) for p in prompts)
        return np.asarray([p[:width] for p in prompts], np.int32)
    return np.random.default_rng(0).integers(0, program.config.primary.vocab_size, CHECK_SHAPE).astype(np.int32)


def model_logits(program: Program, tokens) -> dict[str, np.ndarray]:
    """Training-forward logits of every model the Program holds (the secondary in tandem, with blocks of γ)."""
    cfg = program.config
    params = jax.tree.map(jnp.asarray, program.params)
    out = {"primary": model.forward(params["primary"], cfg.primary, tokens)[0]}
    if "tandem" in params:
        out["secondary"] = model.tandem_forward(params, cfg, tokens, block=max(program.gamma, 1))
    if "drafter" in params and cfg.drafter is not None:
        out["drafter"] = model.drafter_forward(params, cfg, "drafter", tokens)[0]
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def mean_accepted(program: Program, prompts) -> float | None:
    """Mean accepted drafts per SPEED step (greedy) in the Program's mode, or None for primary-only."""
    opts = program.options
    if opts.mode in ("primary", "tandem"):
        return None
    width = min(len(p) for p in prompts)
    result = generate(jax.tree.map(jnp.asarray, program.params), program.config, [p[:width] for p in prompts[:2]],
                      mode=opts.mode, block_length=program.gamma, max_new_tokens=ACCEPTANCE_TOKENS,
                      max_seq_len=width + ACCEPTANCE_TOKENS)
    return round(result.stats["mean_accepted_per_step"], 4)


def compare(before: Program, after: Program, *, exact: bool, prompts=None) -> dict:
    """max |Δlogits| per model; for lossy passes also top-1 agreement and SPEED acceptance before → after."""
    from tandemc.verify import LOGIT_TOLERANCE

    tokens = _tokens(before, prompts)
    a, b = model_logits(before, tokens), model_logits(after, tokens)
    per_model = {k: float(np.max(np.abs(a[k] - b[k]))) for k in a}
    tolerance = LOGIT_TOLERANCE[before.config.dtype]
    report = {"tokens": list(tokens.shape), "max_abs_logit_diff": max(per_model.values()),
              "per_model": {k: {"max_abs_logit_diff": v} for k, v in per_model.items()}, "tolerance": tolerance,
              "ok": bool(max(per_model.values()) <= tolerance)}
    if not exact:
        for k in a:
            report["per_model"][k]["top1_agreement"] = float(np.mean(a[k].argmax(-1) == b[k].argmax(-1)))
        rows = [list(map(int, row)) for row in tokens]
        report["mean_accepted_per_step"] = {"before": mean_accepted(before, rows), "after": mean_accepted(after, rows)}
    return report
