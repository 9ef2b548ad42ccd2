"""SmolLM2-135M-Instruct: tandemc's Tandem + SPEED against llama.cpp's own speculative decoding, with the GGUF
file's Q4_1 primary and the bundled standalone drafter written as GGUF (`tandemc export-gguf`), batch 1, greedy,
2 threads.

    .venv/bin/pip install -e '.[test]'          # llama-cpp-python: its sdist carries the llama.cpp source
    .venv/bin/python benchmarks/smollm2_tandem.py --work /tmp/bench-tandem --gammas 3,4,5      # builds artifacts
    .venv/bin/python benchmarks/smollm2_llama_cpp.py --work /tmp/bench-tandem --tandemc speed-int4-g4,speed-g4

llama.cpp's `llama-speculative-simple` is built from the llama.cpp source in the `llama-cpp-python` sdist of the
installed version (cmake and a C++ compiler; ~5 CPU-minutes once, kept in WORK). It runs the GGUF file as
shipped (Q4_1 layers, Q8_0 table) and the drafter in float32, greedy (--temp 0 --top-k 1), no EOS stop, at each
--gammas as its --spec-draft-n-max; its figure is its own timers' prompt + decode seconds (model loading
excluded). llama.cpp primary-only is llama-cpp-python's `Llama.generate` on the same file. tandemc runs its
primary-only artifacts and the named Tandem + SPEED artifacts; every engine alternates with the others round by
round and the figure is total new tokens / seconds of its best round, prefill included.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from smollm2_decode import gguf_file, tandemc  # noqa: E402
from smollm2_tandem import CHAT, code_prompts  # noqa: E402

from tandemc.checkpoint import load_checkpoint  # noqa: E402
from tandemc.tokenizer import render_chat  # noqa: E402


def build_speculative(work: Path) -> Path:
    """llama-speculative-simple from the llama.cpp source of the installed llama-cpp-python's sdist."""
    binary = work / "llama-build" / "bin" / "llama-speculative-simple"
    if binary.exists():
        return binary
    version = importlib.metadata.version("llama-cpp-python")
    sdist = work / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps",
                        "--no-binary", ":all:", "-d", str(work), "-q"], check=True)
    source = work / f"llama_cpp_python-{version}"
    if not source.exists():
        with tarfile.open(sdist) as archive:
            archive.extractall(work, filter="data")
    llama = source / "vendor" / "llama.cpp"
    subprocess.run(["cmake", "-S", str(llama), "-B", str(work / "llama-build"), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_NATIVE=ON"],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(work / "llama-build"), "--target", "llama-speculative-simple", "-j",
                    str(os.cpu_count() or 2)], check=True, stdout=subprocess.DEVNULL)
    return binary


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tandemc-smollm2-tandem"),
                        help="smollm2_tandem.py's work directory (its ckpt and artifacts).")
    parser.add_argument("--tandemc", default="speed-int4-g4,speed-g4", help="Tandem + SPEED artifacts to compare.")
    parser.add_argument("-n", "--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gammas", default="2,4,6")
    parser.add_argument("--prompts", type=int, default=4, help="Prompts per set.")
    args = parser.parse_args()
    import llama_cpp

    from tandemc.runtime import load

    work, n = args.work, args.new_tokens
    binary = build_speculative(work)
    drafter = work / "drafter.gguf"
    if not drafter.exists():
        tandemc("export-gguf", str(work / "ckpt"), "--tokenizer-from", str(gguf_file()), "-o", str(drafter))
    ckpt = load_checkpoint(work / "ckpt")
    tok = ckpt.tokenizer
    sets = {"code": code_prompts(tok, args.prompts, 100),
            "chat": [tok.encode(render_chat(ckpt.config.tokenizer.chat_template, q, tok)) for q in CHAT[:args.prompts]]}
    names = ["primary", "primary-int4", *args.tandemc.split(",")]
    artifacts = {name: load(work / name, threads=2) for name in names}
    llm = llama_cpp.Llama(model_path=str(gguf_file()), n_ctx=512, n_threads=2, n_batch=512, verbose=False)
    gammas = [int(g) for g in args.gammas.split(",")]

    def speculative(gamma):
        def run(prompts):
            seconds, accepted, drafted = 0.0, 0, 0
            for i, p in enumerate(prompts):
                prompt_file = work / f"prompt-{i}.txt"
                prompt_file.write_text(tok.decode(p))
                log = subprocess.run([str(binary), "-m", str(gguf_file()), "-md", str(drafter), "-f", str(prompt_file),
                                      "-n", str(n), "--temp", "0", "--top-k", "1", "-t", "2", "-td", "2", "-c", "512",
                                      "--spec-draft-n-max", str(gamma), "--ignore-eos", "-ngl", "0", "-ngld", "0"],
                                     capture_output=True, text=True, check=True)
                text = log.stdout + log.stderr
                for kind in ("encoded", "decoded"):
                    seconds += float(re.search(rf"{kind}\s+\d+ tokens in\s+([\d.]+) seconds", text).group(1))
                drafted += int(re.search(r"n_drafted = (\d+)", text).group(1))
                accepted += int(re.search(r"n_accept  = (\d+)", text).group(1))
            return seconds, accepted, drafted
        return run

    def llama_primary(prompts):
        start = time.perf_counter()
        for p in prompts:
            for i, _ in enumerate(llm.generate(p, temp=0.0, top_k=1, reset=True)):
                if i + 1 == n:
                    break
        return time.perf_counter() - start, 0, 0

    def tandemc_run(artifact):
        def run(prompts):
            start, accepted, steps = time.perf_counter(), 0, 0
            for p in prompts:
                stats = artifact.run_steps([p], n, eos_id=-1).stats
                accepted, steps = accepted + stats["accepted"], steps + stats["steps"]
            return time.perf_counter() - start, accepted, steps
        return run

    engines = {"llama.cpp primary (Q4_1)": llama_primary,
               **{f"llama.cpp speculative γ={g}": speculative(g) for g in gammas},
               **{f"tandemc {name}": tandemc_run(a) for name, a in artifacts.items()}}
    for set_name, prompts in sets.items():
        for run in engines.values():
            run(prompts)  # warm-up
        best, counts = {name: float("inf") for name in engines}, {}
        for _ in range(args.repeats):
            for name, run in engines.items():
                seconds, accepted, per = run(prompts)
                best[name], counts[name] = min(best[name], seconds), (accepted, per)
        load1, load5, _ = os.getloadavg()
        total = n * len(prompts)
        print(f"\n{set_name}: {len(prompts)} prompts, {n} new tokens each, greedy, 2 threads; best of {args.repeats} "
              f"alternating rounds; load average {load1:.2f} (1 min) {load5:.2f} (5 min)")
        print("| engine | tokens/s | × llama.cpp primary | drafts accepted |")
        print("|---|---|---|---|")
        for name in engines:
            accepted, per = counts[name]
            rate = "" if not per else (f"{accepted / per:.2f} per step" if name.startswith("tandemc")
                                       else f"{accepted}/{per} drafts")
            print(f"| {name} | {total / best[name]:.1f} | {best['llama.cpp primary (Q4_1)'] / best[name]:.2f} | "
                  f"{rate} |")


if __name__ == "__main__":
    main()
