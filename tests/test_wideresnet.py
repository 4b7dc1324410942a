"""WRN-28-10: RobustBench's module names and size; strict loading from a local file."""

from __future__ import annotations

import pytest
import torch

from clbench.backbones.wideresnet import WideResNet, load_robustbench_state
from clbench.errors import ClbenchError


@pytest.fixture(scope="module")
def wrn():
    torch.manual_seed(0)
    return WideResNet(depth=28, widen_factor=10, num_classes=10).eval()


def test_size_and_names_are_robustbench_standard(wrn):
    assert sum(p.numel() for p in wrn.parameters()) == 36_479_194  # WRN-28-10, 10 classes
    keys = set(wrn.state_dict())
    for key in (
        "conv1.weight",
        "block1.layer.0.bn1.running_mean",
        "block1.layer.0.convShortcut.weight",
        "block2.layer.0.convShortcut.weight",
        "block3.layer.3.conv2.weight",
        "block3.layer.3.bn2.num_batches_tracked",
        "bn1.running_var",
        "fc.weight",
        "fc.bias",
    ):
        assert key in keys, key
    assert "block1.layer.1.convShortcut.weight" not in keys  # only where the width changes
    assert not any(k.startswith("sub_block1") for k in keys)  # "Standard" has no sub-block
    assert len([k for k in keys if ".layer." in k and k.endswith("conv1.weight")]) == 12


def test_forward_shapes(wrn):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert wrn(x).shape == (2, 10)
        assert wrn.forward_features(x).shape == (2, 640)


def test_loads_a_robustbench_style_file_strictly(tmp_path, wrn):
    torch.manual_seed(1)
    other = WideResNet(depth=28, widen_factor=10)
    state = {f"module.{k}": v for k, v in other.state_dict().items()}  # DataParallel names
    path = tmp_path / "Standard.pt"
    torch.save({"state_dict": state}, path)
    target = WideResNet(depth=28, widen_factor=10)
    load_robustbench_state(target, path)
    for k, v in other.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    bad = tmp_path / "bad.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(ClbenchError, match="does not fit WideResNet-28"):
        load_robustbench_state(target, bad)
    torch.save({"conv1.weight": torch.zeros(16, 3, 3, 3)}, bad)  # right shape, keys missing
    with pytest.raises(ClbenchError, match="missing \\['block1"):
        load_robustbench_state(target, bad)
    with pytest.raises(ClbenchError, match="missing WideResNet checkpoint"):
        load_robustbench_state(target, tmp_path / "absent.pt")
