"""Checking an artifact against the JAX reference on the same Program (same weights, dtype and passes).

Greedy tokens must be identical (host-driven steps and the in-graph `generate`), sampled tokens for fixed seeds
must be identical, and the primary's verify-block logits must agree within the dtype's tolerance — at every
position, or, where activations are quantized at run time, at all but a few: rounding an activation to int8 turns
a last-bit difference between two compilers into a whole quantization step now and then.
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
    greedy_ok = generate_ok = sampled_ok = True
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
            ref = reference(batch, record_logits=True)
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
                ref_s = reference(batch, seed=seed, **SAMPLING)
                got_s = artifact.run_steps(batch, max_new, seed=seed, eos_id=eos, **SAMPLING)
                sampled_ok &= got_s.tokens == ref_s.tokens
    allowed = ROUNDING_ROWS if "qa" in quantized_kinds(program.params) else 0.0
    return {
        "prompts": prompts, "buckets": checked,
        "greedy_identical": bool(greedy_ok),
        "generate_graph_identical": bool(generate_ok) if artifact.has_generate_graph else None,
        "sampled_identical": bool(sampled_ok), "sampling": {**SAMPLING, "seeds": list(seeds)},
        "max_abs_logit_diff": max_diff, "logit_tolerance": tolerance,
        "logit_rows": rows, "logit_rows_over_tolerance": rows_over,
        "ok": bool(greedy_ok and generate_ok and sampled_ok and rows_over <= allowed * rows),
    }
