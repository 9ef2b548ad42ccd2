"""Primary-only decoding: tandemc's CPU artifact against ONNX Runtime GenAI's model builder, same weights.

    .venv/bin/pip install onnxruntime-genai onnx-ir      # the builder and its runtime (not tandemc dependencies)
    .venv/bin/python benchmarks/ort_genai_compare.py CKPT [-n 128] [--repeats 5] [--max-seq-len 256]

Writes the checkpoint's primary as a Hugging Face Llama directory (`tandemc export-hf`), builds it with
`python -m onnxruntime_genai.models.builder -p fp32 -e cpu` (GroupQueryAttention, past/present sharing one buffer),
exports tandemc's primary-only CPU artifact (-O1), checks all produce the same greedy tokens, then times GenAI,
tandemc's host loop and tandemc's generate graph on the same prompt (its prefill plus N new tokens), alternating
them --repeats times after a warm-up. Prints ms per new token and the ratios to GenAI (the issue's bar: ≤ 1.25).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from common import PROMPT, machine_line, timed
from tandemc.checkpoint import load_checkpoint
from tandemc.export import export
from tandemc.hf import export_llama
from tandemc.program import ExportOptions
from tandemc.runtime import load

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("-n", "--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    import onnxruntime_genai as og

    ckpt = load_checkpoint(args.checkpoint)
    prompt = ckpt.tokenizer.encode(PROMPT)
    work = Path(tempfile.mkdtemp(prefix="tandemc-genai-"))
    export_llama(ckpt, "primary", work / "hf")
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(work / "hf"), "-o",
                    str(work / "genai"), "-p", "fp32", "-e", "cpu"], check=True, capture_output=True)
    model = og.Model(str(work / "genai"))

    def run_genai():
        params = og.GeneratorParams(model)
        total = len(prompt) + args.new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        while not generator.is_done():
            generator.generate_next_token()
        return [int(t) for t in generator.get_sequence(0)][len(prompt):]

    options = ExportOptions(mode="primary", max_seq_len=(args.max_seq_len,), batch=1, prefill_chunk=64,
                            max_new_tokens=args.new_tokens)
    export(ckpt, "cpu", work / "tandemc", options, verify=False, passes="O1")
    artifact = load(work / "tandemc", threads=args.threads)

    def run_steps():  # the host loop over the prefill and step graphs
        return artifact.run_steps([prompt], args.new_tokens, eos_id=-1).tokens[0]

    def run_generate():  # one call of the generate graph (its loops are ONNX Loop nodes)
        return artifact.run_generate([prompt], args.new_tokens, eos_id=-1).tokens[0]

    # The machine is shared and noisy: alternate the runtimes call by call, and compare the best of each and the
    # median of the per-round ratios.
    genai_tokens, step_tokens, generate_tokens = run_genai(), run_steps(), run_generate()  # warm-up
    rounds = [(timed(run_genai), timed(run_steps), timed(run_generate)) for _ in range(args.repeats)]
    same = genai_tokens == step_tokens == generate_tokens
    ms = 1e3 / args.new_tokens
    print(f"primary {ckpt.config.primary.num_parameters() / 1e6:.1f}M parameters, prompt {len(prompt)} tokens, "
          f"{args.new_tokens} new tokens, cache {args.max_seq_len}, {args.repeats} alternating rounds; same greedy "
          f"tokens: {same}; {machine_line()}")
    print("| runtime | ms/token (best) | / GenAI (best) | / GenAI (median round) |")
    print("|---|---|---|---|")
    for i, name in enumerate(["ONNX Runtime GenAI", "tandemc, host loop (prefill + step graphs)",
                              "tandemc, generate graph (ONNX Loop)"]):
        best = min(r[i] for r in rounds)
        ratios = sorted(r[i] / r[0] for r in rounds)
        print(f"| {name} | {best * ms:.3f} | {best / min(r[0] for r in rounds):.2f} | "
              f"{ratios[len(ratios) // 2]:.2f} |")
    if not same:
        sys.exit("greedy tokens differ between the two runtimes")


if __name__ == "__main__":
    main()
