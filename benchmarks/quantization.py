"""Passes on the CPU target: weight bytes, tokens/s, and what quantizing the verifier vs the drafter costs.

    .venv/bin/python benchmarks/quantization.py examples/tandem-stdlib [--prompts 50] [-n 64]
    .venv/bin/python benchmarks/quantization.py --preset 100m --prompts 0 -n 32 --modes primary

For each pass list (the -O0 float baseline first) export a batch-1 CPU artifact per mode, then on the same
prompts: matrix bytes in the artifact (scales included, int4 packed two per byte), tokens/s (best of --repeats,
one run, one machine), greedy token agreement with the -O0 artifact (the fraction of the baseline's tokens
reproduced position by position, over `--prompts` held-out snippets of the standard library × N new tokens)
and, in speed mode, the mean accepted drafts per step. Prompts 0: timing on one prompt only (random models).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import PROMPT, add_checkpoint_arguments, benchmark_checkpoint, timed
from tandemc import data, safetensors_io
from tandemc.export import export
from tandemc.program import ExportOptions
from tandemc.runtime import load

VARIANTS = ["O0", "O1", "O1,quantize_int8", "O1,quantize_int4",
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
    rows, baseline = [], {}
    for mode in args.modes.split(","):
        for variant in args.variants.split(";"):
            options = ExportOptions(mode=mode, block_length=args.gamma if mode != "primary" else 0,
                                    max_seq_len=(seq_len,), batch=1, prefill_chunk=64,
                                    max_new_tokens=min(args.new_tokens, seq_len - 1))
            out = work / f"{mode}-{len(rows)}"
            manifest = export(ckpt, "cpu", out, options, passes=variant, verify=False)
            artifact = load(out)
            artifact.run_steps([timing], args.new_tokens, eos_id=-1)  # warm-up
            best = min(timed(lambda: artifact.run_steps([timing], args.new_tokens, eos_id=-1))
                       for _ in range(args.repeats))
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
            quant = [p for p in manifest["passes"] if not p["exact"]]
            rows.append({"mode": mode, "passes": variant, "matrix_bytes": matrix_bytes(out),
                         "tokens_per_s": args.new_tokens / best,
                         "agreement": same / total if total else None,
                         "mean_accepted_per_step": accepted / steps if steps and mode != "primary" else None,
                         "check": quant[-1]["check"] if quant else None})
    for mode in args.modes.split(","):
        base = next(r for r in rows if r["mode"] == mode and r["passes"] == "O0")
        print(f"\n{mode}" + (f" (γ = {args.gamma})" if mode != "primary" else ""))
        print("| passes | matrix MB | smaller | tok/s | vs -O0 | greedy agreement | accepted/step |")
        print("|---|---|---|---|---|---|---|")
        for r in (r for r in rows if r["mode"] == mode):
            agreement = f"{r['agreement']:.1%}" if r["agreement"] is not None else "–"
            accepted = f"{r['mean_accepted_per_step']:.2f}" if r["mean_accepted_per_step"] is not None else "–"
            print(f"| {r['passes']} | {r['matrix_bytes'] / 1e6:.2f} | {base['matrix_bytes'] / r['matrix_bytes']:.2f}× "
                  f"| {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}× | {agreement} "
                  f"| {accepted} |")
    print(json.dumps({"checkpoint": str(args.checkpoint or args.preset), "prompts": len(prompts),
                      "new_tokens": args.new_tokens, "rows": rows}))


if __name__ == "__main__":
    main()
