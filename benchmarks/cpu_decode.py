"""CPU decoding speed: the ONNX artifact (ONNX Runtime) against the JAX reference (jit), same mode, same tokens.

    .venv/bin/python benchmarks/cpu_decode.py CKPT [--modes primary,speed] [--gammas 1,2,4,8] [-n 128]
    .venv/bin/python benchmarks/cpu_decode.py --preset 100m ...      # a random checkpoint of a preset

For each mode and block length: export a batch-1 CPU artifact, check its greedy tokens equal the reference's,
then time both decoding the same prompt (best of --repeats after a warm-up that compiles; every JAX and ONNX run
of every mode alternating with all the others, so mode/primary ratios see the same machine load).
Prints tokens/s, ms per token, mean tokens per step, and the ratios ONNX/JAX and mode/primary (one run, one
machine). --profile then decodes once more under ONNX Runtime's profiler and splits each step graph's kernel time
by scope (verify, the drafts, tandem_kv, the rest): shares only, since the profiler itself slows every kernel.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax

from common import PROMPT, add_checkpoint_arguments, benchmark_checkpoint, best_times, machine_line
from tandemc.decoding import generate
from tandemc.export import export, make_program
from tandemc.profiling import summarize
from tandemc.program import ExportOptions
from tandemc.runtime import load

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser)
    parser.add_argument("--modes", default="primary,speed")
    parser.add_argument("--gammas", default="1,2,4,8")
    parser.add_argument("-n", "--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    parser.add_argument("--passes", default="O1", help="passes for both sides (docs/passes.md) [default: O1]")
    parser.add_argument("--profile", action="store_true", help="also profile each ONNX step graph (time by scope)")
    args = parser.parse_args()
    ckpt = benchmark_checkpoint(args)
    prompt = ckpt.tokenizer.encode(PROMPT)
    seq_len = 1 << (len(prompt) + args.new_tokens - 1).bit_length()
    eos = -1  # decode the full length: equal work for every mode
    work = Path(tempfile.mkdtemp(prefix="tandemc-bench-"))
    cases = []  # (mode, γ, artifact folder, JAX run, ONNX run)
    for mode in args.modes.split(","):
        for gamma in ([0] if mode == "primary" else [int(g) for g in args.gammas.split(",")]):
            options = ExportOptions(mode=mode, block_length=gamma, max_seq_len=(seq_len,), batch=1,
                                    prefill_chunk=64, max_new_tokens=min(args.new_tokens, seq_len - 1))
            out = work / f"{mode}-{gamma}"
            export(ckpt, "cpu", out, options, verify=False, passes=args.passes)
            artifact = load(out, threads=args.threads)
            program = make_program(ckpt, options, args.passes)
            params = jax.tree.map(jax.numpy.asarray, program.params)

            def run_jax(params=params, config=program.config, mode=mode, gamma=gamma):
                return generate(params, config, [prompt], mode=mode, block_length=gamma or None,
                                max_new_tokens=args.new_tokens, eos_id=eos, max_seq_len=seq_len)

            def run_onnx(artifact=artifact):
                return artifact.run_steps([prompt], args.new_tokens, eos_id=eos)

            cases.append((mode, gamma, out, run_jax, run_onnx))
    # every run of every mode alternates with every other, so a drift in the machine's load hits all rows alike
    timings = best_times([fn for case in cases for fn in case[3:]], args.repeats)
    rows = []
    for (mode, gamma, out, _, _), (jax_s, jax_out), (onnx_s, onnx_out) in zip(cases, timings[::2], timings[1::2]):
        n = len(jax_out.tokens[0])
        rows.append({"mode": mode, "gamma": gamma, "tokens": n, "identical": onnx_out.tokens == jax_out.tokens,
                     "jax_tokens_per_s": n / jax_s, "onnx_tokens_per_s": n / onnx_s,
                     "onnx_ms_per_token": 1000 * onnx_s / n, "onnx_over_jax": jax_s / onnx_s,
                     "tokens_per_step": jax_out.stats["mean_tokens_per_step"]})
        if args.profile:
            profiled = load(out, threads=args.threads, profile=work / "traces" / out.name)
            profiled.run_steps([prompt], args.new_tokens, eos_id=eos)
            rows[-1]["profile"] = summarize(profiled.backend.end_profiling()[f"step.s{seq_len}"])
    base = next((r for r in rows if r["mode"] == "primary"), None)
    print(machine_line())
    print(f"{'mode':8s} {'γ':>2s} {'same':>5s} {'JAX tok/s':>10s} {'ONNX tok/s':>11s} {'ONNX ms/tok':>12s} "
          f"{'ONNX/JAX':>9s} {'tok/step':>9s} {'vs primary':>11s}")
    for r in rows:
        speedup = r["onnx_tokens_per_s"] / base["onnx_tokens_per_s"] if base else float("nan")
        r["onnx_vs_primary"] = speedup
        print(f"{r['mode']:8s} {r['gamma']:2d} {str(r['identical']):>5s} {r['jax_tokens_per_s']:10.1f} "
              f"{r['onnx_tokens_per_s']:11.1f} {r['onnx_ms_per_token']:12.2f} {r['onnx_over_jax']:9.2f} "
              f"{r['tokens_per_step']:9.2f} {speedup:11.2f}")
    if args.profile:
        print_profiles(rows)
    print(json.dumps({"checkpoint": str(args.checkpoint or args.preset), "passes": args.passes,
                      "new_tokens": args.new_tokens,
                      "prompt_tokens": len(prompt), "cache_length": seq_len, "rows": rows}))
    assert all(r["identical"] for r in rows), "an ONNX artifact's tokens differ from the reference"


def print_profiles(rows):
    """Each step graph's kernel time split by scope, in percent (profiled; ratios, not absolute times)."""
    print(f"{'mode':8s} {'γ':>2s} {'kernels':>8s} {'verify':>7s} {'drafts':>7s} {'per draft':>10s} "
          f"{'tandem_kv':>10s} {'rest':>6s}")
    for r in rows:
        scopes = r["profile"]["by_scope"]
        total = sum(scopes.values()) or 1.0
        drafts = sum(v for k, v in scopes.items() if k.startswith("draft"))
        share = {k: 100 * v / total for k, v in scopes.items()}
        verify = share.get("verify", 0.0)
        kv = share.get("tandem_kv", 0.0)
        print(f"{r['mode']:8s} {r['gamma']:2d} {r['profile']['kernels_per_run']:8.0f} {verify:6.1f}% "
              f"{100 * drafts / total:6.1f}% {100 * drafts / total / max(r['gamma'], 1):9.1f}% {kv:9.1f}% "
              f"{100 - verify - kv - 100 * drafts / total:5.1f}%")


if __name__ == "__main__":
    main()
