# Sourced by the training scripts (train_example.sh, train_smollm2.sh), which set $tandemc, $work and the array
# $common (flags every stage shares).
step() {  # step NAME ARGS...: run a stage unless its output exists; its wall time goes to timing.txt
  local name=$1; shift
  if [ -d "$work/$name" ]; then echo "== $name (done)"; return; fi
  echo "== $name"
  local start=$SECONDS
  "$tandemc" train "$@" -o "$work/$name" "${common[@]}"
  echo "$name $((SECONDS - start))" >> "$work/timing.txt"
}
