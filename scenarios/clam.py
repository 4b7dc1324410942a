"""Continual MIL on real whole-slide features in the CLAM layout (kind ``mil``).

The layout CLAM's ``extract_features_fp.py`` writes, and ConSlide's and CoMEL's data
preparation follow (https://github.com/mahmoodlab/CLAM). One task is one folder of
features plus a label CSV and a split file:

- ``FEATURES_DIR/h5_files/<slide_id>.h5``: datasets ``features`` (N x D float32) and
  ``coords`` (N x 2, level-0 top-left x, y); optionally ``patch_labels`` (N,) 0/1, the
  patch-level tumour labels of CoMEL's h5 files, which become the bag's instance labels;
- ``FEATURES_DIR/pt_files/<slide_id>.pt``: the same features as a plain tensor saved with
  ``torch.save``, read (with ``weights_only=True``) only where the h5 file is missing: no
  coordinates, no instance labels;
- a label CSV with columns ``case_id,slide_id,label`` (``label``: a class name, e.g.
  ``LUAD``; a ``slide_id`` may carry its slide file's suffix, ``.svs``...);
- ``splits_<k>.csv`` (CLAM's ``create_splits_seq.py``): columns ``train,val,test`` of
  slide ids, shorter columns padded with empty cells, an unnamed index column first.

A task lists its classes in order; labels it names in ``ignore`` are left out (ConSlide
drops the rarer subtypes so). In the ``new_classes`` setting task t's classes get
the next global ids in arrival order (task 0: 0, 1; task 1: 2, 3 ...), one head grows
over all of them (ConSlide); in ``binary`` every task's two classes are 0 (normal /
negative) and 1 (tumour / positive), the same head over every organ (CoMEL). Bags are
read from their files on access (:func:`read_bag`); building the scenario opens every
listed file once to check it (its feature size, coordinates and instance labels).

- ``clam_bags``: any tasks, listed in the config;
- ``tcga_conslide``: ConSlide's TCGA sequence (Huang et al., ICCV 2023,
  https://github.com/HKU-MedAI/ConSlide), ESCA, RCC, BRCA, NSCLC x 2 subtypes;
- ``comel_organs``: CoMEL's normal-vs-tumour sequence (ICCV 2025,
  https://github.com/Hyun1A/CoMEL): CAMELYON16, then PAIP's HCC, prostate, HBP, colon.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from clbench.scenarios.bags import (
    BINARY,
    NEW_CLASSES,
    SETTINGS,
    Bags,
    MILStream,
    mil_scenario,
    task_class_ids,
)
from clbench.scenarios.base import Scenario

from clbench.checks import check_choice, check_positive
from clbench.errors import ClbenchError, ConfigError, first_line

#: the h5 dataset holding a slide's patch labels (CoMEL's name), (N,) 0/1
INSTANCE_LABELS = "patch_labels"
#: slide file suffixes a label CSV's slide_id may carry (the feature files have none)
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".bif", ".czi")
SPLITS = ("train", "val", "test")


@dataclass
class ClamTask:
    """One task: a CLAM features folder, its label CSV and split files, its classes.

    Relative paths are under ``scenario.root``; ``labels_csv`` "" is
    ``<features_dir>/labels.csv``, ``splits_dir`` "" is ``<features_dir>/splits``.
    """

    name: str = ""
    features_dir: str = ""  # holds h5_files/ and/or pt_files/
    labels_csv: str = ""  # case_id,slide_id,label
    splits_dir: str = ""  # holds splits_<fold>.csv
    classes: list[str] = field(default_factory=list)  # class names, in order
    ignore: list[str] = field(default_factory=list)  # labels whose slides are left out


@dataclass
class ClamLayoutConfig:
    """What every CLAM-layout scenario has (see the module docstring)."""

    root: str = ""  # the base of relative paths
    tasks: list[ClamTask] = field(default_factory=list)
    fold: int = 0  # k of splits_<k>.csv
    use_val: bool = True  # the val column: validation bags (false: left out)
    feature_dim: int = 1024  # D of the instance features (CLAM's ResNet-50: 1024)
    num_workers: int = 4  # processes reading bag files (0: in the main process)

    @property
    def mil_setting(self) -> str:
        raise NotImplementedError

    def __post_init__(self) -> None:
        check_positive("scenario.fold", self.fold, allow_zero=True)
        check_positive("scenario.feature_dim", self.feature_dim)
        check_positive("scenario.num_workers", self.num_workers, allow_zero=True)
        if not self.tasks:
            raise ConfigError(
                "scenario.tasks is empty; list at least one task (name, features_dir, classes)"
            )
        names = [t.name for t in self.tasks]
        for i, task in enumerate(self.tasks):
            key = f"scenario.tasks[{i}]"
            if not task.name:
                raise ConfigError(f"{key}.name is empty; give every task a name")
            if names.count(task.name) > 1:
                raise ConfigError(f"task name {task.name!r} is used twice in scenario.tasks")
            if not task.features_dir:
                raise ConfigError(
                    f"{key}.features_dir is empty; set it to the folder holding h5_files/ "
                    "and/or pt_files/"
                )
            classes = list(task.classes)
            if not classes or len(set(classes)) != len(classes):
                raise ConfigError(
                    f"invalid value for {key}.classes: {classes}; list the task's class names "
                    "once each, in order"
                )
            if self.mil_setting == BINARY and len(classes) != 2:
                raise ConfigError(
                    f"invalid value for {key}.classes: {classes}; the binary setting needs "
                    "two classes: [negative, positive] (e.g. [normal, tumor])"
                )
            both = sorted(set(classes) & set(task.ignore))
            if both:
                raise ConfigError(f"{key} lists {both} both in classes and in ignore")


@dataclass
class ClamBagsConfig(ClamLayoutConfig):
    name: str = "clam_bags"
    setting: str = "new_classes"  # new_classes | binary

    @property
    def mil_setting(self) -> str:
        return self.setting

    def __post_init__(self) -> None:
        check_choice("scenario.setting", self.setting, SETTINGS)
        super().__post_init__()


def _tcga_tasks() -> list[ClamTask]:
    """ConSlide's four TCGA tasks: its class names, order and left-out subtypes."""
    return [
        ClamTask(
            name="ESCA",
            features_dir="TCGA-ESCA",
            classes=["Adenocarcinoma", "Squamous cell carcinoma"],
            ignore=["Tubular adenocarcinoma", "Basaloid squamous cell carcinoma"],
        ),
        ClamTask(name="RCC", features_dir="TCGA-RCC", classes=["CCRCC", "PRCC"], ignore=["CHRCC"]),
        ClamTask(
            name="BRCA",
            features_dir="TCGA-BRCA",
            classes=["IDC", "ILC"],
            ignore=["MDLC", "PD", "ACBC", "IMMC", "BRCNOS", "BRCA", "SPC", "MBC", "MPT"],
        ),
        ClamTask(name="NSCLC", features_dir="TCGA-NSCLC", classes=["LUAD", "LUSC"]),
    ]


@dataclass
class TcgaConslideConfig(ClamLayoutConfig):
    name: str = "tcga_conslide"
    tasks: list[ClamTask] = field(default_factory=_tcga_tasks)

    @property
    def mil_setting(self) -> str:
        return NEW_CLASSES

    def __post_init__(self) -> None:
        _require_root(self.root, "tcga_conslide", "TCGA-ESCA")
        super().__post_init__()


def _comel_tasks() -> list[ClamTask]:
    """CoMEL's five cohorts in its order, in its folders (cm16/mixed, paip/<organ>)."""
    cohorts = [("CAMELYON16", "cm16/mixed")] + [
        (f"PAIP-{organ}", f"paip/{organ}") for organ in ("HCC", "prostate", "HBP", "colon")
    ]
    return [ClamTask(name=n, features_dir=d, classes=["normal", "tumor"]) for n, d in cohorts]


@dataclass
class ComelOrgansConfig(ClamLayoutConfig):
    name: str = "comel_organs"
    tasks: list[ClamTask] = field(default_factory=_comel_tasks)

    @property
    def mil_setting(self) -> str:
        return BINARY

    def __post_init__(self) -> None:
        _require_root(self.root, "comel_organs", "cm16/mixed")
        super().__post_init__()


def _require_root(root: str, scenario: str, example: str) -> None:
    if not root:
        raise ConfigError(
            f"scenario {scenario} needs its data: set scenario.root=DIR (one CLAM-layout folder "
            f"per task, e.g. DIR/{example}/h5_files/<slide_id>.h5, labels.csv, "
            "splits/splits_<fold>.csv)"
        )


# ------------------------------------------------------------------------------ files
def read_bag(path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One bag's ``(features (N, D), coords (N, 2) or None)`` from its h5 or pt file, as
    stored (the reader of file-backed :class:`Bags`; module level, so workers pickle it)."""
    try:
        if path.endswith(".h5"):
            with h5py.File(path, "r") as f:
                x = torch.from_numpy(np.asarray(f["features"][()]))
                c = torch.from_numpy(np.asarray(f["coords"][()])) if "coords" in f else None
            return x, c
        x = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # deleted, truncated, not an h5 / torch file
        raise ClbenchError(
            f"cannot read bag {path} ({type(e).__name__}: {first_line(e)}); rerun CLAM's "
            "extract_features_fp.py for this slide"
        ) from None
    if not isinstance(x, torch.Tensor):
        raise ClbenchError(f"{path} holds a {type(x).__name__}, not a tensor (N, D) of features")
    return x, None


def _feature_file(features: Path, slide: str) -> Path | None:
    """The slide's h5 file (preferred) or pt file; None if neither exists."""
    stems = [slide]
    if slide.lower().endswith(SLIDE_SUFFIXES):
        stems.append(slide.rsplit(".", 1)[0])
    for stem in stems:
        for sub, suffix in (("h5_files", ".h5"), ("pt_files", ".pt")):
            path = features / sub / f"{stem}{suffix}"
            if path.is_file():
                return path
    return None


def _inspect(path: Path, feature_dim: int) -> torch.Tensor | None:
    """Check one bag file (2-D features of ``feature_dim``, coords (N, 2), patch labels
    (N,) 0/1); returns its instance labels (h5 ``patch_labels``) or None."""
    labels = None
    try:
        if path.suffix == ".h5":
            with h5py.File(path, "r") as f:
                if "features" not in f:
                    raise ClbenchError(
                        f"{path} has no dataset 'features' (a patch-coordinates file?); point "
                        "features_dir at the output of CLAM's extract_features_fp.py"
                    )
                shape = tuple(f["features"].shape)
                coords = tuple(f["coords"].shape) if "coords" in f else None
                if INSTANCE_LABELS in f:
                    labels = torch.from_numpy(np.asarray(f[INSTANCE_LABELS][()])).long()
        else:
            x = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            if not isinstance(x, torch.Tensor):
                raise ClbenchError(
                    f"{path} holds a {type(x).__name__}, not a tensor (N, D) of features"
                )
            shape, coords = tuple(x.shape), None
    except ClbenchError:
        raise
    except Exception as e:
        raise ClbenchError(
            f"cannot read bag {path} ({type(e).__name__}: {first_line(e)}); rerun CLAM's "
            "extract_features_fp.py for this slide"
        ) from None
    if len(shape) != 2 or shape[0] == 0:
        raise ClbenchError(f"features in {path} have shape {shape}; expected N x D with N > 0")
    n, d = shape
    if d != feature_dim:
        raise ConfigError(
            f"features in {path} have D={d} but scenario.feature_dim={feature_dim}; set "
            f"scenario.feature_dim={d}"
        )
    if coords is not None and coords != (n, 2):
        raise ClbenchError(f"coords in {path} have shape {coords}; expected ({n}, 2)")
    if labels is not None and (
        tuple(labels.shape) != (n,) or not bool(((labels == 0) | (labels == 1)).all())
    ):
        raise ClbenchError(
            f"{INSTANCE_LABELS} in {path} must be ({n},) of 0/1 (one per patch); got shape "
            f"{tuple(labels.shape)}, values {sorted(set(labels.unique().tolist()))[:5]}"
        )
    return labels


def _rows(path: Path, what: str, fix: str) -> tuple[list[str], list[dict[str, str]]]:
    """A CSV's header and rows (cells stripped)."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}; {fix}")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [{k: (v or "").strip() for k, v in r.items() if k is not None} for r in reader]
            header = [h.strip() for h in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ClbenchError(f"cannot read {what} {path} ({first_line(e)})") from None
    return header, [{k.strip(): v for k, v in r.items()} for r in rows]


def read_labels(path: Path, task: ClamTask) -> tuple[dict[str, str], set[str]]:
    """A label CSV's slide_id -> label, without the slides of the task's ignored labels,
    and the ids of those."""
    fix = "set the task's labels_csv (columns case_id,slide_id,label)"
    header, rows = _rows(path, "label CSV", fix)
    for column in ("slide_id", "label"):
        if column not in header:
            raise ClbenchError(
                f"label CSV {path} has no column {column!r} (columns: {', '.join(header)}); "
                "expected case_id,slide_id,label"
            )
    labels: dict[str, str] = {}
    ignored: set[str] = set()
    for line, row in enumerate(rows, 2):
        slide, label = row["slide_id"], row["label"]
        if not slide:
            continue
        if slide in labels or slide in ignored:
            raise ClbenchError(f"label CSV {path} lists slide {slide!r} twice (line {line})")
        if label in task.ignore:
            ignored.add(slide)
            continue
        if label not in task.classes:
            raise ConfigError(
                f"label CSV {path} line {line}: label {label!r} of slide {slide!r} is not a "
                f"class of task {task.name!r} ({', '.join(task.classes)}); add it to the task's "
                "classes or ignore"
            )
        labels[slide] = label
    return labels, ignored


def read_splits(path: Path) -> dict[str, list[str]]:
    """The slide ids of each column (train, val, test) of a CLAM splits file, in order."""
    header, rows = _rows(
        path, "splits file", "write CLAM's splits_<k>.csv (create_splits_seq.py) or set "
        "scenario.fold / the task's splits_dir",
    )  # fmt: skip
    for column in ("train", "test"):
        if column not in header:
            raise ClbenchError(
                f"splits file {path} has no column {column!r} (columns: {', '.join(header)}); "
                "expected CLAM's columns train,val,test"
            )
    return {s: [r[s] for r in rows if r.get(s)] for s in SPLITS}


# ----------------------------------------------------------------------------- building
def _path(root: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else root / p


def _task_bags(task: ClamTask, root: Path, offset: int, cfg: ClamLayoutConfig) -> dict[str, Bags]:
    """A task's Bags per split column; labels are ``offset`` + the class's index."""
    features = _path(root, task.features_dir)
    if not features.is_dir():
        raise ConfigError(
            f"missing features folder {features} of task {task.name!r}; set its features_dir "
            "(a folder with h5_files/ and/or pt_files/) or scenario.root"
        )
    labels_csv = _path(root, task.labels_csv) if task.labels_csv else features / "labels.csv"
    splits_dir = _path(root, task.splits_dir) if task.splits_dir else features / "splits"
    labels, ignored = read_labels(labels_csv, task)
    splits_file = splits_dir / f"splits_{cfg.fold}.csv"
    if not splits_file.is_file():
        have = sorted(p.name for p in splits_dir.glob("splits_*.csv"))
        raise ConfigError(
            f"splits file not found: {splits_file} (scenario.fold={cfg.fold}); "
            + (f"found {', '.join(have)}" if have else "write CLAM's splits_<k>.csv there")
            + " or set the task's splits_dir"
        )
    splits = read_splits(splits_file)
    seen: dict[str, str] = {}
    out: dict[str, Bags] = {}
    for split in SPLITS:
        paths, targets, names, inst = [], [], [], []
        for slide in splits[split]:
            if slide in seen:
                raise ClbenchError(
                    f"slide {slide!r} is listed twice in {splits_file} ({seen[slide]}, {split}); "
                    "a slide belongs to one split, once"
                )
            seen[slide] = split
            if slide in ignored:
                continue  # a class the task ignores (ConSlide drops such slides)
            if slide not in labels:
                raise ConfigError(
                    f"slide {slide!r} ({split} of {splits_file}) has no row in {labels_csv}; add "
                    "its label or remove it from the split"
                )
            file = _feature_file(features, slide)
            if file is None:
                raise ConfigError(
                    f"slide {slide!r} ({split} of {splits_file}) has no features: neither "
                    f"{features / 'h5_files' / (slide + '.h5')} nor "
                    f"{features / 'pt_files' / (slide + '.pt')} exists; extract its features "
                    "(CLAM's extract_features_fp.py) or remove it from the split"
                )
            inst.append(_inspect(file, cfg.feature_dim))
            paths.append(str(file))
            targets.append(offset + task.classes.index(labels[slide]))
            names.append(slide)
        out[split] = Bags(paths, targets, names=names, instance_labels=inst, reader=read_bag)
    return out


def _class_names(cfg: ClamLayoutConfig, setting: str) -> list[str]:
    """The head's class names: every task's in order (``task:class`` where two tasks share
    a name), or the binary pair (the tasks' own names if they all agree)."""
    if setting == BINARY:
        pairs = {tuple(t.classes) for t in cfg.tasks}
        return list(pairs.pop()) if len(pairs) == 1 else ["negative", "positive"]
    flat = [c for t in cfg.tasks for c in t.classes]
    return [c if flat.count(c) == 1 else f"{t.name}:{c}" for t in cfg.tasks for c in t.classes]


def clam_scenario(name: str, cfg: ClamLayoutConfig, setting: str) -> Scenario:
    """The ``mil`` scenario of a CLAM-layout config (see the module docstring)."""
    root = Path(cfg.root).expanduser() if cfg.root else Path.cwd()
    if not root.is_dir():
        raise ConfigError(f"scenario root not found: {root}; set scenario.root=DIR")
    per_task, task_classes, offset = [], [], 0
    for task in cfg.tasks:
        classes = task_class_ids(setting, offset, len(task.classes))
        per_task.append(_task_bags(task, root, classes[0], cfg))
        task_classes.append(classes)
        offset += len(classes)
    stream = MILStream(
        setting=setting,
        task_names=tuple(t.name for t in cfg.tasks),
        task_classes=tuple(task_classes),
        train=tuple(b["train"] for b in per_task),
        test=tuple(b["test"] for b in per_task),
        val=tuple(b["val"] for b in per_task) if cfg.use_val else None,
        loader_workers=cfg.num_workers,
    )
    return mil_scenario(name, stream, _class_names(cfg, setting), cfg.feature_dim)


def clam_bags(cfg: ClamBagsConfig) -> Scenario:
    """Continual MIL over CLAM-layout feature folders listed in the config."""
    label = "-".join(re.sub(r"[^A-Za-z0-9._]+", "_", t.name).strip("_") for t in cfg.tasks)
    return clam_scenario(f"clam_bags_{label}", cfg, cfg.setting)


def tcga_conslide(cfg: TcgaConslideConfig) -> Scenario:
    """ConSlide's class-incremental TCGA sequence (ESCA, RCC, BRCA, NSCLC x 2 subtypes)."""
    return clam_scenario("tcga_conslide", cfg, cfg.mil_setting)


def comel_organs(cfg: ComelOrgansConfig) -> Scenario:
    """CoMEL's normal-vs-tumour sequence over CAMELYON16 and four PAIP organs."""
    return clam_scenario("comel_organs", cfg, cfg.mil_setting)


clam_bags.Config = ClamBagsConfig  # type: ignore[attr-defined]
tcga_conslide.Config = TcgaConslideConfig  # type: ignore[attr-defined]
comel_organs.Config = ComelOrgansConfig  # type: ignore[attr-defined]
