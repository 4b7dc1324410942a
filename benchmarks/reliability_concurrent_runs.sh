#!/usr/bin/env bash
# Issue 16 point 3: N plain `clbench run` processes started together into one fresh local
# SQLite store must record N complete runs (before the store lock: 7 of 8, "duplicate
# column name: trace_name" in MLflow's schema migration).
# Usage: bash benchmarks/reliability_concurrent_runs.sh [N=8] [WORK_DIR=a new temp dir]
set -euo pipefail
n=${1:-8}
tmp=${2:-$(mktemp -d -t clbench-concurrent-XXXXXX)}
mkdir -p "$tmp"
tmp=$(realpath "$tmp")
uri="sqlite:///$tmp/mlflow.db"
rm -f "$tmp/mlflow.db" "$tmp/mlflow.db.lock"
echo "$n concurrent runs into $uri (work dir $tmp)"
start=$(date +%s)
pids=()
for seed in $(seq 0 $((n - 1))); do
  OMP_NUM_THREADS=1 MLFLOW_TRACKING_URI= clbench run backbone.pretrained=none \
    scenario.n_experiences=2 strategy.epochs=1 progress=false seed="$seed" \
    "tracking.uri=$uri" "runs_dir=$tmp/runs" >"$tmp/run$seed.out" 2>"$tmp/run$seed.err" &
  pids+=($!)
done
failed=0
for i in "${!pids[@]}"; do
  rc=0
  wait "${pids[$i]}" || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "run $i failed (exit code $rc): $(tail -n 1 "$tmp/run$i.err")"
    failed=$((failed + 1))
  fi
done
echo "all $n processes done in $(($(date +%s) - start)) s; $failed failed"
cd "$tmp"
MLFLOW_TRACKING_URI= MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false python - "$uri" "$n" "$tmp/runs" <<'EOF'
"""Count the store's runs and check each is complete and is its own run's record."""
import json
import sys
from pathlib import Path

import mlflow

uri, n, runs_dir = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
records = [json.loads(p.read_text()) for p in sorted(runs_dir.rglob("results.json"))]
print(f"run directories with results.json: {len(records)}")
print("tracking status:", sorted(r["tracking"]["status"] for r in records))
errors = [r["tracking"].get("error") for r in records if r["tracking"]["status"] != "ok"]
for e in errors:
    print("  tracking error:", e)
client = mlflow.MlflowClient(uri)
exp = client.get_experiment_by_name("clbench")
runs = client.search_runs([exp.experiment_id], max_results=1000) if exp else []
finished = [r for r in runs if r.info.status == "FINISHED"]
print(f"runs in the store: {len(runs)} ({len(finished)} FINISHED)")
by_id = {r.info.run_id: r for r in runs}
complete = 0
for rec in records:
    run = by_id.get(rec["tracking"].get("run_id"))
    if run is None:
        print(f"  seed {rec['seed']}: not in the store")
        continue
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    tracked = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/results.json"))
    problems = []
    if run.info.status != "FINISHED":
        problems.append(f"status {run.info.status}")
    if run.data.tags.get("seed") != str(rec["seed"]) or run.data.params.get("seed") != str(
        rec["seed"]
    ):
        problems.append("seed tag/param of another run")
    if abs(run.data.metrics.get("final_accuracy", -1) - rec["metrics"]["final_accuracy"]) > 1e-9:
        problems.append("final_accuracy of another run")
    if len(client.get_metric_history(run.info.run_id, "accuracy_seen")) != 2:
        problems.append("step metrics missing")
    if not {"results.json", "config.yaml", "accuracy_matrix.png"} <= artifacts:
        problems.append(f"artifacts missing ({sorted(artifacts)})")
    if tracked["accuracy_matrix"] != rec["accuracy_matrix"] or tracked["seed"] != rec["seed"]:
        problems.append("results.json artifact of another run")
    if problems:
        print(f"  seed {rec['seed']}: " + "; ".join(problems))
    else:
        complete += 1
print(f"complete and unmixed: {complete} of {n}")
sys.exit(0 if complete == n == len(finished) else 1)
EOF
