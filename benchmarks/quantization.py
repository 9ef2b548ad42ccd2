"""Passes on the CPU target: weight bytes, tokens/s, and what quantizing the verifier vs the drafter costs.

    .venv/bin/python benchmarks/quantization.py examples/tandem-stdlib [--prompts 50] [-n 64]
    .venv/bin/python benchmarks/quantization.py --preset 100m --prompts 0 -n 32 --modes primary

For each pass list (the -O0 float baseline first) export a batch-1 CPU artifact per mode, then on the same
prompts: matrix bytes in the artifact (scales included, int4 packed two per byte), tokens/s (best of --repeats,
the variants alternating call by call), greedy agreement with the -O0 artifact over `--prompts` held-out
snippets of the standard library × N new tokens, and, in speed mode, the mean accepted drafts per step.
Prompts 0: timing on one prompt only (random models).

Greedy agreement is given two ways. *decisions*: teacher-forced, on the -O0 artifact's own continuations, the
fraction of positions where the quantized primary picks the same next token (computed with the JAX reference on
the same Program: every artifact is verified against it at export). *sequences*: free-running, the fraction of
the baseline's tokens each quantized artifact reproduces position by position; one early flip makes every later
position of that sequence count as a miss, so it falls fast with sequence length.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from common import PROMPT, add_checkpoint_arguments, benchmark_checkpoint, best_times, machine_line
from tandemc import data, model, safetensors_io
from tandemc.export import export, make_program
from tandemc.program import ExportOptions
from tandemc.runtime import load

VARIANTS = ["O0", "O1", "O1,quantize_int8", "O1,quantize_int8:block=128:activations=int8", "O1,quantize_int4",
            "O1,quantize_int4:activations=int8",
            "O1,quantize_int8:models=primary", "O1,quantize_int8:models=secondary+tandem+drafter",
            "O1,quantize_int4:models=primary", "O1,quantize_int4:models=secondary+tandem+drafter"]


def held_out_prompts(tokenizer, count: int, length: int = 96) -> list[list[int]]:
    """The opening `length` characters of the first `count` held-out standard-library files (≥ 2 lines)."""
    root, files = data.list_files("stdlib", (".py",))
    prompts = []
    for path in files:
        relative = str(path.relative_to(root))
        if not data.is_held_out(relative):
            continue
        text = path.read_text(errors="replace")[:length]
        if text.count("\n") >= 2:
            prompts.append(tokenizer.encode(text))
        if len(prompts) == count:
            break
    return prompts


def decision_agreement(ckpt, options, variant, prompts, continuations) -> float:
    """Teacher-forced: the fraction of the continuations' tokens the Program's primary picks greedily (argmax)
    given each prompt and the continuation so far."""
    program = make_program(ckpt, options, variant)
    params, cfg = jax.tree.map(jnp.asarray, program.params["primary"]), program.config.primary
    same = total = 0
    for prompt, continuation in zip(prompts, continuations):
        logits = model.forward(params, cfg, np.asarray([prompt + continuation], np.int32))[0][0]
        picked = np.asarray(logits).argmax(-1)[len(prompt) - 1:len(prompt) - 1 + len(continuation)]
        same += int(np.sum(picked == np.asarray(continuation)))
        total += len(continuation)
    return same / total


def matrix_bytes(artifact: Path) -> int:
    """Bytes of the weights passes may quantize: everything but embedding tables and norm gains."""
    locations = safetensors_io.tensor_locations(artifact / "weights.safetensors")
    return sum(n for name, (_, n) in locations.items() if not name.endswith(".embed") and "norm" not in name)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_arguments(parser)
    parser.add_argument("--modes", default="primary,speed")
    parser.add_argument("--gamma", type=int, default=4)
    parser.add_argument("--variants", default=";".join(VARIANTS), help="';'-separated pass lists")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("-n", "--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ckpt = benchmark_checkpoint(args)
    prompts = held_out_prompts(ckpt.tokenizer, args.prompts) if args.prompts else []
    timing = ckpt.tokenizer.encode(PROMPT)
    longest = max(len(p) for p in prompts + [timing])
    seq_len = 1 << (longest + args.new_tokens - 1).bit_length()
    work = Path(tempfile.mkdtemp(prefix="tandemc-quant-"))
    rows, baseline, decisions = [], {}, {}
    for mode in args.modes.split(","):
        options = ExportOptions(mode=mode, block_length=args.gamma if mode != "primary" else 0,
                                max_seq_len=(seq_len,), batch=1, prefill_chunk=64,
                                max_new_tokens=min(args.new_tokens, seq_len - 1))
        variants = args.variants.split(";")
        manifests, artifacts = [], []
        for variant in variants:
            out = work / f"{mode}-{len(manifests)}"
            manifests.append(export(ckpt, "cpu", out, options, passes=variant, verify=False))
            artifacts.append(load(out))
        times = best_times([lambda a=a: a.run_steps([timing], args.new_tokens, eos_id=-1) for a in artifacts],
                           args.repeats)
        for variant, manifest, artifact, (best, _) in zip(variants, manifests, artifacts, times):
            tokens, accepted, steps = [], 0, 0
            for prompt in prompts:
                result = artifact.run_steps([prompt], args.new_tokens, eos_id=-1)
                tokens.append(result.tokens[0])
                accepted += result.stats["accepted"]
                steps += result.stats["row_steps"]
            if variant == "O0":
                baseline[mode] = tokens
            same = sum(a == b for got, ref in zip(tokens, baseline[mode]) for a, b in zip(got, ref))
            total = sum(len(ref) for ref in baseline[mode])
            if prompts and variant not in decisions:  # the primary's choices: the same in every mode
                decisions[variant] = decision_agreement(ckpt, options, variant, prompts, baseline[mode])
            quant = [p for p in manifest["passes"] if not p["exact"]]
            rows.append({"mode": mode, "passes": variant, "matrix_bytes": matrix_bytes(artifact.path),
                         "tokens_per_s": args.new_tokens / best,
                         "agreement": same / total if total else None,
                         "decision_agreement": decisions.get(variant),
                         "mean_accepted_per_step": accepted / steps if steps and mode != "primary" else None,
                         "check": quant[-1]["check"] if quant else None})
    print(machine_line())
    for mode in args.modes.split(","):
        base = next(r for r in rows if r["mode"] == mode and r["passes"] == "O0")
        print(f"\n{mode}" + (f" (γ = {args.gamma})" if mode != "primary" else ""))
        print("| passes | matrix MB | smaller | tok/s | vs -O0 | agreement: decisions | sequences | accepted/step |")
        print("|---|---|---|---|---|---|---|---|")
        for r in (r for r in rows if r["mode"] == mode):
            agreement = f"{r['agreement']:.1%}" if r["agreement"] is not None else "–"
            decided = f"{r['decision_agreement']:.2%}" if r["decision_agreement"] is not None else "–"
            accepted = f"{r['mean_accepted_per_step']:.2f}" if r["mean_accepted_per_step"] is not None else "–"
            print(f"| {r['passes']} | {r['matrix_bytes'] / 1e6:.2f} | {base['matrix_bytes'] / r['matrix_bytes']:.2f}× "
                  f"| {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}× | {decided} | {agreement} "
                  f"| {accepted} |")
    print(json.dumps({"checkpoint": str(args.checkpoint or args.preset), "prompts": len(prompts),
                      "new_tokens": args.new_tokens, "rows": rows}))


if __name__ == "__main__":
    main()
