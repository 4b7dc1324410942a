#!/usr/bin/env bash
# leaderboards/split_glyphs.*: every class-incremental strategy on the embedded 100-class
# split_glyphs (10 x 10), 3 seeds, one torch thread per run, in two chains of about equal
# length (run both at once on a 2-core machine: CHAIN 1 and 2 in two shells; none: all).
# Each strategy runs its shipped defaults on the micro ViT, except that the strategies whose
# defaults train more than 5 epochs per experience (er, der, derpp, coda_prompt,
# moe_adapters, gdumb, dst, sparcl) are capped at strategy.epochs=5 so that the whole sweep
# fits this machine (the override is in each run's config and on the board's entries);
# dst and sparcl mask a CNN: WideResNet-16-2 from scratch, as on split_digits.
# Usage: bash benchmarks/run_split_glyphs.sh STORE_DIR [CHAIN]   (run it from a directory
# that stays: a sqlite store keeps its artifacts under ./mlruns of the directory it was
# created from). Then:
#   clbench leaderboard publish --merge --tracking-uri sqlite:///STORE_DIR/mlflow.db
set -euo pipefail
store=${1:?usage: run_split_glyphs.sh STORE_DIR [CHAIN]}
chain=${2:-all}
mkdir -p "$store"
uri="sqlite:///$(realpath "$store")/mlflow.db"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
common=(scenario=split_glyphs seed=0,1,2 progress=false "tracking.uri=$uri" "runs_dir=$store/runs")
cap=(strategy.epochs=5)
wrn=(backbone=wrn_16_2)
stamp() { echo "[$(date -u +%H:%M:%S)] chain $chain: $*"; }
stamp start
if [[ $chain == all || $chain == 1 ]]; then
  clbench run -m "${common[@]}" strategy=joint,lora,olora,inflora,sdlora,l2p,simplecil,fsa,ewc
  clbench run -m "${common[@]}" "${cap[@]}" strategy=er,der,gdumb
  clbench run -m "${common[@]}" "${cap[@]}" "${wrn[@]}" strategy=dst
fi
if [[ $chain == all || $chain == 2 ]]; then
  clbench run -m "${common[@]}" strategy=finetune,linear_probe,dualprompt,dyrank,inc_rank,mora,lwf,icarl
  clbench run -m "${common[@]}" "${cap[@]}" strategy=derpp,coda_prompt,moe_adapters
  clbench run -m "${common[@]}" "${cap[@]}" "${wrn[@]}" strategy=sparcl
fi
stamp end
