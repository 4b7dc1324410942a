"""The paper configurations on ImageNet-R (conf/experiment/*_imagenet_r.yaml): each composes
with the papers' settings intact and runs, shrunk, on an ImageNet-R fixture in its released
folder layout (split 80/20 from the seed)."""

from __future__ import annotations

from pathlib import Path

import pytest
from experiment_runs import check_composes, check_smoke_run, names
from test_image_scenarios import write_imagenet_r

NAMES = names("imagenet_r")
N_CLASSES = 4


@pytest.fixture(scope="module")
def imagenet_r_root(tmp_path_factory) -> Path:
    """ROOT/imagenet-r/<wnid>/<image>: 4 classes of 6 images."""
    return write_imagenet_r(tmp_path_factory.mktemp("imagenet_r"), n_classes=N_CLASSES)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("experiment_runs")


@pytest.mark.parametrize("name", NAMES)
def test_composes_with_the_paper_settings(name, imagenet_r_root):
    check_composes(name, imagenet_r_root)


@pytest.mark.parametrize("name", NAMES)
def test_runs_on_a_fixture(name, imagenet_r_root, runs_dir):
    check_smoke_run(name, imagenet_r_root, N_CLASSES, runs_dir)
