#!/usr/bin/env bash
# Set up tandemc in .venv and run the main job on the example checkpoint: inspect it, then generate with the
# primary alone, with Tandem + SPEED (same output, fewer primary calls) and with the two comparison modes.
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e .
tandemc=.venv/bin/tandemc

# The example checkpoint. Until a trained example is committed, it is the `tiny` preset with seed 0,
# rebuilt deterministically here (byte-identical on every machine).
ckpt=examples/build/tiny
[ -d "$ckpt" ] || "$tandemc" init "$ckpt" --preset tiny --seed 0

"$tandemc" inspect "$ckpt"
prompt="def fibonacci(n):"
for mode in primary speed tandem vanilla; do
  echo "--- mode $mode"
  "$tandemc" generate "$ckpt" --prompt "$prompt" --mode "$mode" --block-length 4 --max-new-tokens 48 --stats
done
