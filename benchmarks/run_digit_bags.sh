#!/usr/bin/env bash
# The digit_bags results of benchmarks/RESULTS.md and leaderboards/digit_bags.*: every MIL
# strategy, 3 seeds, on the gated-attention aggregator (ABMIL), one torch thread per run.
# Usage: bash benchmarks/run_digit_bags.sh STORE_DIR   (run it from a directory that stays:
# a sqlite store keeps its artifacts under ./mlruns of the directory it was created from)
# then: clbench leaderboard publish --tracking-uri sqlite:///STORE_DIR/mlflow.db
set -euo pipefail
store=${1:?usage: run_digit_bags.sh STORE_DIR}
mkdir -p "$store"
uri="sqlite:///$(realpath "$store")/mlflow.db"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
common=(scenario=digit_bags seed=0,1,2 progress=false "tracking.uri=$uri" "runs_dir=$store/runs")
clbench run -m "${common[@]}" backbone=abmil \
  strategy=mil_finetune,mil_joint,mil_er,mil_derpp,mil_ewc,mil_lwf,mil_lora,mil_olora,mil_inflora,conslide,comel
# Not on the published board (cost on 2 CPU cores: GDAT pads every 8-24-instance bag to
# 256 tokens, TransMIL computes a 256-landmark pseudo-inverse per layer; a comel run on
# GDAT did not finish within 25 minutes on a shared core):
# clbench run -m "${common[@]}" backbone=gdat strategy=comel
# clbench run -m "${common[@]}" backbone=transmil,gdat strategy=mil_finetune,mil_joint
