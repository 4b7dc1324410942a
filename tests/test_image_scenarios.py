"""The class-incremental image benchmarks (``split_cifar100``, ``imagenet_r``, ``cub200``,
``domainnet``) on tiny fixtures written in their exact on-disk layouts: the readers, PILOT's
class order and uneven splits, the transforms a backbone's data config sets, the lazy
loader's determinism, a malicious CIFAR pickle, bad roots, and runs through the CLI with
a small ``vit_b16``."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import only_run_dir, results_of, run_cli, snapshot_after

# ----------------------------------------------------------------------- fixtures


def _noise(seed: int, h: int, w: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def write_cifar100(root: Path, n_train: int = 2, n_test: int = 1, protocol: int = 2) -> Path:
    """torchvision's CIFAR-100 root: each image's pixels all equal its class id."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = np.repeat(np.arange(100), n)
        entry = {
            b"filenames": [f"{name}_{i}.png".encode() for i in range(len(labels))],
            b"batch_label": f"{name} batch".encode(),
            b"fine_labels": labels.tolist(),
            b"coarse_labels": (labels // 5).tolist(),
            b"data": np.repeat(labels.astype(np.uint8)[:, None], 3072, axis=1),
        }
        with (folder / name).open("wb") as f:
            pickle.dump(entry, f, protocol=protocol)
    meta = {
        b"fine_label_names": [f"class_{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"super_{i}".encode() for i in range(20)],
    }
    with (folder / "meta").open("wb") as f:
        pickle.dump(meta, f, protocol=protocol)
    return root


def write_imagenet_r(root: Path, n_classes: int = 4, per_class: int = 5) -> Path:
    """ROOT/imagenet-r/<wnid>/<image>.jpg (one greyscale PNG) and its README.txt."""
    base = root / "imagenet-r"
    for c in range(n_classes):
        folder = base / f"n0{c:07d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            img = _noise(10 * c + i, 20 + i, 16)
            img.save(folder / f"art_{i}.jpg")
        _noise(99, 12, 12, "L").save(folder / "sketch_0.png")
    (base / "README.txt").write_text(
        "ImageNet-R classes\n" + "".join(f"n0{c:07d} thing_{c}\n" for c in range(n_classes - 1))
    )
    return root


def write_cub(root: Path, n_classes: int = 3, per_class: int = 4) -> Path:
    """ROOT/CUB_200_2011 with images/, images.txt, image_class_labels.txt,
    train_test_split.txt (first half of each class train) and classes.txt."""
    base = root / "CUB_200_2011"
    lines = {"images": [], "labels": [], "split": [], "classes": []}
    image_id = 0
    for c in range(n_classes):
        cls = f"{c + 1:03d}.Bird_{c}"
        lines["classes"].append(f"{c + 1} {cls}")
        (base / "images" / cls).mkdir(parents=True)
        for i in range(per_class):
            image_id += 1
            rel = f"{cls}/Bird_{c}_{i:04d}.jpg"
            _noise(100 + image_id, 14, 18).save(base / "images" / rel)
            lines["images"].append(f"{image_id} {rel}")
            lines["labels"].append(f"{image_id} {c + 1}")
            lines["split"].append(f"{image_id} {int(i < per_class // 2)}")
    for key, file in (
        ("images", "images.txt"),
        ("labels", "image_class_labels.txt"),
        ("split", "train_test_split.txt"),
        ("classes", "classes.txt"),
    ):
        (base / file).write_text("\n".join(lines[key]) + "\n")
    return root


DN_CLASSES = ["aircraft_carrier", "bee", "cake", "duck"]


def write_domainnet(root: Path, domains=("clipart", "sketch"), n_train=3, n_test=2) -> Path:
    """ROOT/<domain>/<class>/<image> and ROOT/<domain>_{train,test}.txt."""
    for d, domain in enumerate(domains):
        for split, n in (("train", n_train), ("test", n_test)):
            lines = []
            for c, cls in enumerate(DN_CLASSES):
                (root / domain / cls).mkdir(parents=True, exist_ok=True)
                for i in range(n):
                    rel = f"{domain}/{cls}/{domain}_{c:03d}_{split}{i:02d}.jpg"
                    _noise(1000 * d + 100 * c + 10 * i + len(split), 16, 16).save(root / rel)
                    lines.append(f"{rel} {c}")
            (root / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def _pilot_order(n: int, seed: int = 1993) -> list[int]:
    """PILOT's own code path (utils/data_manager.py), global RNG state restored after."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        return np.random.permutation(n).tolist()
    finally:
        np.random.set_state(state)


def _cifar(root: Path, **kw):
    from clbench.scenarios.images import split_cifar100

    return split_cifar100(split_cifar100.Config(root=str(root), num_workers=0, **kw))


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    return write_cifar100(tmp_path_factory.mktemp("cifar"))


# ----------------------------------------------------------------------- CIFAR-100


def test_cifar_layout_pilot_order_and_relabelling(cifar_root):
    s = _cifar(cifar_root)
    order = _pilot_order(100)
    assert order[:5] == [68, 56, 78, 8, 23]  # PILOT's / PyCIL's logged CIFAR-100 order
    assert s.name == "split_cifar100" and s.kind == "class_incremental"
    assert s.class_names == [f"class {c}" for c in order]
    assert s.num_experiences == 10
    assert s.classes_per_experience == [list(range(10 * t, 10 * t + 10)) for t in range(10)]
    assert [len(e.dataset) for e in s.train_stream] == [20] * 10
    assert [len(e.dataset) for e in s.test_stream] == [10] * 10
    assert not s.in_memory and s.input_shape == (3, 224, 224)
    # label y is class order[y]: the fixture's pixels hold the original class id
    exp = s.test_stream[3].dataset.eval()
    for i in range(len(exp)):
        x, y, task = exp[i]
        assert x.shape == (3, 224, 224) and task == 0
        pixel = round(float(x[0, 0, 0] * 0.5 + 0.5) * 255)  # default mean = std = 0.5
        assert pixel == order[y] and 30 <= y < 40
    assert _cifar(cifar_root, shuffle=False).class_names[:3] == ["class 0", "class 1", "class 2"]


def test_uneven_splits(cifar_root):
    from clbench.errors import ConfigError

    s = _cifar(cifar_root, init_cls=50, increment=10, n_experiences=0)
    assert [len(c) for c in s.classes_per_experience] == [50, 10, 10, 10, 10, 10]
    assert s.classes_per_experience[0] == list(range(50))
    assert [len(e.dataset) for e in s.train_stream] == [100, 20, 20, 20, 20, 20]
    s = _cifar(cifar_root, init_cls=40, increment=25, n_experiences=4)
    assert [len(c) for c in s.classes_per_experience] == [40, 25, 25, 10]  # PILOT's remainder
    with pytest.raises(ConfigError, match=r"give 6 experiences, scenario\.n_experiences=10"):
        _cifar(cifar_root, init_cls=50, increment=10)


def test_split_digits_uneven_and_unchanged_default():
    from clbench.scenarios.base import class_incremental_from_tensors
    from clbench.scenarios.digits import split_digits
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from clbench.data import materialise
    from clbench.errors import ConfigError
    from clbench.lowres import to_model_input

    default = split_digits(split_digits.Config())
    # today's construction (before init_cls / increment), rebuilt here
    digits = load_digits()
    labels = digits.target.astype(np.int64)
    tr, te = train_test_split(
        np.arange(len(labels)), test_size=0.3, stratify=labels, random_state=0
    )
    order = np.random.default_rng(1993).permutation(10).tolist()
    x = to_model_input(torch.from_numpy(digits.images.astype(np.float32)))
    y = torch.from_numpy(labels)
    old = class_incremental_from_tensors(x[tr], y[tr], x[te], y[te], order, 5)
    for new_stream, old_stream in (
        (default.train_stream, old.train_stream),
        (default.test_stream, old.test_stream),
    ):
        for a, b in zip(new_stream, old_stream, strict=True):
            for ta, tb in zip(materialise(a.dataset), materialise(b.dataset), strict=True):
                assert torch.equal(ta, tb)
    uneven = split_digits(split_digits.Config(init_cls=4, increment=3, n_experiences=0))
    assert uneven.classes_per_experience == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert uneven.class_names == default.class_names
    with pytest.raises(ConfigError, match=r"invalid value for scenario\.n_experiences: 3"):
        split_digits.Config(n_experiences=3)


def test_malicious_cifar_pickle_is_refused_without_running(tmp_path):
    from clbench.errors import ConfigError

    root = write_cifar100(tmp_path / "data")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with (root / "cifar-100-python" / "train").open("wb") as f:
        pickle.dump({b"data": Payload(), b"fine_labels": [0]}, f, protocol=2)
    with pytest.raises(ConfigError) as e:
        _cifar(root)
    line = str(e.value)
    assert "\n" not in line and "refused to unpickle posix.system" in line
    assert str(root / "cifar-100-python" / "train") in line
    assert not marker.exists()


def test_cifar_protocol_5_and_download_offline(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    from clbench.errors import ClbenchError

    root = write_cifar100(tmp_path / "p5", protocol=pickle.HIGHEST_PROTOCOL)
    assert _cifar(root).class_names[0] == "class 68"

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(ClbenchError) as e:
        _cifar(root, download=True)  # the fixture fails the MD5 check: a download is tried
    assert f"cannot download CIFAR-100 into {root}" in str(e.value)
    assert "OSError: network is unreachable" in str(e.value)


# ----------------------------------------------------------------------- transforms


def test_transforms_follow_the_data_config():
    from clbench.scenarios.images import ImagePipeline

    grey = torch.full((3, 30, 40), 102, dtype=torch.uint8)  # 0.4 after scaling
    pipe = ImagePipeline(augment=True, crop_scale=(0.05, 1.0), crop_pct=0.875)
    assert pipe.input_shape == (3, 224, 224)  # before a backbone configures it
    out = pipe.eval_view(torch.full((3, 20, 20), 255, dtype=torch.uint8))
    assert out.shape == (3, 224, 224) and torch.allclose(out, torch.ones(()))
    config = {
        "input_size": (3, 20, 20),
        "mean": (0.2, 0.3, 0.4),
        "std": (0.5, 0.25, 0.1),
        "interpolation": "nearest",
        "crop_pct": 1.0,
    }
    assert pipe.configure(config) == (3, 20, 20)
    expected = torch.tensor([0.4, 0.4, 0.0]).view(3, 1, 1).expand(3, 20, 20)
    for view in (pipe.eval_view, pipe.train_view):
        out = view(grey)
        assert out.shape == (3, 20, 20)
        assert torch.allclose(out, expected, atol=1e-5)
    # crop_pct: a 2-px white frame on 44 x 44 is cut by PILOT's 256/224 resize + crop, and
    # kept when the scenario takes the backbone's crop_pct (1.0 here)
    framed = torch.full((3, 44, 44), 255, dtype=torch.uint8)
    framed[:, 2:-2, 2:-2] = 0
    black = (0.0 - pipe.mean) / pipe.std
    assert torch.allclose(pipe.eval_view(framed), black.expand(3, 20, 20))
    backbone_crop = ImagePipeline(augment=True, crop_scale=(0.05, 1.0), crop_pct=0.0)
    backbone_crop.configure(config)
    assert backbone_crop.crop_pct == 1.0
    assert bool((backbone_crop.eval_view(framed) > black).any())
    # random crops and flips: a function of torch's seed
    noise = torch.from_numpy(np.asarray(_noise(0, 30, 40))).permute(2, 0, 1).contiguous()
    views = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        views.append(pipe.train_view(noise))
    assert torch.equal(views[0], views[1]) and not torch.equal(views[0], views[2])
    pipe.augment = False
    assert torch.equal(pipe.train_view(noise), pipe.eval_view(noise))


def test_lazy_batches_are_the_same_for_any_number_of_workers(tmp_path):
    from clbench.scenarios.images import imagenet_r

    from clbench.data import LazyBatches
    from clbench.seeding import derived_generator

    root = write_imagenet_r(tmp_path)
    s = imagenet_r(imagenet_r.Config(root=str(root), n_experiences=2, num_workers=2))
    s.configure_inputs({"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.5,) * 3})
    data = s.train_stream[0].dataset.train()
    assert s.train_stream[0].loader_workers == 2

    def passes(workers: int) -> list[list[torch.Tensor]]:
        loader = LazyBatches(data, 3, True, derived_generator(7, 0), num_workers=workers)
        return [list(loader), list(loader)]  # two epochs

    serial, parallel = passes(0), passes(2)
    assert len(serial[0]) == 4  # 10 training images in batches of 3
    for a, b in zip(serial, parallel, strict=True):
        for batch_a, batch_b in zip(a, b, strict=True):
            for ta, tb in zip(batch_a, batch_b, strict=True):
                assert torch.equal(ta, tb)
    first, second = (torch.cat([b[0] for b in p]) for p in serial)
    assert not torch.equal(first, second)  # each epoch draws new crops (and a new order)
    ordered = list(LazyBatches(s.test_stream[0].dataset.eval(), 4, False))
    assert [len(b[1]) for b in ordered] == [2]


# ----------------------------------------------------------------------- layouts


def test_imagenet_r_split_and_pre_split_folders(tmp_path):
    from clbench.scenarios.imagesets import read_imagenet_r

    root = write_imagenet_r(tmp_path / "a")
    data = read_imagenet_r(str(root), 0.2, 1993)
    assert data.class_names == ["thing 0", "thing 1", "thing 2", "n00000003"]
    train, test = data.train[0], data.test[0]
    assert len(train) == 4 * 5 and len(test) == 4 * 1  # 6 images a class: 5 / 1
    assert not set(train) & set(test)
    assert sorted(train + test) == sorted((root / "imagenet-r").rglob("*.*g"))
    assert read_imagenet_r(str(root / "imagenet-r"), 0.2, 1993).train[0] == train
    assert read_imagenet_r(str(root), 0.2, 1993).test == data.test  # the seed fixes it
    other = {read_imagenet_r(str(root), 0.2, seed).test[0][0] for seed in range(6)}
    assert len(other) > 1
    # PILOT's / InfLoRA's pre-split folders are taken as they are
    pre = tmp_path / "b" / "imagenet-r"
    for split, n in (("train", 3), ("test", 2)):
        for c in range(3):
            (pre / split / f"n{c:08d}").mkdir(parents=True)
            for i in range(n):
                _noise(i, 10, 10).save(pre / split / f"n{c:08d}" / f"{i}.jpg")
    data = read_imagenet_r(str(tmp_path / "b"), 0.2, 1993)
    assert len(data.train[0]) == 9 and len(data.test[0]) == 6
    assert data.train[1] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    from clbench.scenarios.images import imagenet_r

    s = imagenet_r(imagenet_r.Config(root=str(tmp_path / "b"), n_experiences=3, num_workers=0))
    x, y, _ = s.train_stream[0].dataset.train()[0]
    assert x.shape == (3, 224, 224) and y == 0


def test_cub200_official_split(tmp_path):
    from clbench.scenarios.images import cub200

    root = write_cub(tmp_path)
    s = cub200(cub200.Config(root=str(root), n_experiences=3, shuffle=False, num_workers=0))
    assert s.name == "cub200"
    assert s.class_names == ["Bird 0", "Bird 1", "Bird 2"]
    assert [len(e.dataset) for e in s.train_stream] == [2, 2, 2]
    assert [len(e.dataset) for e in s.test_stream] == [2, 2, 2]
    x, y, _ = s.test_stream[1].dataset.eval()[0]
    assert y == 1 and x.shape == (3, 224, 224)
    order = _pilot_order(3)
    shuffled = cub200(cub200.Config(root=str(root / "CUB_200_2011"), n_experiences=3))
    assert shuffled.class_names == [f"Bird {c}" for c in order]


def test_domainnet_both_orderings(tmp_path):
    from clbench.scenarios.images import domainnet

    from clbench.errors import ConfigError

    root = write_domainnet(tmp_path)
    cfg = dict(root=str(root), domains=["clipart", "sketch"], num_workers=0, shuffle=False)
    ci = domainnet(domainnet.Config(n_experiences=2, **cfg))
    assert ci.name == "domainnet_clipart_sketch"
    assert ci.class_names == ["aircraft carrier", "bee", "cake", "duck"]
    assert ci.classes_per_experience == [[0, 1], [2, 3]]
    assert [len(e.dataset) for e in ci.train_stream] == [12, 12]  # 2 domains x 2 classes x 3
    di = domainnet(domainnet.Config(ordering="by_domain", **cfg))
    assert di.num_experiences == 2 and di.kind == "class_incremental"
    assert di.classes_per_experience == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert [len(e.dataset) for e in di.train_stream] == [12, 12]
    assert [len(e.dataset) for e in di.test_stream] == [8, 8]
    paths = di.test_stream[1].dataset.eval()
    assert paths[0][0].shape == (3, 224, 224)
    with pytest.raises(ConfigError, match="valid choices: by_class, by_domain"):
        domainnet.Config(ordering="task", **cfg)
    with pytest.raises(ConfigError, match=r"scenario\.domains: 'clip'"):
        domainnet.Config(**{**cfg, "domains": ["clip"]})
    with pytest.raises(ConfigError, match="missing domain folder"):
        domainnet(domainnet.Config(**{**cfg, "domains": ["real"]}))


# ----------------------------------------------------------------------- the CLI

SMALL_VIT = [
    "backbone=vit_b16",
    "backbone.model=vit_tiny_patch16_224",
    "backbone.pretrained=none",
    "backbone.img_size=32",
    "strategy=finetune",
    "strategy.epochs=1",
    "strategy.batch_size=4",
    "strategy.eval_batch_size=8",
    "scenario.num_workers=0",
    "tracking=none",
    "progress=false",
]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and "Traceback" not in err[0], err[0]
    return err[0].removeprefix("error: ")


def test_bad_root_is_one_line_and_exit_2(tmp_path, capsys):
    runs = f"runs_dir={tmp_path / 'runs'}"
    for scenario, layout in (
        ("imagenet_r", "imagenet-r/<wnid>/<image>"),
        ("split_cifar100", "cifar-100-python/{train,test,meta}"),
        ("cub200", "CUB_200_2011/{images/<class>/<image>"),
        ("domainnet", "<domain>_train.txt"),
    ):
        args = ["run", f"scenario={scenario}", f"scenario.root={tmp_path / 'nowhere'}", runs]
        assert run_cli([*args, *SMALL_VIT]) == 2
        line = _one_error_line(capsys)
        assert str(tmp_path / "nowhere") in line and layout in line, line
    assert run_cli(["run", "scenario=cub200", runs, *SMALL_VIT]) == 2
    assert "scenario cub200 needs its data: set scenario.root=DIR" in _one_error_line(capsys)
    (tmp_path / "empty").mkdir()
    empty = ["run", "scenario=split_cifar100", f"scenario.root={tmp_path / 'empty'}", runs]
    assert run_cli([*empty, *SMALL_VIT]) == 2
    assert f"missing {tmp_path / 'empty' / 'cifar-100-python'}" in _one_error_line(capsys)
    assert not list(tmp_path.rglob("results.json"))


def test_runs_with_a_small_vit_are_reproducible_and_resume(tmp_path, capsys):
    root = write_imagenet_r(tmp_path / "data", per_class=7)
    run = ["run", "scenario=imagenet_r", f"scenario.root={root}", "scenario.n_experiences=2"]
    snapshot = tmp_path / "snapshot"
    assert run_cli([*run, *SMALL_VIT, f"runs_dir={tmp_path / 'a'}"]) == 0, capsys.readouterr()
    with snapshot_after(1, snapshot):  # a run killed after its first experience
        assert run_cli([*run, *SMALL_VIT, f"runs_dir={tmp_path / 'b'}"]) == 0
    a, b = (results_of(only_run_dir(tmp_path / r)) for r in ("a", "b"))
    assert a["scenario"] == "imagenet_r"
    assert a["classes_per_experience"] == [[0, 1], [2, 3]] and a["test_sizes"] == [4, 4]
    assert a["accuracy_matrix"] == b["accuracy_matrix"] and a["metrics"] == b["metrics"]
    assert run_cli(["resume", str(snapshot)]) == 0, capsys.readouterr().err
    resumed = results_of(snapshot)
    assert resumed["resumed_after_experience"] == 1
    assert resumed["accuracy_matrix"] == a["accuracy_matrix"]


def test_domain_incremental_run_records_a_matrix(tmp_path, capsys):
    root = write_domainnet(tmp_path / "data")
    code = run_cli(
        [
            "run",
            "scenario=domainnet",
            f"scenario.root={root}",
            "scenario.domains=[clipart,sketch]",
            "scenario.ordering=by_domain",
            *SMALL_VIT,
            f"runs_dir={tmp_path / 'runs'}",
        ]
    )
    assert code == 0, capsys.readouterr().err
    r = results_of(only_run_dir(tmp_path / "runs"))
    assert r["scenario"] == "domainnet_clipart_sketch"
    assert r["classes_per_experience"] == [[0, 1, 2, 3]] * 2 and r["test_sizes"] == [8, 8]
    matrix = np.array(r["accuracy_matrix"])
    assert matrix.shape == (2, 2) and ((matrix >= 0) & (matrix <= 1)).all()
    # every experience holds every class: the task-aware mask keeps all logits
    assert r["accuracy_matrix_task_aware"] == r["accuracy_matrix"]
