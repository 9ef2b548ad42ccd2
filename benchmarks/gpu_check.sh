#!/usr/bin/env bash
# On a GPU host with TensorRT: export the bundled example for the gpu target (engines built at export), verify the
# engines against the JAX reference (greedy and sampled token identity, max |Δlogits|), generate, and print tokens/s
# for TensorRT and, as a baseline on the same host, the same graphs in ONNX Runtime.
#
#     bash benchmarks/gpu_check.sh [WORKDIR]
#
# Needs: an NVIDIA GPU and driver; installs tandemc with `tensorrt` and `cuda-python` into WORKDIR/.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/tandemc-gpu-check}
mkdir -p "$WORK"
python3 -m venv "$WORK/.venv"
"$WORK/.venv/bin/pip" install -q -e . tensorrt cuda-python
T="$WORK/.venv/bin/tandemc"
"$WORK/.venv/bin/python" -c "from tandemc.targets import tensorrt as t; import sys; \
    sys.exit(0 if t.environment() else 'TensorRT is not usable here: ' + t.missing_reason())"
for mode in primary speed; do
  out="$WORK/example-gpu-$mode"
  "$T" export examples/tandem-stdlib --target gpu -o "$out" --mode "$mode" -g 4 --max-seq-len 256 --force
  "$T" inspect "$out"
  "$T" verify "$out" --checkpoint examples/tandem-stdlib --prompts 8          # the TensorRT engines
  for backend in "" "--backend onnxruntime"; do
    # shellcheck disable=SC2086
    "$T" run "$out" $backend --prompt "def main(argv):" -n 128 --json |
      "$WORK/.venv/bin/python" -c "import json, sys; s = json.load(sys.stdin)['stats']; \
        print('$mode ${backend:-tensorrt}:', s['tokens_per_second'], 'tok/s, mean accepted/step', \
              round(s['mean_accepted_per_step'], 2))"
  done
done
"$WORK/.venv/bin/python" -m pytest -q tests/test_gpu.py
