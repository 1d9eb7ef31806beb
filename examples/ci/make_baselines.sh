#!/usr/bin/env bash
# Write the baselines `lcbench check` compares against: your method (and the references) at two
# ratios on a small needle-in-a-haystack grid of the default model, SmolLM2-135M-Instruct on CPU
# (a few minutes), on the filler haystack (the 135M model finds no passkey among upstream's essays,
# so methods would not separate there). Commit results/baselines/ afterwards.
#   usage: bash make_baselines.sh METHOD [OUTPUT]      e.g. bash make_baselines.sh mymethod
set -euo pipefail
method="${1:?usage: make_baselines.sh METHOD [OUTPUT]}"
out="${2:-results/baselines}"
# exit codes (README "Exit codes (for CI)"): a run that fails (2: its method misses the ratio or the
# input is bad; 1: a crash or a full disk) must not become a baseline, so stop here and say so.
lcbench run --method "full,${method}" --ratio 0.5,0.75 --task niah \
  --task-args "lengths=500;1000,depths=0;25;50;75;90;100,max_new_tokens=16,haystack=filler" \
  --device cpu --output-path "$out" || {
  code=$?
  echo "make_baselines.sh: lcbench run failed (exit $code); fix the cause above and re-run (it resumes)." >&2
  exit "$code"
}
lcbench report "$out"
