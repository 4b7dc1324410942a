"""The CIFAR WideResNet of the test-time-adaptation benchmarks (WRN-28-10).

The architecture of RobustBench's ``WideResNet`` (after TRADES): pre-activation basic
blocks ``bn1 -> relu1 -> conv1 -> bn2 -> relu2 -> conv2`` with a 1x1 ``convShortcut``
where the width changes, three ``NetworkBlock`` stages (``block1..3.layer.i``), a final
``bn1``/``relu``, 8x8 average pooling and ``fc``. Module names match, so the state dict
of RobustBench's CIFAR-10 "Standard" model (the source model of Tent, CoTTA, EATA...)
loads with ``strict=True`` from a local file (:func:`load_robustbench_state`). Nothing
here downloads.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clbench.backbones.base import Backbone, torch_load_failure, unwrap_state_dict
from clbench.errors import ClbenchError


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equal_in_out
            else nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(pre)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(pre)
        return shortcut + out


class NetworkBlock(nn.Module):
    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float):
        super().__init__()
        self.layer = nn.Sequential(
            *(
                BasicBlock(
                    in_planes if i == 0 else out_planes,
                    out_planes,
                    stride if i == 0 else 1,
                    drop_rate,
                )
                for i in range(n)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-widen for 32x32 inputs; ``forward_features`` gives the pooled features."""

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        drop_rate: float = 0.0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(widths[3], num_classes)
        self.num_features = widths[3]
        for m in self.modules():  # the reference initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


def load_robustbench_state(model: WideResNet, path: str | Path) -> None:
    """Load a local RobustBench-style checkpoint into ``model`` (strict).

    Accepts a plain state dict or ``{"state_dict": ...}`` / ``{"model": ...}``, with or
    without DataParallel's ``module.`` prefix. Tensors only (``weights_only=True``).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ClbenchError(
            f"missing WideResNet checkpoint {path} (a local file; nothing is downloaded)"
        )
    try:  # weights_only: the unpickler builds tensors and containers, never calls code
        with warnings.catch_warnings():  # its notes on pickle protocols: one error line only
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or a pickle of anything but tensors
        raise ClbenchError(
            f"cannot read WideResNet checkpoint {path}: {torch_load_failure(e)}; expected a state "
            "dict saved with torch.save"
        ) from None
    weights = unwrap_state_dict(state)
    if weights is None:
        raise ClbenchError(
            f"{path} is not a WideResNet state dict (it holds {_describe(state)}); expected a "
            "mapping of parameter names to tensors, or {'state_dict': ...} / {'model': ...}"
        )
    state = weights
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise ClbenchError(
            f"{path} does not fit WideResNet-{len(model.block1.layer) * 6 + 4}: {detail}"
        ) from None
    if missing or unexpected:
        raise ClbenchError(
            f"{path} does not fit WideResNet-{len(model.block1.layer) * 6 + 4}: "
            f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )


def _describe(value: object) -> str:
    if isinstance(value, dict):
        kinds = sorted({type(v).__name__ for v in value.values()})
        return f"a dict of {', '.join(kinds) or 'nothing'}"
    return f"a {type(value).__name__}"


@dataclass
class WideResNetConfig:
    name: str = "wideresnet"
    depth: int = 28
    widen_factor: int = 10
    in_chans: int = 3
    img_size: int = 32  # the input size it is used at (any size >= 8 works)
    num_classes: int = 10  # of the checkpoint's classifier
    # a local RobustBench-style state dict (e.g. RobustBench's CIFAR-10 "Standard.pt"):
    # the backbone is then a ready source classifier; empty = random initialisation (a
    # source model is trained on the scenario's source data, clbench.pretrain.source)
    checkpoint: str = ""
    init_seed: int = 0  # the random initialisation

    def __post_init__(self) -> None:
        if (self.depth - 4) % 6 or self.depth < 10:
            raise ClbenchError(
                f"invalid value for backbone.depth: {self.depth}; "
                "must be 6n + 4 (10, 16, 22, 28...)"
            )


def wideresnet(cfg: WideResNetConfig) -> Backbone:
    """CIFAR WideResNet with BatchNorm (RobustBench names); a local checkpoint or random init."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = WideResNet(cfg.depth, cfg.widen_factor, cfg.num_classes, in_chans=cfg.in_chans)
    head = None
    if cfg.checkpoint:
        load_robustbench_state(model, cfg.checkpoint)
        head = model.fc  # the checkpoint classifies: it is the source model
        source = str(Path(cfg.checkpoint).expanduser())
    else:
        source = f"random-init(seed={cfg.init_seed})"
    model.fc = nn.Identity()  # the backbone returns pooled features
    return Backbone(
        name=f"wrn_{cfg.depth}_{cfg.widen_factor}",
        module=model.eval(),
        feature_dim=model.num_features,
        input_shape=(cfg.in_chans, cfg.img_size, cfg.img_size),
        source=source,
        input_shapes=((cfg.in_chans, None, None),),
        stem="conv1",
        head=head,
    )


wideresnet.Config = WideResNetConfig  # type: ignore[attr-defined]
