"""``imagefolder_forget``: the CASIA-Face-100 and ImageNet-100 folder layouts, read lazily,
give the split, the class indices and the request subsets of the config; the lazy training
and evaluation paths give what the in-memory ones give; bad data is one error line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import only_run_dir, results_of, run_cli

CLASSES = ["c0", "c1", "c2", "c3", "c4", "c5"]
#: the ImageNet-style class list: not in sorted order; the folder n00000000 is left out
WNIDS = ["n03", "n01", "n05", "n02", "n04", "n06"]
N_TRAIN, N_TEST = 6, 3


def _image(cls: int, i: int, size: tuple[int, int]) -> Image.Image:
    """A colour per class, a pattern per image."""
    rng = np.random.default_rng(100 * cls + i)
    base = np.array([(cls * 40) % 256, (255 - cls * 40) % 256, (cls * 90) % 256], np.float32)
    noise = rng.integers(-20, 21, (size[1], size[0], 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _write_tree(root: Path, dirs: dict[str, int], classes: list[str], size=(16, 16)) -> None:
    for split, n in dirs.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                _image(c, i + (0 if split == "train" else 50), size).save(folder / f"{i:03d}.png")


@pytest.fixture
def casia(tmp_path) -> Path:
    """ROOT/train/<class>/<image> and ROOT/test/<class>/<image>, 16x16 images."""
    root = tmp_path / "casia100"
    _write_tree(root, {"train": N_TRAIN, "test": N_TEST}, CLASSES)
    return root


@pytest.fixture
def imagenet(tmp_path) -> Path:
    """ROOT/train/<wnid>/..., ROOT/val/<wnid>/... with an extra folder, 48x40 images, and
    ROOT/classes.txt selecting six folders in its own order."""
    root = tmp_path / "imagenet100"
    _write_tree(root, {"train": N_TRAIN, "val": N_TEST}, [*WNIDS, "n00000000"], size=(48, 40))
    (root / "classes.txt").write_text("# ImageNet-100 subset\n" + "\n".join(WNIDS) + "\n\n")
    return root


def _start_checkpoint(path: Path, n_classes: int = 6) -> Path:
    """A 3-channel WRN-16-2 classifier of ``n_classes`` (random weights), as a file."""
    from clbench.backbones.wideresnet import WideResNetConfig, wideresnet
    from clbench.models import ClassifierModel

    backbone = wideresnet(WideResNetConfig(depth=16, widen_factor=2, in_chans=3, img_size=32))
    model = ClassifierModel(backbone.module, backbone.feature_dim)
    model.head.grow(n_classes)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _config(root: Path, **kw):
    from clbench.scenarios.imagefolder import ImageFolderForgetConfig

    base = dict(
        root=str(root),
        start_checkpoint=str(_start_checkpoint(root.parent / "start.safetensors")),
        image_size=32,
        n_requests=2,
        per_request=2,
        data_ratio=0.5,
        num_workers=0,
    )
    return ImageFolderForgetConfig(**{**base, **kw})


def test_casia_layout_split_and_lazy_samples(casia):
    from clbench.scenarios.imagefolder import FolderImages, scan_images

    from clbench.protocols.forgetting import gs_lora_split
    from clbench.registry import SCENARIOS

    cfg = _config(casia)
    s = SCENARIOS.get("imagefolder_forget")(cfg)
    assert s.name == "imagefolder_forget_casia100" and s.kind == "forgetting"
    assert s.class_names == CLASSES and s.input_shape == (3, 32, 32) and not s.in_memory
    order, requests = gs_lora_split(6, 4, 2, 2, 1337)
    assert list(s.stream.class_order) == order and list(s.stream.requests) == requests
    assert s.stream.start_checkpoint == cfg.start_checkpoint
    test = s.test_stream[0].dataset
    assert list(test.targets) == [c for c in range(6) for _ in range(N_TEST)]
    # images are files read on demand, in class then file-name order
    paths, targets = scan_images(casia / "train", CLASSES, "training")
    assert len(paths) == 6 * N_TRAIN and paths[0] == casia / "train/c0/000.png"
    assert targets == [c for c in range(6) for _ in range(N_TRAIN)]
    files = FolderImages(paths, targets, 32, 0, [0.5] * 3, [0.5] * 3)
    # 16x16 resized to 32x32, scaled to [0, 1] and normalised with mean = std = 0.5
    x, y = files[N_TRAIN * 2 + 1]
    raw = torch.from_numpy(np.asarray(_image(2, 1, (16, 16)), np.float32) / 255.0)
    expected = torch.nn.functional.interpolate(
        raw.permute(2, 0, 1)[None], size=(32, 32), mode="bilinear", antialias=True
    )[0]
    assert y == 2 and x.shape == (3, 32, 32)
    assert torch.allclose(x, (expected - 0.5) / 0.5, atol=0.02)
    # each request's training data: half of the forget and of the retained training images
    for exp, req in zip(s.train_stream, requests, strict=True):
        labels = torch.tensor(list(exp.dataset.targets))
        for group, n_classes in ((req.forget, 2), (req.remain, len(req.remain))):
            inside = torch.isin(labels, torch.tensor(group))
            assert int(inside.sum()) == n_classes * N_TRAIN // 2
        assert not torch.isin(labels, torch.tensor(req.old or [-1])).any()


def test_imagenet_layout_follows_the_class_list(imagenet):
    from clbench.registry import SCENARIOS

    cfg = _config(
        imagenet,
        test_dir="val",
        class_list="classes.txt",  # relative: looked up under root
        resize=36,
        mean=[0.485, 0.456, 0.406],
        std=[0.229, 0.224, 0.225],
        shots=2,
        dataset="imagenet-100 (mini)",
    )
    s = SCENARIOS.get("imagefolder_forget")(cfg)
    assert s.name == "imagefolder_forget_imagenet-100_mini"
    assert s.class_names == WNIDS  # the list's order is the class index; n00000000 ignored
    test = s.test_stream[0].dataset
    assert list(test.targets) == [c for c in range(6) for _ in range(N_TEST)]
    x, y, _ = test[N_TEST * 1]  # the first val image of n01: class 1, shorter side 36, crop 32
    assert y == 1 and x.shape == (3, 32, 32)
    # shots: two training images of every forget and retained class, none of older ones
    for exp, req in zip(s.train_stream, s.stream.requests, strict=True):
        labels = torch.tensor(list(exp.dataset.targets))
        assert torch.bincount(labels, minlength=6)[list(req.forget + req.remain)].tolist() == [
            2
        ] * len(req.forget + req.remain)
        assert len(labels) == 2 * len(req.forget + req.remain)


def _tensor_twin(s):
    """The same scenario with every sample stored as tensors (the in-memory path)."""
    from clbench.data import materialise

    train = materialise(s.benchmark.streams["source"][0].dataset)[:2]
    test = materialise(s.test_stream[0].dataset)[:2]
    return train, test


@pytest.mark.parametrize("mode", ["paired", "relabel"])
def test_lazy_batches_and_scores_equal_the_in_memory_ones(casia, mode):
    """Index-based batches read lazily are the in-memory batches, sample for sample; the
    lazy evaluation and a short training give the in-memory per-class accuracies."""
    from clbench.scenarios.forgetting import forgetting_scenario
    from clbench.strategies.erasure import FinetuneRetain

    from clbench.backbones.wideresnet import WideResNetConfig, wideresnet
    from clbench.pretrain.source import start_classifier
    from clbench.protocols.forgetting import run_forgetting
    from clbench.registry import SCENARIOS

    cfg = _config(casia)
    lazy = SCENARIOS.get("imagefolder_forget")(cfg)
    train, test = _tensor_twin(lazy)
    stored = forgetting_scenario(
        lazy.name, cfg, train, test, lazy.class_names, lazy.input_shape,
        start_checkpoint=cfg.start_checkpoint,
    )  # fmt: skip
    assert stored.in_memory and not lazy.in_memory

    class Mode(FinetuneRetain):
        data_mode = mode

    def learner(s):
        backbone = wideresnet(WideResNetConfig(depth=16, widen_factor=2, in_chans=3, img_size=32))
        model = start_classifier(backbone, cfg.start_checkpoint, s.class_names)
        conf = Mode.Config(epochs=2, batch_size=4, eval_batch_size=5, lr=1e-3)
        return Mode(model=model, cfg=conf, seed=3, in_memory=s.in_memory)

    batches = {}
    for key, s in (("lazy", lazy), ("stored", stored)):
        strategy = learner(s)
        strategy.request = s.stream.requests[0]
        strategy.experience = s.train_stream[0]
        strategy.adapted_dataset = s.train_stream[0].dataset
        strategy.make_train_dataloader()
        batches[key] = [list(strategy.dataloader) for _ in range(2)]  # two epochs
    assert len(batches["lazy"][0]) == len(batches["stored"][0]) > 1
    flat = {k: [b for epoch in v for b in epoch] for k, v in batches.items()}
    for a, b in zip(flat["lazy"], flat["stored"], strict=True):
        assert len(a) == len(b)
        for ta, tb in zip(a, b, strict=True):
            assert torch.equal(ta, tb)
    learners = [learner(s) for s in (lazy, stored)]
    results = [run_forgetting(s, m) for s, m in zip((lazy, stored), learners, strict=True)]
    assert results[0].class_sizes == results[1].class_sizes == [N_TEST] * 6
    assert np.allclose(results[0].class_accuracy, results[1].class_accuracy, equal_nan=True)
    assert len(results[0].class_accuracy) == 3 and results[0].train_steps == results[1].train_steps
    trained = [m.model.state_dict() for m in learners]  # the same updates, batch for batch
    start = learner(lazy).model.state_dict()
    assert not torch.equal(trained[0]["backbone.conv1.weight"], start["backbone.conv1.weight"])
    for k, v in trained[0].items():
        assert torch.allclose(v.float(), trained[1][k].float(), atol=1e-6), k


def test_cli_run_writes_results(casia, tmp_path, capsys):
    cfg = _config(casia)
    runs = tmp_path / "runs"
    code = run_cli(
        [
            "run",
            "scenario=imagefolder_forget",
            f"scenario.root={casia}",
            f"scenario.start_checkpoint={cfg.start_checkpoint}",
            "scenario.image_size=32",
            "scenario.n_requests=2",
            "scenario.per_request=2",
            "scenario.data_ratio=0.5",
            "scenario.num_workers=0",
            "backbone=wrn_16_2",
            "backbone.in_chans=3",
            "strategy=finetune_retain",
            "strategy.epochs=1",
            "strategy.batch_size=8",
            "tracking=none",
            "progress=false",
            f"runs_dir={runs}",
        ]
    )
    assert code == 0, capsys.readouterr().err
    record = results_of(only_run_dir(runs))
    assert record["scenario"] == "imagefolder_forget_casia100"
    assert len(record["steps"]) == 2 and record["class_sizes"] == [N_TEST] * 6
    json.dumps(record)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and "Traceback" not in err[0], err[0]
    return err[0].removeprefix("error: ")


def _bad_run(root: Path, tmp_path: Path, *extra: str) -> int:
    start = tmp_path / "start.safetensors"
    if not start.exists():
        _start_checkpoint(start)
    return run_cli(
        [
            "run",
            "scenario=imagefolder_forget",
            f"scenario.root={root}",
            f"scenario.start_checkpoint={start}",
            "scenario.image_size=32",
            "scenario.n_requests=2",
            "scenario.per_request=2",
            "backbone=wrn_16_2",
            "backbone.in_chans=3",
            "strategy=finetune_retain",
            "strategy.epochs=1",
            "tracking=none",
            "progress=false",
            f"runs_dir={tmp_path / 'runs'}",
            *extra,
        ]
    )


def test_bad_data_is_one_line(imagenet, tmp_path, capsys):
    assert _bad_run(tmp_path / "nowhere", tmp_path) == 2
    assert "missing dataset root" in _one_error_line(capsys)
    assert _bad_run(imagenet, tmp_path) == 2  # test_dir defaults to test; ImageNet has val
    line = _one_error_line(capsys)
    assert f"missing test folder {imagenet / 'test'}" in line and "scenario.test_dir" in line
    val = "scenario.test_dir=val"
    assert _bad_run(imagenet, tmp_path, val, "scenario.class_list=no.txt") == 2
    assert "class list not found: no.txt (looked in" in _one_error_line(capsys)
    (imagenet / "classes.txt").write_text("n01\nn07\n")
    assert _bad_run(imagenet, tmp_path, val, "scenario.class_list=classes.txt") == 2
    line = _one_error_line(capsys)
    assert f"class 'n07' of class list {imagenet / 'classes.txt'} has no folder" in line
    for p in (imagenet / "val/n02").iterdir():
        p.unlink()
    assert _bad_run(imagenet, tmp_path, val) == 2
    assert f"{imagenet / 'val/n02'} has no images" in _one_error_line(capsys)
    assert _bad_run(imagenet, tmp_path, "scenario.start_checkpoint=") == 2
    assert "needs its start model: set scenario.start_checkpoint=FILE" in _one_error_line(capsys)
    assert not list((tmp_path / "runs").rglob("results.json"))


def test_unreadable_image_is_one_line_from_a_worker(casia, tmp_path, capsys):
    bad = casia / "test/c3/001.png"
    bad.write_bytes(b"not a png")
    assert _bad_run(casia, tmp_path, "scenario.num_workers=2") == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"cannot read image {bad} (UnidentifiedImageError") and line.endswith(
        "replace or delete the file"
    ), line
