#!/usr/bin/env bash
# Set up tandemc in .venv and run the main job on the bundled example checkpoint: inspect it, compile it for
# the TPU (StableHLO), CPU (ONNX) and GPU (TensorRT-profile ONNX; engines where TensorRT and a GPU exist) targets,
# each export verified against the JAX reference with the default -O1 passes, and generate with the artifacts:
# Tandem + SPEED gives the primary's own output with fewer primary calls.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e .
tandemc=.venv/bin/tandemc
ckpt=examples/tandem-stdlib  # trained by examples/train_example.sh; model card: examples/tandem-stdlib/README.md
out=examples/build

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
