"""The CLAM-layout MIL scenarios (``clam_bags``, ``tcga_conslide``, ``comel_organs``) read
fixtures written in the exact on-disk layout (h5_files/ with features + coords written as
CLAM's save_hdf5 does, pt_files/ from torch.save, a case_id,slide_id,label CSV, CLAM's
splits_k.csv with an index column and padded columns): tasks, class ids, split membership,
features, coordinates and instance labels come back as written; bad data is one line."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from clbench.errors import ClbenchError, ConfigError

D = 8  # the fixtures' feature size


def _h5(path: Path, **datasets: np.ndarray) -> None:
    """An h5 file as CLAM's save_hdf5 writes it: resizable, chunked datasets."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, value in datasets.items():
            ds = f.create_dataset(
                key,
                shape=value.shape,
                maxshape=(None, *value.shape[1:]),
                chunks=(1, *value.shape[1:]),
                dtype=value.dtype,
            )
            ds[:] = value


def _write_task(
    folder: Path,
    labels: dict[str, str],
    splits: dict[int, dict[str, list[str]]],
    *,
    pt_only: tuple[str, ...] = (),
    also_pt: tuple[str, ...] = (),
    patch_labels: bool = False,
    seed: int = 0,
) -> dict[str, dict[str, torch.Tensor]]:
    """A CLAM-layout task folder; returns what was written per slide (features, coords,
    patch_labels; ``pt``: the pt file's tensor)."""
    rng = np.random.default_rng(seed)
    written: dict[str, dict[str, torch.Tensor]] = {}
    for s, slide in enumerate(labels):
        stem = slide.rsplit(".svs", 1)[0]  # a slide_id may carry its file's suffix
        n = 3 + s
        feats = rng.standard_normal((n, D)).astype(np.float32)
        coords = (rng.integers(0, 200, (n, 2)) * 256).astype(np.int64)
        inst = (np.arange(n) % (s + 2) == 0).astype(np.int64)  # a pattern per slide
        entry = {"features": torch.from_numpy(feats)}
        if slide not in pt_only:
            extra = {"patch_labels": inst} if patch_labels else {}
            _h5(folder / "h5_files" / f"{stem}.h5", features=feats, coords=coords, **extra)
            entry["coords"] = torch.from_numpy(coords)
            if patch_labels:
                entry["patch_labels"] = torch.from_numpy(inst)
        if slide in pt_only or slide in also_pt:
            pt = torch.from_numpy(feats if slide in pt_only else feats + 1.0)
            (folder / "pt_files").mkdir(parents=True, exist_ok=True)
            torch.save(pt, folder / "pt_files" / f"{stem}.pt")
            entry["pt"] = pt
        written[slide] = entry
    with (folder / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case_id", "slide_id", "label"])
        w.writerows([f"case_{slide[:4]}", slide, label] for slide, label in labels.items())
    for k, split in splits.items():
        _write_splits(folder / "splits" / f"splits_{k}.csv", split)
    return written


def _write_splits(path: Path, split: dict[str, list[str]]) -> None:
    """CLAM's splits_k.csv: an unnamed index column, train,val,test padded with empty cells."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = [split.get(c, []) for c in ("train", "val", "test")]
    rows = max(len(c) for c in cols)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "train", "val", "test"])
        for i in range(rows):
            w.writerow([i, *(c[i] if i < len(c) else "" for c in cols)])


def _build(name: str, *overrides: str):
    """Compose the run config (as clbench run does) and build its scenario."""
    from clbench.config import compose, typed
    from clbench.registry import SCENARIOS

    cfg = compose([f"scenario={name}", "strategy=mil_finetune", *overrides])
    assert cfg.backbone.name == "abmil"
    assert cfg.backbone.in_dim == cfg.scenario.feature_dim  # the aggregator follows the data
    return SCENARIOS.get(name)(typed("scenario", cfg.scenario))


def _one_line(e: pytest.ExceptionInfo, *parts: object) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    for part in parts:
        assert str(part) in msg, (part, msg)
    return msg


def _check_bags(bags, names: list[str], targets: list[int], written) -> None:
    """Exactly these slides in this order, these labels, the written features/coords."""
    assert bags.names == names
    assert bags.targets == targets
    for i, slide in enumerate(names):
        x, c = bags.bag(i)
        w = written[slide]
        assert x.dtype == torch.float32 and torch.equal(x, w["features"])
        if "coords" in w:  # read from the h5 file even where a pt file exists too
            assert c is not None and c.dtype == w["coords"].dtype and torch.equal(c, w["coords"])
        else:
            assert c is None
        if "patch_labels" in w:
            assert torch.equal(bags.instance_labels(i), w["patch_labels"])
        else:
            assert bags.instance_labels(i) is None


# ---------------------------------------------------------------------------- clam_bags
NSCLC = {"n1": "LUAD", "n2": "LUSC", "n3": "LUAD", "n4": "LUSC", "n5": "LUAD", "n6": "LUSC"}
NSCLC_SPLIT = {"train": ["n3", "n1", "n4", "n2"], "val": ["n5"], "test": ["n6"]}
RCC = {"r1": "PRCC", "r2": "CCRCC", "r3": "CHRCC", "r4": "PRCC", "r5": "CCRCC", "r6": "PRCC"}
RCC_SPLIT = {"train": ["r1", "r2", "r3", "r4"], "val": [], "test": ["r5", "r6"]}


@pytest.mark.parametrize("setting", ["new_classes", "binary"])
def test_clam_bags_reads_the_layout(tmp_path, setting):
    root = tmp_path / "data"
    w_n = _write_task(root / "nsclc", NSCLC, {0: NSCLC_SPLIT}, also_pt=("n1",), seed=1)
    w_r = _write_task(root / "rcc", RCC, {0: RCC_SPLIT}, pt_only=("r4", "r5"), seed=2)
    tasks = (
        "[{name:NSCLC,features_dir:nsclc,classes:[LUAD,LUSC]},"
        "{name:RCC,features_dir:rcc,classes:[CCRCC,PRCC],ignore:[CHRCC]}]"
    )
    sc = _build(
        "clam_bags",
        f"scenario.root={root}",
        f"scenario.tasks={tasks}",
        f"scenario.setting={setting}",
        f"scenario.feature_dim={D}",
        "scenario.num_workers=0",
    )
    stream = sc.stream
    assert sc.kind == "mil" and sc.num_experiences == 2 and sc.name == "clam_bags_NSCLC-RCC"
    assert stream.setting == setting and stream.task_names == ("NSCLC", "RCC")
    ci = setting == "new_classes"
    assert stream.task_classes == (((0, 1), (2, 3)) if ci else ((0, 1), (0, 1)))
    assert sc.classes_per_experience == ([[0, 1], [2, 3]] if ci else [[0, 1], [0, 1]])
    assert sc.class_names == (["LUAD", "LUSC", "CCRCC", "PRCC"] if ci else ["negative", "positive"])
    assert sc.input_shape == (None, D)

    # NSCLC: every split as the CSV lists it; n1's h5 wins over its (different) pt file
    ids = {"LUAD": 0, "LUSC": 1}
    for split, bags in (
        ("train", stream.train[0]),
        ("val", stream.val[0]),
        ("test", stream.test[0]),
    ):
        names = NSCLC_SPLIT[split]
        _check_bags(bags, names, [ids[NSCLC[s]] for s in names], w_n)
    assert not torch.equal(stream.train[0].bag(1)[0], w_n["n1"]["pt"])
    # RCC: the CHRCC slide r3 is left out; r4, r5 have pt files only (no coords)
    off = 2 if ci else 0
    ids = {"CCRCC": off, "PRCC": off + 1}
    _check_bags(stream.train[1], ["r1", "r2", "r4"], [ids[RCC[s]] for s in ("r1", "r2", "r4")], w_r)
    _check_bags(stream.test[1], ["r5", "r6"], [ids["CCRCC"], ids["PRCC"]], w_r)
    assert len(stream.val[1]) == 0
    assert torch.equal(stream.train[1].bag(2)[0], w_r["r4"]["pt"])

    # the Avalanche experiences wrap the same bags: (features, label, task) read from files
    x, y, _ = sc.train_stream[1].dataset[2][:3]
    assert torch.equal(x, w_r["r4"]["features"]) and int(y) == ids["PRCC"]
    # DataLoader workers pickle the dataset: the file-backed bags survive it
    again = pickle.loads(pickle.dumps(stream.test[0]))
    assert torch.equal(again.bag(0)[0], w_n["n6"]["features"])


# ------------------------------------------------------------------------ tcga_conslide
TCGA = {  # ConSlide's folders, class names and left-out subtypes, two slides a class
    "TCGA-ESCA": (["Adenocarcinoma", "Squamous cell carcinoma"], "Tubular adenocarcinoma"),
    "TCGA-RCC": (["CCRCC", "PRCC"], "CHRCC"),
    "TCGA-BRCA": (["IDC", "ILC"], "MDLC"),
    "TCGA-NSCLC": (["LUAD", "LUSC"], None),
}


def test_tcga_conslide_order_ids_and_fold(tmp_path):
    written, expected = {}, []
    for t, (folder, (classes, left_out)) in enumerate(TCGA.items()):
        p = folder[5:].lower()
        labels = {f"{p}{i}": classes[i % 2] for i in range(4)}
        labels[f"{p}4.svs"] = classes[1]  # a slide_id with its slide file's suffix
        if left_out:
            labels[f"{p}x"] = left_out
        ids = list(labels)
        folds = {  # fold 1 differs from fold 0: the config's fold picks the file
            0: {"train": ids[:2], "val": [], "test": ids[2:]},
            1: {"train": [ids[3], ids[0], ids[4], *ids[5:]], "val": [ids[1]], "test": [ids[2]]},
        }
        written.update(_write_task(Path(tmp_path, folder), labels, folds, seed=10 + t))
        expected.append((labels, folds[1], t))
    sc = _build(
        "tcga_conslide", f"scenario.root={tmp_path}", "scenario.fold=1", f"scenario.feature_dim={D}"
    )
    s = sc.stream
    assert s.task_names == ("ESCA", "RCC", "BRCA", "NSCLC") and s.setting == "new_classes"
    assert sc.classes_per_experience == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert sc.class_names == [c for classes, _ in TCGA.values() for c in classes]
    for labels, split, t in expected:
        classes = list(TCGA.values())[t][0]
        for name, bags in (("train", s.train[t]), ("val", s.val[t]), ("test", s.test[t])):
            kept = [x for x in split[name] if labels[x] in classes]  # the left-out subtype
            _check_bags(bags, kept, [2 * t + classes.index(labels[x]) for x in kept], written)
        assert len(s.train[t]) == 3  # ids[3], ids[0], ids[4]; the ignored slide left out


# ------------------------------------------------------------------------- comel_organs
COHORTS = ["cm16/mixed", "paip/HCC", "paip/prostate", "paip/HBP", "paip/colon"]


def _comel_root(tmp_path: Path) -> tuple[Path, list[dict], list[dict]]:
    root, written, tables = tmp_path / "comel", [], []
    for t, cohort in enumerate(COHORTS):
        labels = {f"c{t}_{i}": ("normal", "tumor")[i % 2] for i in range(5)}
        split = {"train": [f"c{t}_{i}" for i in (0, 1, 2)], "val": [f"c{t}_3"], "test": [f"c{t}_4"]}
        pt_only = ("c0_2",) if t == 0 else ()
        written.append(
            _write_task(
                root / cohort, labels, {0: split}, pt_only=pt_only, patch_labels=True, seed=20 + t
            )
        )
        tables.append((labels, split))
    return root, written, tables


def test_comel_organs_binary_with_instance_labels(tmp_path):
    root, written, tables = _comel_root(tmp_path)
    sc = _build("comel_organs", f"scenario.root={root}", f"scenario.feature_dim={D}")
    s = sc.stream
    assert s.setting == "binary" and sc.num_experiences == 5
    assert s.task_names == ("CAMELYON16", "PAIP-HCC", "PAIP-prostate", "PAIP-HBP", "PAIP-colon")
    assert s.task_classes == ((0, 1),) * 5 and sc.class_names == ["normal", "tumor"]
    for t, (labels, split) in enumerate(tables):
        for name, bags in (("train", s.train[t]), ("val", s.val[t]), ("test", s.test[t])):
            ids = split[name]
            _check_bags(bags, ids, [int(labels[x] == "tumor") for x in ids], written[t])
        assert s.train[t].has_instance_labels
    assert s.train[0].instance_labels(2) is None  # c0_2: a pt file only

    no_val = _build(
        "comel_organs",
        f"scenario.root={root}",
        f"scenario.feature_dim={D}",
        "scenario.use_val=false",
    )
    assert no_val.stream.val is None


# ------------------------------------------------------------------------------- errors
def test_bad_data_is_one_line_naming_the_path(tmp_path):
    root, _, _ = _comel_root(tmp_path)
    ok = (f"scenario.root={root}", f"scenario.feature_dim={D}")
    first = root / "cm16" / "mixed"

    with pytest.raises(ConfigError) as e:  # the features' D is not the config's
        _build("comel_organs", f"scenario.root={root}", "scenario.feature_dim=1024")
    _one_line(
        e,
        first / "h5_files" / "c0_0.h5",
        f"have D={D}",
        "scenario.feature_dim=1024",
        f"set scenario.feature_dim={D}",
    )

    with pytest.raises(ConfigError) as e:  # no root given
        _build("comel_organs", f"scenario.feature_dim={D}")
    _one_line(e, "set scenario.root=DIR")
    with pytest.raises(ConfigError) as e:  # a root that is not there
        _build("comel_organs", f"scenario.root={tmp_path / 'nowhere'}")
    _one_line(e, tmp_path / "nowhere", "scenario.root")

    with pytest.raises(ConfigError) as e:  # no splits file for the fold
        _build("comel_organs", *ok, "scenario.fold=3")
    _one_line(e, first / "splits" / "splits_3.csv", "splits_0.csv")

    (root / "paip/HCC/h5_files/c1_4.h5").unlink()  # a test slide of task 1 without features
    with pytest.raises(ConfigError) as e:
        _build("comel_organs", *ok)
    _one_line(e, "'c1_4'", root / "paip/HCC/h5_files/c1_4.h5", root / "paip/HCC/pt_files/c1_4.pt")

    _write_splits(
        root / "paip/HCC/splits/splits_0.csv", {"train": ["c1_0", "ghost"], "test": ["c1_1"]}
    )
    with pytest.raises(ConfigError) as e:  # a split slide the label CSV does not know
        _build("comel_organs", *ok)
    _one_line(e, "'ghost'", root / "paip/HCC/labels.csv")

    (root / "paip/HCC/labels.csv").write_text("case_id,slide_id,label\np,c1_0,normall\n")
    with pytest.raises(ConfigError) as e:  # a label that is not a class of the task
        _build("comel_organs", *ok)
    _one_line(e, root / "paip/HCC/labels.csv", "'normall'", "normal, tumor")

    (root / "paip/HCC/labels.csv").unlink()
    with pytest.raises(ConfigError) as e:
        _build("comel_organs", *ok)
    _one_line(e, root / "paip/HCC/labels.csv", "labels_csv")

    with h5py.File(first / "h5_files" / "c0_0.h5", "a") as f:  # patch labels of the wrong size
        del f["patch_labels"]
        f["patch_labels"] = np.zeros(2, np.int64)
    with pytest.raises(ClbenchError) as e:
        _build("comel_organs", *ok)
    _one_line(e, first / "h5_files" / "c0_0.h5", "patch_labels")
