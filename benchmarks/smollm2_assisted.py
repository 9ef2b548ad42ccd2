"""SmolLM2-135M-Instruct: tandemc's Tandem + SPEED against Hugging Face transformers' assisted generation, with
the same primary and the bundled standalone drafter, float32, batch 1, greedy, 2 threads.

    .venv/bin/pip install -e '.[test]' torch==2.13.0 transformers      # torch pinned: the CPU build
    .venv/bin/python benchmarks/smollm2_tandem.py --work /tmp/bench-tandem --gammas 3,4,5      # builds artifacts
    .venv/bin/python benchmarks/smollm2_assisted.py --work /tmp/bench-tandem --tandemc speed-g4 --gammas 2,3,4,5

The primary and the drafter go to transformers through `tandemc export-hf` (the drafter materialised as a plain
Llama over the whole vocabulary, docs: README's export-hf row). Prompts are smollm2_tandem.py's (held-out code,
chat questions), N new tokens each with no EOS stop (min_new_tokens = max_new_tokens). transformers runs
primary-only (`generate`) and assisted (`assistant_model=`, a constant `num_assistant_tokens` = γ, no confidence
cut-off) at each γ; tandemc runs its primary-only artifact and the named Tandem + SPEED artifact; every engine
alternates with the others round by round and the figure is total new tokens / seconds of its best round.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from smollm2_decode import tandemc  # noqa: E402
from smollm2_tandem import CHAT, code_prompts  # noqa: E402

from tandemc.checkpoint import load_checkpoint  # noqa: E402
from tandemc.tokenizer import render_chat  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tandemc-smollm2-tandem"),
                        help="smollm2_tandem.py's work directory (its ckpt and artifacts).")
    parser.add_argument("--tandemc", default="speed-g4", help="The Tandem + SPEED artifact to compare.")
    parser.add_argument("-n", "--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gammas", default="2,3,4,5")
    parser.add_argument("--prompts", type=int, default=4, help="Prompts per set.")
    args = parser.parse_args()
    import torch
    import transformers

    from tandemc.runtime import load

    torch.set_num_threads(2)
    work, n = args.work, args.new_tokens
    for model in ("primary", "drafter"):
        if not (work / f"hf-{model}" / "config.json").exists():
            tandemc("export-hf", str(work / "ckpt"), "--model", model, "-o", str(work / f"hf-{model}"), "--force")
    hf = {m: transformers.AutoModelForCausalLM.from_pretrained(work / f"hf-{m}", dtype=torch.float32).eval()
          for m in ("primary", "drafter")}
    ckpt = load_checkpoint(work / "ckpt")
    tok = ckpt.tokenizer
    sets = {"code": code_prompts(tok, args.prompts, 100),
            "chat": [tok.encode(render_chat(ckpt.config.tokenizer.chat_template, q, tok)) for q in CHAT[:args.prompts]]}
    artifacts = {name: load(work / name, threads=2) for name in ("primary", args.tandemc)}
    gammas = [int(g) for g in args.gammas.split(",")]

    def transformers_run(gamma):
        def decode(prompts):
            out = []
            for p in prompts:
                extra = {} if gamma is None else dict(assistant_model=hf["drafter"], num_assistant_tokens=gamma,
                                                      num_assistant_tokens_schedule="constant",
                                                      assistant_confidence_threshold=0.0)
                with torch.no_grad():
                    ids = hf["primary"].generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n,
                                                 do_sample=False, **extra)
                out.append(ids[0, len(p):].tolist())
            return out
        return decode

    def tandemc_run(artifact):
        return lambda prompts: [artifact.run_steps([p], n, eos_id=-1).tokens[0] for p in prompts]

    engines = {"tandemc primary": tandemc_run(artifacts["primary"]),
               f"tandemc {args.tandemc}": tandemc_run(artifacts[args.tandemc]),
               "transformers primary": transformers_run(None),
               **{f"transformers assisted γ={g}": transformers_run(g) for g in gammas}}
    for set_name, prompts in sets.items():
        outputs = {name: run(prompts) for name, run in engines.items()}  # warm-up and the tokens
        best = {name: float("inf") for name in engines}
        for _ in range(args.repeats):
            for name, run in engines.items():
                start = time.perf_counter()
                run(prompts)
                best[name] = min(best[name], time.perf_counter() - start)
        load1, load5, _ = os.getloadavg()
        total = n * len(prompts)
        reference = outputs["tandemc primary"]
        print(f"\n{set_name}: {len(prompts)} prompts, {n} new tokens each, greedy, float32, 2 threads; best of "
              f"{args.repeats} alternating rounds; load average {load1:.2f} (1 min) {load5:.2f} (5 min)")
        print("| engine | tokens/s | × transformers primary | tandemc Tandem + SPEED × this | tokens = tandemc "
              "primary's |")
        print("|---|---|---|---|---|")
        ours = best[f"tandemc {args.tandemc}"]
        for name in engines:
            same = sum(a == b for a, b in zip(outputs[name], reference))
            print(f"| {name} | {total / best[name]:.1f} | {best['transformers primary'] / best[name]:.2f} | "
                  f"{best[name] / ours:.2f} | {same}/{len(prompts)} |")


if __name__ == "__main__":
    main()
