#!/usr/bin/env bash
# The classic and pretrained-model baselines of issue 17 on leaderboards/split_digits.*:
# ewc, lwf, gdumb, icarl (through Avalanche), simplecil and fsa, each with its shipped
# defaults on the embedded split_digits with the micro ViT, 3 seeds, one torch thread per
# run, two runs at a time (CHAIN 1 and 2 in two shells) or all in one.
# Usage: bash benchmarks/run_split_digits_baselines.sh STORE_DIR [CHAIN]   (run it from a
# directory that stays: a sqlite store keeps its artifacts under ./mlruns of the directory
# it was created from). Then:
#   clbench leaderboard publish --merge --tracking-uri sqlite:///STORE_DIR/mlflow.db
set -euo pipefail
store=${1:?usage: run_split_digits_baselines.sh STORE_DIR [CHAIN]}
chain=${2:-all}
mkdir -p "$store"
uri="sqlite:///$(realpath "$store")/mlflow.db"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
common=(scenario=split_digits seed=0,1,2 progress=false "tracking.uri=$uri" "runs_dir=$store/runs")
if [[ $chain == all || $chain == 1 ]]; then
  clbench run -m "${common[@]}" strategy=ewc,lwf,simplecil
fi
if [[ $chain == all || $chain == 2 ]]; then
  clbench run -m "${common[@]}" strategy=gdumb,icarl,fsa
fi
