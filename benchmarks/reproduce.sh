#!/usr/bin/env bash
# The papers' class-incremental table on a GPU machine: every paper configuration of
# conf/experiment (46: 23 methods on Split CIFAR-100 and ImageNet-R) for each seed, then
# benchmarks/summarize_runs.py --papers (ours beside the published numbers).
#
#   benchmarks/reproduce.sh CIFAR_ROOT IMAGENET_R_ROOT [OUT] [OVERRIDE ...]
#
# CIFAR_ROOT holds cifar-100-python/ (torchvision's root), IMAGENET_R_ROOT imagenet-r/;
# give - for a benchmark to skip it. OUT (default reproduce/) gets runs/<experiment>/ (the
# run directories), logs/<experiment>_s<seed>.log, mlflow.db and table.md. OVERRIDEs go to
# every run (e.g. precision=bf16, deterministic=false).
#
# Seeds: the papers report 3 to 5 runs, and do not agree on what a run varies (InfLoRA's
# configs: seeds 0-4 on one class order; CODA-Prompt and PILOT-based code such as SD-LoRA:
# the seed also shuffles the class order). Default: the standard seed-1993 class order for
# every run and training seeds 0, 1, 2 (initialisation, batches, augmentation), so each
# method's three runs form one leaderboard entry. ORDERS=1 makes the seed the class order
# too (scenario.class_order_seed=SEED, PILOT's convention; use SEEDS="1993 1994 1995"): each
# order is then its own leaderboard entry, summarize_runs.py still averages them.
#
# Environment:
#   SEEDS="0 1 2"        training seeds
#   ORDERS=0             1: scenario.class_order_seed follows the seed
#   EXPERIMENTS=all      or names, e.g. "inflora_cifar100 sdlora_imagenet_r"
#   DEVICE=cuda          cuda | cuda:N | auto
#   WORKERS=8            DataLoader processes per run (scenario.num_workers)
#   TRACKING=sqlite:///OUT/mlflow.db   an MLflow URI, or none (run directories only)
#   SHARD=0/1            I/N: run only jobs I, I+N, I+2N, ... (one process per GPU:
#                        CUDA_VISIBLE_DEVICES=k SHARD=k/4 benchmarks/reproduce.sh ... &)
#   CLBENCH=clbench      the command
#   DRY_RUN=0            1: print the commands, run nothing
#
# A job whose run directory has results.json is skipped; one killed after an experience
# (checkpoint.json) is resumed (clbench resume); so the script can be run again after an
# interruption. Jobs run seed by seed: after the first seed the table is complete with n=1.
set -uo pipefail

usage() {
    sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' >&2
    exit 2
}
[[ $# -ge 2 ]] || usage
CIFAR_ROOT=$1
INR_ROOT=$2
shift 2
OUT=reproduce
if [[ $# -gt 0 && $1 != *=* ]]; then
    OUT=$1
    shift
fi
OVERRIDES=("$@")

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONF=$HERE/../conf/experiment
SEEDS=${SEEDS:-"0 1 2"}
ORDERS=${ORDERS:-0}
EXPERIMENTS=${EXPERIMENTS:-all}
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-8}
SHARD=${SHARD:-0/1}
CLBENCH=${CLBENCH:-clbench}
DRY_RUN=${DRY_RUN:-0}

for root in "$CIFAR_ROOT" "$INR_ROOT"; do
    if [[ $root != - && ! -d $root ]]; then
        echo "error: no such folder: $root (give - to skip that benchmark)" >&2
        exit 2
    fi
done
[[ $CIFAR_ROOT == - ]] || CIFAR_ROOT=$(cd "$CIFAR_ROOT" && pwd)
[[ $INR_ROOT == - ]] || INR_ROOT=$(cd "$INR_ROOT" && pwd)
if [[ ! $SHARD =~ ^([0-9]+)/([1-9][0-9]*)$ ]] || ((BASH_REMATCH[1] >= BASH_REMATCH[2])); then
    echo "error: invalid SHARD=$SHARD; expected I/N with 0 <= I < N, e.g. 0/4" >&2
    exit 2
fi
SHARD_I=${BASH_REMATCH[1]}
SHARD_N=${BASH_REMATCH[2]}

ALL=$(cd "$CONF" && ls -- *.yaml | sed 's/\.yaml$//')
if [[ $EXPERIMENTS == all ]]; then
    NAMES=$ALL
else
    NAMES=$EXPERIMENTS
    for name in $NAMES; do
        if ! grep -qx -- "$name" <<<"$ALL"; then
            echo "error: unknown experiment '$name'; valid choices: $(echo $ALL)" >&2
            exit 2
        fi
    done
fi

mkdir -p "$OUT/runs" "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
TRACKING=${TRACKING:-sqlite:///$OUT/mlflow.db}
if [[ $TRACKING == none ]]; then
    TRACK=(tracking=none)
else
    TRACK=("tracking.uri=$TRACKING")
fi

job=0
failed=()
for seed in $SEEDS; do
    for name in $NAMES; do
        case $name in
        *_cifar100) root=$CIFAR_ROOT ;;
        *_imagenet_r) root=$INR_ROOT ;;
        *) root=- ;;
        esac
        [[ $root == - ]] && continue
        job=$((job + 1))
        (((job - 1) % SHARD_N == SHARD_I)) || continue
        runs=$OUT/runs/$name
        log=$OUT/logs/${name}_s$seed.log
        if compgen -G "$runs/*_s$seed/results.json" >/dev/null; then
            echo "done     $name seed $seed"
            continue
        fi
        partial=$(ls -d "$runs"/*_s"$seed" 2>/dev/null | while read -r d; do
            [[ -f $d/checkpoint.json ]] && echo "$d"
        done | tail -n 1)
        if [[ -n $partial ]]; then
            cmd=("$CLBENCH" resume "$partial")
        else
            order=()
            [[ $ORDERS == 1 ]] && order=("scenario.class_order_seed=$seed")
            cmd=("$CLBENCH" run "+experiment=$name" "scenario.root=$root" "seed=$seed"
                "${order[@]}" "device=$DEVICE" "scenario.num_workers=$WORKERS" progress=false
                "runs_dir=$runs" "${TRACK[@]}" "${OVERRIDES[@]}")
        fi
        if [[ $DRY_RUN == 1 ]]; then
            printf '%q ' "${cmd[@]}"
            echo
            continue
        fi
        echo "$(date '+%F %T') start $name seed $seed -> $log"
        start=$SECONDS
        if "${cmd[@]}" >>"$log" 2>&1; then
            echo "$(date '+%F %T') ok    $name seed $seed ($((SECONDS - start)) s)"
        else
            echo "$(date '+%F %T') FAIL  $name seed $seed: $(tail -n 1 "$log")"
            failed+=("$name/s$seed")
        fi
    done
done

[[ $DRY_RUN == 1 ]] && exit 0
if compgen -G "$OUT/runs/*/*/results.json" >/dev/null; then
    python "$HERE/summarize_runs.py" "$OUT/runs" --papers | tee "$OUT/table.md"
fi
if ((${#failed[@]})); then
    echo "failed: ${failed[*]} (logs in $OUT/logs)" >&2
    exit 1
fi
