"""Checking an artifact against the JAX reference on the same Program (same weights, dtype and passes).

Greedy tokens must be identical (host-driven steps and the in-graph `generate`; an artifact with step graphs at
several block lengths runs them in turn, the reference on the same schedule), sampled tokens for fixed seeds
must be identical up to near-ties, and the primary's logits must agree within the dtype's tolerance at every
position up to a row's first differing token (after it the two decode different text).

Where activations are quantized to int8 at run time, exact agreement is not to be had: rounding an activation
turns a last-bit difference between two compilers into a whole quantization step, and on a deep model those steps
add up (SmolLM2-135M: ~0.7 of a logit range of ~36). The honest yardstick is the quantization's own size: the
distance of the same reference computed with float activations (`activation_noise`: per logit row, max |Δ|; its
mean and largest). The artifact's rows must then be within twice the largest and on average within twice the mean
(a lowering that computes something else lands far outside: its distance is the size of the logits), and a greedy
token may differ where the reference's top-two logit gap at that decision is within twice the largest (a greedy
near-tie, reported with its gap). Two int8 computations of a 30-layer model are two draws of that noise: their
mean distance is ~1.3× each one's distance from float activations (SmolLM2-135M: 1.08 against 0.82).

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
from tandemc.passes.quantize import kinds as quantized_kinds, with_float_activations
from tandemc.program import Program
from tandemc.schedule import Cycle

# max |Δlogits| allowed between an artifact and the reference, by dtype: different compilers reorder float sums.
LOGIT_TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 2e-1}
SAMPLING = {"temperature": 0.8, "top_k": 0, "top_p": 0.95}


def margin_tolerance(max_logit_diff: float, temperature: float, vocab: int) -> float:
    """The largest decision margin a correct artifact may flip. A logit difference ε moves log-probabilities and CDF
    fractions by up to 2ε/T, and drafter and primary both enter an acceptance test: 4ε/T, doubled because ε is
    the measured largest difference of the primary's verify-block logits, not of every decision's inputs. Summing
    a float32 CDF over V tokens in another order moves it by about √V units of 2^-23 on its own."""
    return max(8 * max_logit_diff / temperature, np.sqrt(vocab) * 2.0 ** -23)


def decision_of_token(index: int, accepted: list[int]) -> int:
    """Which decision produced a row's new token `index`: 0 is the prefill's first token, k the k-th step (each
    step emits its accepted drafts plus one token)."""
    return token_position(index, accepted)[0]


def token_position(index: int, accepted: list[int]) -> tuple[int, int]:
    """(call, position): the call that emitted a row's new token `index` (0 the prefill, k the k-th step) and the
    token's place among that call's emitted tokens — in greedy decoding, the primary logit row it is the argmax of."""
    if index == 0:
        return 0, 0
    emitted = 1
    for k, a in enumerate(accepted, start=1):
        if index < emitted + a + 1:
            return k, index - emitted
        emitted += a + 1
    return len(accepted) + 1, 0


def first_difference(got: list[int], ref: list[int]) -> int | None:
    if got == ref:
        return None
    return next((i for i, (x, y) in enumerate(zip(got, ref)) if x != y), min(len(got), len(ref)))


def top_two_gap(logits: np.ndarray) -> float:
    """The reference's greedy margin: its largest logit minus the runner-up."""
    top = np.partition(np.asarray(logits, np.float64), -2)[-2:]
    return float(top[1] - top[0])


def summary(report: dict) -> str:
    """The one-line account of a report that export, verify and inspect print."""
    buckets = ", ".join(str(b["cache_length"]) for b in report["buckets"])
    greedy = str(report["greedy_identical"])
    ties = report.get("greedy_near_ties") or []
    if ties:
        greedy += (f" ({len(ties)} near-tie{'s' if len(ties) > 1 else ''} under int8 activations, top-two gap <= "
                   f"{max(t['gap'] for t in ties):.2e})")
    noise = report.get("activation_noise")
    tolerance = f"tolerance {report['logit_tolerance']:.0e}" if noise is None else (
        f"mean per position {report['mean_row_logit_diff']:.2e}; int8 activations' own distance from float: max "
        f"{noise['max']:.2e}, mean {noise['mean']:.2e}; allowed twice each")
    over = report.get("logit_rows_over_tolerance")
    return (f"{report['prompts']} prompts per cache length ({buckets}): greedy identical {greedy}, generate graph "
            f"identical {report['generate_graph_identical']}, sampled {sampled_summary(report)}, max |dlogits| "
            f"{report['max_abs_logit_diff']:.2e} ({tolerance}"
            + (f"; exceeded at {over} of {report['logit_rows']} positions)" if over else ")"))


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
    index = first_difference(got, ref)
    if index is None:
        return None
    decision = decision_of_token(index, ref_accepted)
    return index, (ref_margins[decision] if decision < len(ref_margins) else 0.0)


def logit_diffs(got, ref) -> list[float]:
    """max |Δ| of every logit row two greedy runs share: per row of the batch, the calls up to and including the
    one that emitted the first differing token (their inputs are the same text). Rows a finished row leaves NaN,
    and a batch's padding rows, count for nothing."""
    out = []
    for row, (got_row, ref_row) in enumerate(zip(got.tokens, ref.tokens)):
        index = first_difference(got_row, ref_row)
        last = len(ref.logits) - 1 if index is None else token_position(index, ref.accepted[row])[0]
        for a, b in zip(got.logits[:last + 1], ref.logits[:last + 1]):
            diff = np.abs(a[row] - b[row]).reshape(-1, b.shape[-1])
            out += [float(np.nanmax(d)) for d in diff if not np.all(np.isnan(d))]
    return out


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
    quantized_activations = "qa" in quantized_kinds(program.params)
    float_activations = jax.tree.map(jnp.asarray, with_float_activations(program.params))
    eos = artifact.tokenizer.eos_id
    gammas = opts.step_gammas(program.config)

    def schedule():
        """Several step graphs: each in turn, the reference on the same schedule; else the default."""
        return Cycle(gammas) if len(gammas) > 1 else None

    generate_ok = True
    sampled_rows, sampled_identical, divergences = 0, 0, []
    greedy_rows, greedy_divergences = 0, []
    noise, diffs = [], []  # per compared logit row, its max |Δ|: int8 vs float activations, artifact vs reference
    checked = []
    below = 0
    for seq_len in opts.max_seq_len:
        max_new = max(1, min(opts.max_new_tokens, seq_len // 2))
        longest = seq_len - max_new if below else min(seq_len - max_new, 2 * opts.prefill_chunk + 1)
        below = seq_len
        checked.append({"cache_length": seq_len, "longest_prompt": longest, "max_new_tokens": max_new})

        def reference(batch, weights=params, **kw):
            return reference_generate(weights, program.config, batch, mode=opts.mode,
                                      block_length=schedule() or program.gamma or None, max_new_tokens=max_new,
                                      eos_id=eos, max_seq_len=seq_len, **kw)

        bucket_prompts = verification_prompts(program, prompts, longest, seed=seq_len)
        for first in range(0, len(bucket_prompts), opts.batch):
            batch = bucket_prompts[first:first + opts.batch]
            ref = reference(batch, record_logits=True, record_margins=True)  # the sampled runs' compiled program
            got = artifact.run_steps(batch, max_new, eos_id=eos, record_logits=True, block_length=schedule())
            if quantized_activations:
                alt = reference(batch, weights=float_activations, record_logits=True)
                noise += logit_diffs(alt, ref)
            diffs += logit_diffs(got, ref)
            for row, (got_row, ref_row) in enumerate(zip(got.tokens, ref.tokens)):
                greedy_rows += 1
                index = first_difference(got_row, ref_row)
                if index is not None:
                    call, position = token_position(index, ref.accepted[row])
                    gap = top_two_gap(ref.logits[call][row, position]) if call < len(ref.logits) else 0.0
                    greedy_divergences.append({"cache_length": seq_len, "row": first + row, "token": index,
                                               "gap": gap})
            if artifact.has_generate_graph:
                generate_ok &= artifact.run_generate(batch, max_new, eos_id=eos).tokens == ref.tokens
            for seed in seeds:
                ref_s = reference(batch, seed=seed, record_margins=True, **SAMPLING)
                got_s = artifact.run_steps(batch, max_new, seed=seed, eos_id=eos, block_length=schedule(), **SAMPLING)
                for row, (got_row, ref_row) in enumerate(zip(got_s.tokens, ref_s.tokens)):
                    sampled_rows += 1
                    divergence = sampled_divergence(got_row, ref_row, ref_s.accepted[row], ref_s.margins[row])
                    if divergence is None:
                        sampled_identical += 1
                        continue
                    divergences.append({"cache_length": seq_len, "seed": seed, "row": first + row,
                                        "token": divergence[0], "margin": divergence[1]})
    tolerance = LOGIT_TOLERANCE[program.config.dtype]
    mean_diff = float(np.mean(diffs)) if diffs else 0.0
    mean_ok, noise_mean = True, 0.0
    if quantized_activations:
        noise_mean = float(np.mean(noise)) if noise else 0.0
        tolerance = max(tolerance, 2 * max(noise, default=0.0))
        mean_ok = mean_diff <= max(LOGIT_TOLERANCE[program.config.dtype], 2 * noise_mean)
    max_diff = max(diffs, default=0.0)
    rows_over = sum(d > tolerance for d in diffs)
    greedy_near_ties = [d for d in greedy_divergences if quantized_activations and d["gap"] <= tolerance]
    greedy_ok = len(greedy_near_ties) == len(greedy_divergences)
    margin_limit = margin_tolerance(max_diff, SAMPLING["temperature"], program.config.primary.vocab_size)
    near_ties = [d for d in divergences if d["margin"] <= margin_limit]
    sampled_mismatches = [{**d, "margin": d["margin"] if np.isfinite(d["margin"]) else None}
                          for d in divergences if d["margin"] > margin_limit]
    sampled_ok = not sampled_mismatches
    return {
        "prompts": prompts, "buckets": checked,
        "greedy_identical": not greedy_divergences, "greedy_rows": greedy_rows,
        "greedy_near_ties": greedy_near_ties,
        "greedy_mismatches": [d for d in greedy_divergences if d not in greedy_near_ties],
        "generate_graph_identical": bool(generate_ok) if artifact.has_generate_graph else None,
        "sampled_identical": sampled_identical == sampled_rows, "sampling": {**SAMPLING, "seeds": list(seeds)},
        "sampled_rows": sampled_rows, "sampled_rows_identical": sampled_identical,
        "sampled_margin_tolerance": margin_limit, "sampled_near_ties": near_ties,
        "sampled_mismatches": sampled_mismatches,
        "max_abs_logit_diff": max_diff, "logit_tolerance": tolerance,
        "mean_row_logit_diff": mean_diff,
        "activation_noise": {"mean": noise_mean, "max": max(noise, default=0.0)} if quantized_activations else None,
        "logit_rows": len(diffs), "logit_rows_over_tolerance": rows_over,
        "ok": bool(greedy_ok and generate_ok and sampled_ok and not rows_over and mean_ok),
    }
