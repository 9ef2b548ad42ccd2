"""Generate text from a tandemc CPU artifact with nothing but onnxruntime and numpy (no tandemc import).

    python examples/onnxruntime_generate.py ARTIFACT "def main():" [--max-new-tokens 64] [--temperature 0]

Everything comes from ARTIFACT/manifest.json (docs/artifact.md): which graph to call, input order, state
wiring, the tokenizer's special ids, and the uniform-random stream shared with every tandemc runtime.
Byte-level tokenizer only (a Hugging Face tokenizer.json needs the `tokenizers` package).
"""

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

MASK64 = (1 << 64) - 1


def splitmix64(x):
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & np.uint64(MASK64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seed, call, rows, width):
    """u[r, w] for decoding call `call` (0 = prefill): docs/decoding.md."""
    with np.errstate(over="ignore"):
        h = splitmix64(np.array([seed & MASK64], np.uint64))
        h = splitmix64(h ^ np.uint64(call))
        h = splitmix64(h[:, None] ^ np.arange(rows, dtype=np.uint64)[:, None])
        h = splitmix64(h ^ np.arange(width, dtype=np.uint64)[None, :])
    return ((h >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)).reshape(rows, width)


class Graph:
    def __init__(self, directory, entry, session_config):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        for key, value in session_config.items():  # settings the graphs need (manifest "onnx_session_config")
            options.add_session_config_entry(key, value)
        self.session = ort.InferenceSession(str(directory / entry["onnx"]), options)
        self.entry = entry
        self.inputs = [spec["name"] for spec in entry["inputs"]]
        self.outputs = [spec["name"] for spec in entry["outputs"]]

    def __call__(self, state, **inputs):
        """Run with the current state; returns (next state, other outputs), wired by the manifest."""
        feeds = {name: state[name] if name in state else inputs[name] for name in self.inputs}
        results = dict(zip(self.outputs, self.session.run(None, feeds)))
        wiring = self.entry["state"]
        return {wiring[name]: results[name] for name in wiring}, results


def generate(directory: Path, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> str:
    manifest = json.loads((directory / "manifest.json").read_text())
    decode, tokenizer = manifest["decode"], manifest["tokenizer"]
    if tokenizer["type"] != "byte":
        raise SystemExit("this example handles byte-level artifacts only")
    ids = [tokenizer["bos_id"]] + list(prompt.encode("utf-8"))
    bucket = next((s for s in decode["cache_buckets"] if len(ids) + max_new_tokens <= s), None)
    if bucket is None:
        raise SystemExit(f"prompt + {max_new_tokens} new tokens exceed the largest cache length")
    config = manifest.get("onnx_session_config", {})
    prefill = Graph(directory, manifest["graphs"][f"prefill.s{bucket}"], config)
    step = Graph(directory, manifest["graphs"][f"step.s{bucket}"], config)
    batch, chunk, gamma = decode["batch"], decode["prefill_chunk"], decode["block_length"]
    state = {spec["name"]: np.zeros(spec["shape"], spec["dtype"]) for spec in prefill.entry["inputs"]
             if spec["name"] in prefill.entry["state"].values()}
    controls = {"temperature": np.array(temperature, np.float32), "top_k": np.array(0, np.int32),
                "top_p": np.array(1.0, np.float32), "eos_id": np.array(tokenizer["eos_id"], np.int32)}
    padded = -(-len(ids) // chunk) * chunk
    tokens = np.zeros((batch, padded), np.int32)
    tokens[0, :len(ids)] = ids
    lengths = np.ones(batch, np.int32)
    lengths[0] = len(ids)
    limit = np.zeros(batch, np.int32)  # unused rows: limit 0, done at once
    limit[0] = max_new_tokens
    for start in range(0, padded, chunk):
        state, _ = prefill(state, tokens=tokens[:, start:start + chunk], start=np.full(batch, start, np.int32),
                           lengths=lengths, limit=limit, u=uniforms(seed, 0, batch, 1), **controls)
    out = [int(state["state.token"][0])]
    call = 0
    while not state["state.done"].all():
        call += 1
        state, results = step(state, u=uniforms(seed, call, batch, 2 * gamma + 1), **controls)
        out += results["emitted"][0, :results["n_emitted"][0]].tolist()
    out = out[:max_new_tokens]
    if tokenizer["eos_id"] in out:
        out = out[:out.index(tokenizer["eos_id"]) + 1]
    return bytes(t for t in out if t < 256).decode("utf-8", errors="replace")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", type=Path)
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(generate(args.artifact, args.prompt, args.max_new_tokens, args.temperature, args.seed))


if __name__ == "__main__":
    main()
