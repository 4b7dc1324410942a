#!/usr/bin/env bash
# The default job beside one busy-loop process (one core of the machine saturated):
#   bash benchmarks/bench_busy_core.sh WORKDIR WARM_CACHE
# WARM_CACHE holds the pretrained checkpoint (clbench pretrain with CLBENCH_CACHE_DIR set to
# it); prints the wall seconds of 3 warm runs (store existing) and 1 cold run (empty cache
# and store: the pretraining included). Compare with bench_job.py's idle medians.
set -euo pipefail
work=$(realpath -m "$1"); cache=$(realpath "$2")
mkdir -p "$work/warm"
python -c "while True: pass" & hog=$!
trap 'kill $hog' EXIT
t() { local s; s=$(date +%s.%N); "$@" >/dev/null 2>&1 || echo FAILED; echo "$(date +%s.%N) - $s" | bc; }
cd "$work/warm"
CLBENCH_CACHE_DIR=$cache clbench run progress=false >/dev/null 2>&1  # makes the store, untimed
for i in 1 2 3; do echo "warm $i $(CLBENCH_CACHE_DIR=$cache t clbench run progress=false)"; done
rm -rf "$work/cold" "$work/cache" && mkdir -p "$work/cold" "$work/cache" && cd "$work/cold"
echo "cold 1 $(CLBENCH_CACHE_DIR=$work/cache t clbench run progress=false)"
