"""Checking an artifact against the JAX reference on the same Program (same weights, dtype and passes).

Greedy tokens must be identical (host-driven steps and the in-graph `generate`), sampled tokens for fixed seeds
must be identical up to near-ties, and the primary's verify-block logits must agree within the dtype's tolerance —
at every position, or, where activations are quantized at run time, at all but a few: rounding an activation to
int8 turns a last-bit difference between two compilers into a whole quantization step now and then.

A sampled decision (an inverse-CDF draw, a top-k/top-p edge, an acceptance test u·q < p) whose margin is below what
the logits tolerance can move goes either way on two correct backends; at a vocabulary of tens of thousands such
decisions are common. So where a sampled row diverges, the reference's margin at the decision that produced the
first differing token decides: within `margin_tolerance` (set by the measured logit difference, which must itself be
within the dtype's tolerance) it is a near-tie (reported, and the row counts as matching up to there), otherwise a
mismatch. Greedy identity stays strict.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tandemc.decoding import generate as reference_generate
from tandemc.passes.quantize import kinds as quantized_kinds
from tandemc.program import Program

# max |Δlogits| allowed between an artifact and the reference, by dtype: different compilers reorder float sums.
LOGIT_TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 2e-1}
SAMPLING = {"temperature": 0.8, "top_k": 0, "top_p": 0.95}
# With int8 activations: the largest fraction of logit rows (positions) allowed outside the tolerance. A lowering
# that computes something else (a matmul not fused, the wrong accuracy level) moves nearly every row.
ROUNDING_ROWS = 0.05


def margin_tolerance(max_logit_diff: float, temperature: float, vocab: int) -> float:
    """The largest decision margin a correct artifact may flip. A logit difference ε moves log-probabilities and CDF
    fractions by up to 2ε/T, and drafter and primary both enter an acceptance test: 4ε/T, doubled because ε is
    the measured largest difference of the primary's verify-block logits, not of every decision's inputs. Summing
    a float32 CDF over V tokens in another order moves it by about √V units of 2^-23 on its own."""
    return max(8 * max_logit_diff / temperature, np.sqrt(vocab) * 2.0 ** -23)


def decision_of_token(index: int, accepted: list[int]) -> int:
    """Which decision produced a row's new token `index`: 0 is the prefill's first token, k the k-th step (each
    step emits its accepted drafts plus one token)."""
    if index == 0:
        return 0
    emitted = 1
    for k, a in enumerate(accepted, start=1):
        emitted += a + 1
        if index < emitted:
            return k
    return len(accepted) + 1


def sampled_summary(report: dict) -> str:
    """'identical' or 'identical on 7 of 8 rows, 1 near-tie (margin 3.1e-05 <= 5.0e-03)' and the like."""
    if report["sampled_identical"]:
        return "identical"
    ties = report["sampled_near_ties"]
    text = f"identical on {report['sampled_rows_identical']} of {report['sampled_rows']} rows"
    if ties:
        text += (f", {len(ties)} near-tie{'s' if len(ties) > 1 else ''} (margin <= "
                 f"{max(t['margin'] for t in ties):.1e}, tolerance {report['sampled_margin_tolerance']:.1e})")
    if report["sampled_mismatches"]:
        first = report["sampled_mismatches"][0]
        margin = "none" if first["margin"] is None else f"{first['margin']:.1e}"
        text += (f", {len(report['sampled_mismatches'])} mismatched (first: seed {first['seed']}, row {first['row']}, "
                 f"token {first['token']}, margin {margin})")
    return text


def sampled_divergence(got: list[int], ref: list[int], ref_accepted: list[int], ref_margins: list[float]):
    """None for identical rows; else (first differing token, the reference's margin at the decision behind it)."""
    if got == ref:
        return None
    index = next((i for i, (x, y) in enumerate(zip(got, ref)) if x != y), min(len(got), len(ref)))
    decision = decision_of_token(index, ref_accepted)
    return index, (ref_margins[decision] if decision < len(ref_margins) else 0.0)


def verification_prompts(program: Program, count: int, longest: int, seed: int = 0) -> list[list[int]]:
    """Deterministic random-token prompts of varied lengths (several prefill chunks when the cache allows)."""
    rng = np.random.default_rng(seed)
    vocab = program.config.primary.vocab_size
    lengths = rng.integers(1, max(2, longest) + 1, count)
    lengths[0] = longest  # always exercise the longest prompt
    return [rng.integers(0, vocab, int(n)).tolist() for n in lengths]


def verify(artifact, program: Program, prompts: int = 4, seeds: tuple[int, ...] = (1, 2)) -> dict:
    """Run `artifact` (a runtime.Artifact) and the reference on the same prompts, in every cache-length bucket
    (the longest prompt of each bucket's set just overflows the bucket below); a JSON-able report."""
    opts = program.options
    params = jax.tree.map(jnp.asarray, program.params)
    eos = artifact.tokenizer.eos_id
    greedy_ok = generate_ok = True
    sampled_rows, sampled_identical, divergences = 0, 0, []
    max_diff, rows, rows_over = 0.0, 0, 0
    tolerance = LOGIT_TOLERANCE[program.config.dtype]
    checked = []
    below = 0
    for seq_len in opts.max_seq_len:
        max_new = max(1, min(opts.max_new_tokens, seq_len // 2))
        longest = seq_len - max_new if below else min(seq_len - max_new, 2 * opts.prefill_chunk + 1)
        below = seq_len
        checked.append({"cache_length": seq_len, "longest_prompt": longest, "max_new_tokens": max_new})

        def reference(batch, **kw):
            return reference_generate(params, program.config, batch, mode=opts.mode,
                                      block_length=program.gamma or None, max_new_tokens=max_new, eos_id=eos,
                                      max_seq_len=seq_len, **kw)

        bucket_prompts = verification_prompts(program, prompts, longest, seed=seq_len)
        for first in range(0, len(bucket_prompts), opts.batch):
            batch = bucket_prompts[first:first + opts.batch]
            ref = reference(batch, record_logits=True, record_margins=True)  # the sampled runs' compiled program
            got = artifact.run_steps(batch, max_new, eos_id=eos, record_logits=True)
            greedy_ok &= got.tokens == ref.tokens
            for a, b in zip(got.logits, ref.logits):  # the artifact's batch may hold padding rows
                diff = np.abs(a[:b.shape[0]] - b)
                if np.any(np.isfinite(diff)):
                    max_diff = max(max_diff, float(np.nanmax(diff)))
                    row_max = np.max(np.where(np.isnan(diff), -np.inf, diff).reshape(-1, diff.shape[-1]), axis=-1)
                    rows += int(np.sum(np.isfinite(row_max)))  # all-NaN rows (finished rows) count for nothing
                    rows_over += int(np.sum(row_max > tolerance))
            if artifact.has_generate_graph:
                generate_ok &= artifact.run_generate(batch, max_new, eos_id=eos).tokens == ref.tokens
            for seed in seeds:
                ref_s = reference(batch, seed=seed, record_margins=True, **SAMPLING)
                got_s = artifact.run_steps(batch, max_new, seed=seed, eos_id=eos, **SAMPLING)
                for row, (got_row, ref_row) in enumerate(zip(got_s.tokens, ref_s.tokens)):
                    sampled_rows += 1
                    divergence = sampled_divergence(got_row, ref_row, ref_s.accepted[row], ref_s.margins[row])
                    if divergence is None:
                        sampled_identical += 1
                        continue
                    divergences.append({"cache_length": seq_len, "seed": seed, "row": first + row,
                                        "token": divergence[0], "margin": divergence[1]})
    margin_limit = margin_tolerance(max_diff, SAMPLING["temperature"], program.config.primary.vocab_size)
    near_ties = [d for d in divergences if d["margin"] <= margin_limit]
    sampled_mismatches = [{**d, "margin": d["margin"] if np.isfinite(d["margin"]) else None}
                          for d in divergences if d["margin"] > margin_limit]
    sampled_ok = not sampled_mismatches
    allowed = ROUNDING_ROWS if "qa" in quantized_kinds(program.params) else 0.0
    return {
        "prompts": prompts, "buckets": checked,
        "greedy_identical": bool(greedy_ok),
        "generate_graph_identical": bool(generate_ok) if artifact.has_generate_graph else None,
        "sampled_identical": sampled_identical == sampled_rows, "sampling": {**SAMPLING, "seeds": list(seeds)},
        "sampled_rows": sampled_rows, "sampled_rows_identical": sampled_identical,
        "sampled_margin_tolerance": margin_limit, "sampled_near_ties": near_ties,
        "sampled_mismatches": sampled_mismatches,
        "max_abs_logit_diff": max_diff, "logit_tolerance": tolerance,
        "logit_rows": rows, "logit_rows_over_tolerance": rows_over,
        "ok": bool(greedy_ok and generate_ok and sampled_ok and rows_over <= allowed * rows),
    }
