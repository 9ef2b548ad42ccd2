"""Held-out metrics of a tandem checkpoint: next-token accuracy and distance to the primary, and SPEED acceptance.

Next-token metrics are teacher-forced over held-out windows, the tandem secondary with fixed blocks of γ. The
acceptance figures come from real greedy SPEED decoding on held-out prompts, with the tandem secondary and with
the standalone drafter, so they measure exactly what a deployment would see.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np

from tandemc import model
from tandemc.config import TandemConfig
from tandemc.decoding import generate


def _drafts(params, logits):
    """What each position would draft: (the distribution over proposable ids, the argmax as a primary id)."""
    proposal = model.proposable(params, logits)
    return proposal, model.primary_ids(params, jnp.argmax(proposal, -1))


def _batch_metrics(params, cfg: TandemConfig, tokens, block: int, other_blocks: tuple[int, ...] = ()):
    x, y = tokens[:, :-1], tokens[:, 1:]
    primary_logits, hiddens = model.forward(params["primary"], cfg.primary, x)
    primary_probs = model.draft_space(params, jax.nn.softmax(primary_logits))  # over the drafters' ids
    primary_choice = jnp.argmax(primary_logits, -1)
    models = {"tandem": model.tandem_forward(params, cfg, x, block, primary_hiddens=hiddens)}
    if cfg.drafter is not None:
        models["standalone"] = model.drafter_forward(params, cfg, "drafter", x)[0]
    out = {"primary_correct": jnp.sum(primary_choice == y)}
    slot = jnp.arange(x.shape[1]) % block  # position in the tandem's block
    for name, logits in models.items():
        proposal, choice = _drafts(params, logits)
        agree = choice == primary_choice
        out[f"{name}_correct"] = jnp.sum(choice == y)
        out[f"{name}_agree"] = jnp.sum(agree)
        out[f"{name}_agree_by_slot"] = jax.ops.segment_sum(jnp.sum(agree, 0), slot, num_segments=block)
        out[f"{name}_tv"] = jnp.sum(0.5 * jnp.sum(jnp.abs(jax.nn.softmax(proposal) - primary_probs), -1))
    for other in other_blocks:
        _, choice = _drafts(params, model.tandem_forward(params, cfg, x, other, primary_hiddens=hiddens))
        out[f"tandem_agree_block_{other}"] = jnp.sum(choice == primary_choice)
    return out


_batch_metrics_jit = jax.jit(_batch_metrics, static_argnames=("cfg", "block", "other_blocks"))


def next_token_metrics(params, cfg: TandemConfig, windows: np.ndarray, block: int, batch: int = 16,
                       other_blocks=()) -> dict:
    """Teacher-forced metrics over `windows` [N, T]. Agreement is also given by position in the tandem's block
    (`*_agreement_by_position`, first draft first): the primary's state is freshest for the first, so this shows
    how far into a block it still helps; the standalone drafter's, by the same positions, is the baseline. With
    `other_blocks`, the tandem's agreement with blocks of each of those lengths too
    (`tandem_agreement_by_block_length`, with `block`'s): what it is at the block length SPEED runs at."""
    other_blocks = tuple(sorted(set(other_blocks) - {block}))
    totals: dict[str, np.ndarray] = {}
    for i in range(0, len(windows), batch):
        for k, v in _batch_metrics_jit(params, cfg, windows[i:i + batch], block, other_blocks).items():
            totals[k] = totals.get(k, 0.0) + np.asarray(v, np.float64)
    n = windows.shape[0] * (windows.shape[1] - 1)
    n_by_slot = windows.shape[0] * np.bincount(np.arange(windows.shape[1] - 1) % block, minlength=block)
    out = {"primary_accuracy": float(totals["primary_correct"]) / n}
    for name in ("tandem", "standalone"):
        if f"{name}_correct" in totals:
            out[f"{name}_accuracy"] = float(totals[f"{name}_correct"]) / n
            out[f"{name}_agreement"] = float(totals[f"{name}_agree"]) / n
            out[f"{name}_agreement_by_position"] = (totals[f"{name}_agree_by_slot"] / n_by_slot).tolist()
            out[f"{name}_tv"] = float(totals[f"{name}_tv"]) / n
    if other_blocks:
        by_block = {block: out["tandem_agreement"]}
        by_block.update({g: float(totals[f"tandem_agree_block_{g}"]) / n for g in other_blocks})
        out["tandem_agreement_by_block_length"] = {str(g): by_block[g] for g in sorted(by_block)}
    if "standalone_tv" in out:
        out["relative_tv"] = out["tandem_tv"] / out["standalone_tv"]
    out["positions"] = n
    return out


def acceptance_by_block_length(params, cfg: TandemConfig, prompts: list[list[int]], gammas, new_tokens: int,
                               workers: int = 2) -> dict:
    """γ → mean accepted drafts per greedy SPEED step, for the tandem secondary and the standalone drafter, and with
    a router, for the adaptive block length up to γ with its mean drafts per step (`adaptive_drafted`).

    The caches hold just the request (longest prompt + new tokens), not the models' max_seq_len: attention over
    unused cache slots only costs time (3–4× here) and changes no decision. Each (γ, drafter) is its own compiled
    program, and compiling takes most of the time (~7 s against ~2 s of decoding on the example) on one core, so
    `workers` runs them side by side; every run is independent, so the figures do not depend on it."""
    cache_len = max(len(p) for p in prompts) + new_tokens
    modes = {"tandem": "speed", **({"standalone": "vanilla"} if cfg.drafter is not None else {}),
             **({"adaptive": "adaptive"} if cfg.router is not None else {})}

    def stats(gamma, mode):
        return generate(params, cfg, prompts, mode=mode, block_length=gamma, max_new_tokens=new_tokens,
                        max_seq_len=cache_len).stats

    def row(results):
        out = {name: results[name]["mean_accepted_per_step"] for name in modes}
        if "adaptive" in results:
            out["adaptive_drafted"] = results["adaptive"]["drafted"] / max(results["adaptive"]["row_steps"], 1)
        return out

    with ThreadPoolExecutor(workers) as pool:
        runs = {(gamma, name): pool.submit(stats, gamma, mode) for gamma in gammas for name, mode in modes.items()}
        return {str(gamma): row({name: runs[gamma, name].result() for name in modes}) for gamma in gammas}
