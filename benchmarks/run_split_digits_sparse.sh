#!/usr/bin/env bash
# The sparse-training results of benchmarks/RESULTS.md and the wrn_16_2 entries of
# leaderboards/split_digits.*: dynamic sparse training (dst, four init x growth variants
# with the official defaults, and one with our fixes), SparCL, its replay baselines and
# fine-tuning, WideResNet-16-2 from scratch, 3 seeds, one torch thread per run.
# Usage: bash benchmarks/run_split_digits_sparse.sh STORE_DIR [CHAIN]   (run it from a
# directory that stays: a sqlite store keeps its artifacts under ./mlruns of the directory
# it was created from). CHAIN 1 or 2 runs half of the jobs (two processes on two cores);
# none: all of them. Then:
#   clbench leaderboard publish --merge --tracking-uri sqlite:///STORE_DIR/mlflow.db
set -euo pipefail
store=${1:?usage: run_split_digits_sparse.sh STORE_DIR [CHAIN]}
chain=${2:-all}
mkdir -p "$store"
uri="sqlite:///$(realpath "$store")/mlflow.db"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
common=(scenario=split_digits backbone=wrn_16_2 seed=0,1,2 progress=false "tracking.uri=$uri"
  "runs_dir=$store/runs")
if [[ $chain == all || $chain == 1 ]]; then
  # SparCL and its dense counterpart (DER++ with SparCL's current-task loss)
  clbench run -m "${common[@]}" strategy=sparcl
  clbench run -m "${common[@]}" strategy=derpp strategy.loss_mask=current
  # dense fine-tuning with dst's recipe (Adam 1e-3, 20 epochs, batch 64, the task's logits;
  # constant lr)
  clbench run -m "${common[@]}" strategy=finetune strategy.epochs=20 strategy.batch_size=64 \
    strategy.lr=1e-3 strategy.loss_mask=current
  clbench run -m "${common[@]}" strategy=dst strategy.test_mask=used strategy.best_epoch_tie=last \
    strategy.dense_params=per_task
  clbench run -m "${common[@]}" strategy=er
fi
if [[ $chain == all || $chain == 2 ]]; then
  clbench run -m "${common[@]}" strategy=dst strategy.init=uniform,erk strategy.grow=random,gradient
  clbench run -m "${common[@]}" strategy=derpp,der
fi
