"""MLflow: params, step and summary metrics, artifacts and tags; failures lose nothing."""

from __future__ import annotations

from helpers import FAST, only_run_dir, results_of, run_cli


def _fast_tracked(tmp_path, uri):
    fast = [o for o in FAST if not o.startswith("tracking")]
    return ["run", *fast, f"runs_dir={tmp_path / 'runs'}", f"tracking.uri={uri}"]


def test_run_is_logged_to_mlflow(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert run_cli(_fast_tracked(tmp_path, uri)) == 0
    res = results_of(only_run_dir(tmp_path / "runs"))
    assert res["tracking"]["status"] == "ok"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(res["tracking"]["run_id"])
    assert run.data.params["strategy.name"] == "lora"
    assert run.data.params["scenario.n_experiences"] == "2"
    assert run.data.params["strategy.targets"] == '["qkv", "proj", "fc1", "fc2"]'
    for tag in ("scenario", "strategy", "backbone", "seed", "git_commit", "clbench_version"):
        assert tag in run.data.tags
    assert run.data.tags["strategy"] == "lora" and run.data.tags["seed"] == "0"
    assert "sweep_id" not in run.data.tags  # a single run belongs to no sweep
    assert abs(run.data.metrics["final_accuracy"] - res["metrics"]["final_accuracy"]) < 1e-9
    history = client.get_metric_history(run.info.run_id, "accuracy_seen")
    assert [m.step for m in history] == [0, 1]
    assert "trainable_params" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "config.yaml", "accuracy_matrix.png"} <= artifacts


def test_unreachable_server_keeps_the_run(tmp_path, capsys):
    # Port 9 on loopback: nothing listens; MLflow's HTTP client fails after its retries.
    import os

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "2"
    try:
        assert run_cli(_fast_tracked(tmp_path, "http://127.0.0.1:9")) == 0
    finally:
        del os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"], os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]
    err = capsys.readouterr().err
    assert "MLflow tracking failed" in err
    res = results_of(only_run_dir(tmp_path / "runs"))
    assert res["tracking"]["status"] == "failed"
    assert len(res["accuracy_matrix"]) == 2


def test_a_sweep_prepares_a_fresh_local_store_once(tmp_path):
    """Parallel jobs would race in MLflow's schema migration on a store that does not exist."""
    import mlflow

    from clbench.tracking import prepare_local_store

    uri = f"sqlite:///{tmp_path}/fresh.db"
    prepare_local_store(uri, "sweep-exp")
    assert mlflow.MlflowClient(uri).get_experiment_by_name("sweep-exp") is not None
    prepare_local_store(uri, "sweep-exp")  # a second time: nothing to do, no error
    prepare_local_store("http://127.0.0.1:9", "x")  # a server: left to the jobs, no wait
    assert not list(tmp_path.glob("*.db"))[1:]  # nothing else created
