"""The online test-time protocol, the corrupted-stream scenarios and a full TTA run."""

from __future__ import annotations

import json
import pickle

import mlflow
import numpy as np
import pytest
import torch
from clbench.scenarios.corruptions import CORRUPTIONS
from clbench.scenarios.tta import CifarCConfig, DigitsCConfig, ImageNetCConfig
from PIL import Image

from clbench.backbones.wideresnet import WideResNet, WideResNetConfig, wideresnet
from clbench.errors import ClbenchError, ConfigError
from clbench.leaderboard import build_boards, read_runs
from clbench.pretrain.source import source_classifier
from clbench.protocols.tta import run_tta
from clbench.registry import SCENARIOS
from helpers import only_run_dir, results_of, run_cli

TINY = ["scenario.corruptions=[gaussian_noise,contrast]", "scenario.source_epochs=2"]


def digits_c(**kw):
    return SCENARIOS.get("digits_c")(DigitsCConfig(**kw))


class Recorder:
    """A fake strategy: predicts class 0, records batches and resets."""

    def __init__(self) -> None:
        self.device = torch.device("cpu")
        self.batches: list[torch.Tensor] = []
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(x), 10)
        logits[:, 0] = 1.0
        return logits

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x)
        return self.predict(x)

    def modules(self) -> list:
        return []

    def state_tensors(self) -> list:
        return []


@pytest.fixture(scope="module")
def small_stream():
    return digits_c(corruptions=["gaussian_noise", "fog", "contrast"], n_per_domain=100)


@pytest.mark.parametrize("mode,resets", [("continual", 1), ("reset_each_shift", 3)])
def test_online_protocol_scores_each_prediction_and_resets_per_mode(small_stream, mode, resets):
    st = Recorder()
    result = run_tta(small_stream, st, seed=0, mode=mode, batch_size=32)
    assert st.resets == resets
    assert result.domain_sizes == [100, 100, 100] and result.steps == 3 * 4
    assert [len(b) for b in st.batches[:4]] == [32, 32, 32, 4]
    for t, exp in enumerate(small_stream.test_stream):  # predicting 0: error = share of non-0
        y = torch.tensor(exp.dataset.targets)
        assert result.online_error[t] == pytest.approx(float((y != 0).float().mean()))
    m = result.metrics()
    assert m["mean_online_error"] == pytest.approx(np.mean(result.online_error))
    assert m["clean_accuracy_after"] == pytest.approx(m["clean_accuracy_before"])


def test_samples_are_shuffled_within_a_domain_by_the_seed(small_stream):
    runs = []
    for seed in (0, 0, 1):
        st = Recorder()
        run_tta(small_stream, st, seed=seed, batch_size=100)
        runs.append(st.batches)  # the three domains, one batch each
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1], strict=True))
    assert not torch.equal(runs[0][0], runs[2][0])
    x0 = small_stream.test_stream[0].dataset
    same = torch.stack([x0[i][0] for i in range(100)]).sum(0)
    assert torch.allclose(runs[0][0].sum(0), same, atol=1e-4)  # a permutation of the domain


def test_digits_c_stream_variants():
    s = digits_c()
    assert s.kind == "test_time" and s.name == "digits_c"
    assert s.stream.domains == tuple(f"{c}-5" for c in CORRUPTIONS)
    assert [len(e.dataset) for e in s.test_stream] == [540] * 15
    assert len(s.benchmark.streams["source"][0].dataset) == 1257
    assert s.num_experiences == 15 and s.stream.flip_preserves_label is False
    g = digits_c(gradual=True, corruptions=["fog", "snow"], n_per_domain=10)
    assert g.name == "digits_c_gradual"
    assert g.stream.domains[:9] == tuple(f"fog-{v}" for v in (1, 2, 3, 4, 5, 4, 3, 2, 1))
    m = digits_c(mixed=True, corruptions=["fog", "snow"], n_per_domain=10, mode="reset_each_shift")
    assert m.name == "digits_c_mixed_reset_each_shift" and m.stream.domains == ("mixed",)
    assert len(m.test_stream[0].dataset) == 20
    with pytest.raises(ConfigError, match="valid choices: continual, reset_each_shift"):
        DigitsCConfig(mode="episodic")
    with pytest.raises(ConfigError, match=r"scenario\.corruptions"):
        DigitsCConfig(corruptions=["rain"])


def test_digits_c_corrupts_the_clean_test_split():
    clean = digits_c(corruptions=["brightness"], n_per_domain=50)
    x = clean.test_stream[0].dataset
    clean_x = clean.benchmark.streams["clean"][0].dataset
    diffs = [float((x[i][0] - clean_x[i][0]).abs().mean()) for i in range(5)]
    assert min(diffs) >= 0  # same images, same labels, shifted intensities
    again = digits_c(corruptions=["brightness"], n_per_domain=50)
    assert torch.equal(
        torch.stack([x[i][0] for i in range(50)]),
        torch.stack([again.test_stream[0].dataset[i][0] for i in range(50)]),
    )


def test_cifar_c_scenarios_from_the_released_files_and_from_a_cifar_root(tmp_path):
    n = 6
    rng = np.random.default_rng(0)
    npy = tmp_path / "CIFAR-10-C"
    npy.mkdir()
    for c in ("fog", "snow"):
        np.save(npy / f"{c}.npy", rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8))
    np.save(npy / "labels.npy", np.tile(np.arange(n), 5).astype(np.uint8))
    s = SCENARIOS.get("cifar10_c")(CifarCConfig(root=str(npy), corruptions=["fog", "snow"]))
    assert s.stream.domains == ("fog-5", "snow-5") and s.stream.batch_size == 200
    x, _, _ = s.test_stream[1].dataset[2]
    assert x.shape == (3, 32, 32) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert "clean" not in s.benchmark.streams
    root = tmp_path / "cifar"
    (root / "cifar-10-batches-py").mkdir(parents=True)
    images = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
    with (root / "cifar-10-batches-py" / "test_batch").open("wb") as f:
        pickle.dump({b"data": images, b"labels": list(range(n))}, f)
    g = SCENARIOS.get("cifar10_c")(CifarCConfig(cifar_root=str(root), corruptions=["fog"]))
    assert len(g.test_stream[0].dataset) == n and len(g.benchmark.streams["clean"][0].dataset) == n
    with pytest.raises(ConfigError, match=r"scenario\.root=DIR"):
        CifarCConfig()


def test_imagenet_c_scenario_reads_the_folder_layout_lazily(tmp_path):
    for wnid in ("n01", "n02"):
        d = tmp_path / "fog" / "5" / wnid
        d.mkdir(parents=True)
        Image.new("RGB", (300, 260), (200, 10, 10)).save(d / "a.JPEG")
    s = SCENARIOS.get("imagenet_c")(ImageNetCConfig(root=str(tmp_path), corruptions=["fog"]))
    assert not s.in_memory and s.class_names == ["n01", "n02"]
    x, y, _ = s.test_stream[0].dataset[1]
    assert x.shape == (3, 224, 224) and y == 1
    st = Recorder()
    result = run_tta(s, st, seed=0)
    assert result.online_error == [0.5]


def test_wideresnet_backbone_from_a_checkpoint_is_a_ready_source_model(tmp_path):
    torch.manual_seed(0)
    ref = WideResNet(depth=10, widen_factor=1, num_classes=10).eval()
    path = tmp_path / "Standard.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    bb = wideresnet(WideResNetConfig(depth=10, widen_factor=1, checkpoint=str(path)))
    assert bb.name == "wrn_10_1" and bb.source == str(path)
    scenario = digits_c(corruptions=["fog"], n_per_domain=4)
    model = source_classifier(bb, scenario, progress=False)
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-6)
    with pytest.raises(ClbenchError, match="6n \\+ 4"):
        WideResNetConfig(depth=12)


def test_a_tta_run_end_to_end_is_tracked_deterministic_and_ranked(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    common = [
        "run",
        "scenario=digits_c",
        "backbone=wrn_16_2",
        *TINY,
        f"tracking.uri={uri}",
        "progress=false",
    ]
    records = []
    for i, strategy in enumerate(("source", "tent", "tent")):
        out = tmp_path / f"r{i}"
        assert run_cli([*common, f"strategy={strategy}", f"runs_dir={out}"]) == 0
        records.append(results_of(only_run_dir(out)))
    src, tent, tent2 = records
    assert tent["kind"] == "test_time" and tent["domains"] == ["gaussian_noise-5", "contrast-5"]
    assert tent["metrics"] == tent2["metrics"]  # same config and seed, same numbers
    assert tent["metrics"]["mean_online_error"] < src["metrics"]["mean_online_error"]
    e = tent["efficiency"]
    assert e["images_per_second"] > 0 and e["backward_cache_mb"] > 0 and e["trainable_params"] > 0
    assert src["efficiency"]["backward_cache_mb"] == 0  # source never keeps a graph
    assert tent["tracking"]["status"] == "ok"
    run = mlflow.MlflowClient(uri).get_run(tent["tracking"]["run_id"])
    assert run.data.metrics["mean_online_error"] == pytest.approx(
        tent["metrics"]["mean_online_error"]
    )
    assert (only_run_dir(tmp_path / "r1") / "online_error.png").is_file()
    board = build_boards(read_runs(uri, "clbench"))["digits_c"]
    assert board["kind"] == "test_time" and board["primary_metric"] == "mean_online_error"
    assert [e["strategy"] for e in board["entries"]] == ["tent", "source"]  # lower error first
    assert board["entries"][1]["curve"] == pytest.approx(src["online_error"], rel=1e-5)
    out = tmp_path / "boards"
    publish = ["leaderboard", "publish", "--out", str(out)]
    assert run_cli([*publish, "--tracking-uri", uri, "--tracking-uri", uri]) == 0  # two stores
    md = (out / "digits_c.md").read_text()
    assert "mean online error" in md and "images/s" in md and "clean acc after" in md
    # a class-incremental strategy on a test-time scenario: one line, exit 2
    capsys.readouterr()
    assert run_cli([*common, "strategy=lora", f"runs_dir={tmp_path / 'bad'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: strategy 'lora' does not support 'test_time'")
    assert json.loads((only_run_dir(tmp_path / "r0") / "results.json").read_text())["seed"] == 0
