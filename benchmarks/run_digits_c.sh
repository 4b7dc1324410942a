#!/usr/bin/env bash
# The digits_c results of benchmarks/RESULTS.md and leaderboards/digits_c.*: every
# test-time strategy, 3 seeds, on the micro ViT (LayerNorm) and WRN-16-2 (BatchNorm).
# EcoTTA needs a WideResNet. Usage: bash benchmarks/run_digits_c.sh STORE_DIR
# then: clbench leaderboard publish --tracking-uri sqlite:///STORE_DIR/mlflow.db
set -euo pipefail
store=${1:?usage: run_digits_c.sh STORE_DIR}
mkdir -p "$store"
uri="sqlite:///$(realpath "$store")/mlflow.db"
common=(scenario=digits_c seed=0,1,2 progress=false "tracking.uri=$uri" "runs_dir=$store/runs")
clbench run -m "${common[@]}" backbone=micro_vit strategy=source,bn_adapt,tent,eata,cotta,psmt
clbench run -m "${common[@]}" backbone=wrn_16_2 strategy=source,bn_adapt,tent,eata,cotta,psmt,ecotta
# EATA with the CIFAR-10-C benchmark settings of the test-time-adaptation codebases
# (cfgs/cifar10_c/eata.yaml: Adam 1e-3, E0 = ln C, d_margin 0.4, Fisher alpha 1), kept in
# a separate experiment so the board holds the official defaults only.
clbench run -m "${common[@]}" backbone=micro_vit,wrn_16_2 strategy=eata tracking.experiment=variants \
  strategy.optimizer=adam strategy.lr=1e-3 strategy.e_margin=1.0 strategy.d_margin=0.4 \
  strategy.fisher_alpha=1.0
# EcoTTA with the frozen encoder's BatchNorm on test-batch statistics (the latest WRN-28
# reimplementation) instead of its source statistics (the default)
clbench run -m "${common[@]}" backbone=wrn_16_2 strategy=ecotta strategy.frozen_bn=batch \
  tracking.experiment=variants
