"""SmolLM2-135M-Instruct: tandemc's Tandem + SPEED against the peers' own speculative decoding with the bundled
standalone drafter: llama.cpp, ONNX Runtime GenAI and Hugging Face transformers. Batch 1, greedy, 2 threads.

    .venv/bin/pip install -e '.[test]' onnxruntime-genai==0.18.0 onnx-ir torch==2.13.0 transformers
    .venv/bin/python benchmarks/smollm2_tandem.py --work /tmp/bench-tandem --gammas 3,4,5      # builds artifacts
    .venv/bin/python benchmarks/smollm2_peers.py --work /tmp/bench-tandem --tandemc speed-g4,speed-int4-g4

The drafter goes to each peer as a plain Llama over the whole vocabulary (`tandemc export-gguf`, `export-hf`);
the primary as each runs it best:
- llama.cpp: the GGUF file as shipped (Q4_1 layers, Q8_0 table); `llama-speculative-simple` (built once from the
  llama.cpp source in the installed llama-cpp-python's sdist: cmake and a C++ compiler, ~5 CPU-minutes, kept in
  WORK) with the float32 drafter GGUF (--spec-type draft-simple) at --spec-draft-n-max γ, its other settings
  default; timed by its own timers (prompt + decode, model loading excluded). Primary-only: llama-cpp-python on
  the same file.
- ONNX Runtime GenAI 0.18: its model builder's int4 and fp32 models of the primary and an fp32 model of the
  drafter, joined as docs/SpeculativeDecoding.md of onnxruntime-genai says (`model.draft`, `speculative.
  max_draft_tokens` = γ).
- transformers (float32): `generate(assistant_model=drafter)` with a constant `num_assistant_tokens` = γ.
tandemc runs the named Tandem + SPEED artifacts and the primary-only artifacts with their weights (float32, the
file's int4 integers, symmetric int4 as GenAI's builder makes it: smollm2_tandem.py). Prompts are smollm2_tandem.py's
(held-out code, chat questions), N new tokens each with no EOS stop. The engines take turns prompt by prompt,
--repeats times; the figure is total new tokens / the sum over prompts of each one's best time, prefill included.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import best_in_turns, machine_line  # noqa: E402
from smollm2_decode import gguf_file, tandemc  # noqa: E402
from smollm2_tandem import CHAT, code_prompts, same_weights_primary  # noqa: E402

from tandemc.checkpoint import load_checkpoint  # noqa: E402
from tandemc.tokenizer import render_chat  # noqa: E402


def build_llama_speculative(work: Path) -> Path:
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
    subprocess.run(["cmake", "-S", str(source / "vendor" / "llama.cpp"), "-B", str(work / "llama-build"),
                    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_NATIVE=ON"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(work / "llama-build"), "--target", "llama-speculative-simple", "-j",
                    str(os.cpu_count() or 2)], check=True, stdout=subprocess.DEVNULL)
    return binary


def llama_cpp_engines(work: Path, tok, n: int, gammas: list[int]) -> dict:
    import llama_cpp

    binary = build_llama_speculative(work)
    drafter = work / "drafter.gguf"
    if not drafter.exists():
        tandemc("export-gguf", str(work / "ckpt"), "--tokenizer-from", str(gguf_file()), "-o", str(drafter))
    llm = llama_cpp.Llama(model_path=str(gguf_file()), n_ctx=512, n_threads=2, n_batch=512, verbose=False)

    def primary(prompts):
        start, out = time.perf_counter(), []
        for p in prompts:
            out.append([])
            for token in llm.generate(p, temp=0.0, top_k=1, reset=True):
                out[-1].append(int(token))
                if len(out[-1]) == n:
                    break
        return time.perf_counter() - start, out, None

    def speculative(gamma):
        def run(prompts):
            seconds, accepted, drafted = 0.0, 0, 0
            for i, p in enumerate(prompts):
                prompt_file = work / f"prompt-{i}.txt"
                prompt_file.write_text(tok.decode(p))
                log = subprocess.run([str(binary), "-m", str(gguf_file()), "-md", str(drafter), "-f", str(prompt_file),
                                      "-n", str(n), "--temp", "0", "--top-k", "1", "-t", "2", "-td", "2", "-c", "512",
                                      "--spec-type", "draft-simple", "--spec-draft-n-max", str(gamma),
                                      "--ignore-eos"],
                                     capture_output=True, text=True, check=True)
                text = log.stdout + log.stderr
                (_, encode), (decoded, decode) = (
                    re.search(rf"{kind}\s+(\d+) tokens in\s+([\d.]+) seconds", text).groups()
                    for kind in ("encoded", "decoded"))
                seconds += float(encode) + float(decode) * n / int(decoded)  # it may decode a token past n
                drafted += int(re.search(r"n_drafted = (\d+)", text).group(1))
                accepted += int(re.search(r"n_accept  = (\d+)", text).group(1))
            return seconds, None, f"{accepted}/{drafted} drafts"
        return run

    return {"llama.cpp primary (Q4_1)": primary,
            **{f"llama.cpp speculative γ={g}": speculative(g) for g in gammas}}


def genai_engines(work: Path, n: int, gammas: list[int]) -> dict:
    import onnxruntime_genai as og

    for model in ("primary", "drafter"):
        if not (work / f"hf-{model}" / "config.json").exists():
            tandemc("export-hf", str(work / "ckpt"), "--model", model, "-o", str(work / f"hf-{model}"), "--force")
    for name, source, precision in (("genai-int4", "primary", "int4"), ("genai-fp32", "primary", "fp32"),
                                    ("genai-drafter", "drafter", "fp32")):
        if not (work / name / "genai_config.json").exists():
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(work / f"hf-{source}"),
                            "-o", str(work / name), "-p", precision, "-e", "cpu"], check=True, capture_output=True)
    draft = json.loads((work / "genai-drafter" / "genai_config.json").read_text())["model"]["decoder"]
    draft["filename"] = f"draft/{draft['filename']}"
    models = {}
    for target in ("genai-int4", "genai-fp32"):
        joined = work / f"{target}-speculative"  # GenAI refuses paths with "..": hard links of both models' files
        if not (joined / "genai_config.json").exists():
            shutil.rmtree(joined, ignore_errors=True)
            shutil.copytree(work / target, joined, copy_function=os.link)
            shutil.copytree(work / "genai-drafter", joined / "draft", copy_function=os.link)
            config = json.loads((work / target / "genai_config.json").read_text())
            config["model"]["draft"] = draft
            config["speculative"] = {"max_draft_tokens": gammas[0]}
            (joined / "genai_config.json").unlink()  # a hard link: writing would change the target's own
            (joined / "genai_config.json").write_text(json.dumps(config, indent=2))
        models[target] = og.Model(str(work / target))
        models[f"{target}-speculative"] = og.Model(str(joined))

    def engine(model, gamma=None):
        def run(prompts):
            start, out, accepted, proposed = time.perf_counter(), [], 0, 0
            for p in prompts:
                params = og.GeneratorParams(model)
                params.set_search_options(max_length=len(p) + n, min_length=len(p) + n, do_sample=False)
                if gamma:
                    params.set_speculative_options(max_draft_tokens=gamma)
                generator = og.Generator(model, params)
                generator.append_tokens(p)
                while not generator.is_done():
                    generator.generate_next_token()
                out.append([int(t) for t in generator.get_sequence(0)][len(p):])
                if gamma:
                    stats = generator.get_speculative_stats()
                    accepted += int(stats.get("draft_tokens_accepted", 0))
                    proposed += int(stats.get("draft_tokens_proposed", 0))
            return time.perf_counter() - start, out, f"{accepted}/{proposed} drafts" if gamma else None
        return run

    return {"GenAI primary int4": engine(models["genai-int4"]),
            **{f"GenAI speculative int4 γ={g}": engine(models["genai-int4-speculative"], g) for g in gammas},
            "GenAI primary fp32": engine(models["genai-fp32"]),
            **{f"GenAI speculative fp32 γ={g}": engine(models["genai-fp32-speculative"], g) for g in gammas}}


def transformers_engines(work: Path, n: int, gammas: list[int]) -> dict:
    import torch
    import transformers

    torch.set_num_threads(2)
    for model in ("primary", "drafter"):
        if not (work / f"hf-{model}" / "config.json").exists():
            tandemc("export-hf", str(work / "ckpt"), "--model", model, "-o", str(work / f"hf-{model}"), "--force")
    hf = {m: transformers.AutoModelForCausalLM.from_pretrained(work / f"hf-{m}", dtype=torch.float32).eval()
          for m in ("primary", "drafter")}

    def engine(gamma=None):
        def run(prompts):
            start, out = time.perf_counter(), []
            extra = {} if gamma is None else dict(assistant_model=hf["drafter"], num_assistant_tokens=gamma,
                                                  num_assistant_tokens_schedule="constant",
                                                  assistant_confidence_threshold=0.0)
            for p in prompts:
                with torch.no_grad():
                    ids = hf["primary"].generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n,
                                                 do_sample=False, **extra)
                out.append(ids[0, len(p):].tolist())
            return time.perf_counter() - start, out, None
        return run

    return {"transformers primary (float32)": engine(),
            **{f"transformers assisted γ={g}": engine(g) for g in gammas}}


def tandemc_engine(artifact, n: int):
    def run(prompts):
        start, out, accepted, steps = time.perf_counter(), [], 0, 0
        for p in prompts:
            result = artifact.run_steps([p], n, eos_id=-1)
            out.append(result.tokens[0])
            accepted, steps = accepted + result.stats["accepted"], steps + result.stats["steps"]
        return time.perf_counter() - start, out, f"{accepted / steps:.2f} per step" if accepted else None
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tandemc-smollm2-tandem"),
                        help="smollm2_tandem.py's work directory (its ckpt and artifacts).")
    parser.add_argument("--tandemc", default="speed-g4,speed-int4-g4", help="Tandem + SPEED artifacts to compare.")
    parser.add_argument("--peers", default="llama.cpp,genai,transformers")
    parser.add_argument("-n", "--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--gammas", default="2,4,6", help="The peers' draft lengths.")
    parser.add_argument("--prompts", type=int, default=4, help="Prompts per set.")
    args = parser.parse_args()
    from tandemc.runtime import load

    work, n = args.work, args.new_tokens
    gammas = [int(g) for g in args.gammas.split(",")]
    ckpt = load_checkpoint(work / "ckpt")
    tok = ckpt.tokenizer
    sets = {"code": code_prompts(tok, args.prompts, 100),
            "chat": [tok.encode(render_chat(ckpt.config.tokenizer.chat_template, q, tok)) for q in CHAT[:args.prompts]]}
    named = args.tandemc.split(",")
    primaries = dict.fromkeys(["primary", *map(same_weights_primary, named)])  # each one's primary-only artifact
    engines = {f"tandemc {name}": tandemc_engine(load(work / name, threads=2), n) for name in [*primaries, *named]}
    peers = args.peers.split(",")
    if "llama.cpp" in peers:
        engines.update(llama_cpp_engines(work, tok, n, gammas))
    if "genai" in peers:
        engines.update(genai_engines(work, n, gammas))
    if "transformers" in peers:
        engines.update(transformers_engines(work, n, gammas))
    for set_name, prompts in sets.items():
        tokens, notes = {}, {}  # a warm-up run, the tokens and the drafts accepted (greedy: the same every run)
        for name, run in engines.items():
            _, tokens[name], notes[name] = run(prompts)
        best = best_in_turns({name: lambda p, run=run: run([p])[0] for name, run in engines.items()}, prompts,
                             args.repeats)
        total = n * len(prompts)
        reference = tokens["tandemc primary"]
        print(f"\n{set_name}: {len(prompts)} prompts, {n} new tokens each, greedy, 2 threads; best of {args.repeats} "
              f"per prompt, the engines taking turns; {machine_line()}")
        print("| engine | tokens/s | drafts accepted | prompts with tandemc float32 primary's tokens |")
        print("|---|---|---|---|")
        for name in engines:
            same = "" if tokens[name] is None else f"{sum(a == b for a, b in zip(tokens[name], reference))}/{len(prompts)}"
            print(f"| {name} | {total / best[name]:.1f} | {notes[name] or ''} | {same} |")


if __name__ == "__main__":
    main()
