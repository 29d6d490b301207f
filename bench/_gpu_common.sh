# Sourced by the bench/gpu_check*.sh scripts: where results go, the environment every step runs in,
# and `step LIMIT CMD...`, which runs one step under its own time limit (so one slow step cannot take
# the others' figures with it) and prints its exit status and seconds.
set -u
OUT=${OUT:-bench/results/gpu}; mkdir -p "$OUT" bench/results
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
step() { local limit=$1; shift; echo; echo "=== $* (limit ${limit}s)"; local t0=$SECONDS
         timeout "$limit" "$@"; echo "=== rc=$? in $((SECONDS - t0))s"; }
