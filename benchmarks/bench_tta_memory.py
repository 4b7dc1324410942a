"""Memory of one test-time adaptation step on the CIFAR WideResNet-28-10, batch 200.

    python benchmarks/bench_tta_memory.py [--batch 200] [--depth 28] [--widen 10]

For each strategy, one ``adapt`` on a batch of random 32x32 images (random weights: the
byte counts do not depend on the values): the bytes autograd keeps for backward
(counted by a saved-tensor hook, weights excluded; the same on any device), the
strategy's state (weights, teacher, anchor, optimizer state, source copies, Fisher)
and the step's wall time on this CPU. CoTTA's augmentation passes run without a graph,
so they are skipped (``anchor_threshold=0``); EATA and EcoTTA keep every sample.
"""

from __future__ import annotations

import argparse
import time

import torch
from clbench.scenarios.base import LabelledTensors
from torch import nn

from clbench.adapters.tta import SavedTensorMeter, state_bytes
from clbench.backbones.wideresnet import WideResNet
from clbench.models import ClassifierModel
from clbench.protocols.tta import DomainStream
from clbench.registry import STRATEGIES

SETTINGS = {
    "source": {},
    "bn_adapt": {},
    "tent": {},
    "eata": {"fisher_alpha": 0.0, "e_margin": 10.0, "d_margin": 1.0},
    "cotta": {"anchor_threshold": 0.0},
    "psmt": {"fisher_alpha": 0.0},
    "ecotta": {"warmup_epochs": 0, "e_margin": 10.0},
    "ecotta (frozen_bn=batch)": {"warmup_epochs": 0, "e_margin": 10.0, "frozen_bn": "batch"},
}


def model(depth: int, widen: int) -> ClassifierModel:
    torch.manual_seed(0)
    wrn = WideResNet(depth, widen, 10)
    wrn.fc = nn.Identity()
    m = ClassifierModel(wrn, wrn.num_features)
    m.head.grow(10)
    return m.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--depth", type=int, default=28)
    ap.add_argument("--widen", type=int, default=10)
    args = ap.parse_args()
    x = torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    source = LabelledTensors(x[:8], torch.zeros(8, dtype=torch.long))
    print(f"WRN-{args.depth}-{args.widen}, batch {args.batch}, torch {torch.__version__}")
    print("| strategy | backward cache MiB | state MiB | trainable params | step s |")
    print("|---|---|---|---|---|")
    for label, overrides in SETTINGS.items():
        name = label.split()[0]
        cls = STRATEGIES.get(name)
        st = cls(
            model=model(args.depth, args.widen),
            cfg=cls.Config(name=name, **overrides),
            seed=0,
            stream=DomainStream(domains=(), batch_size=args.batch, value_range=(0.0, 1.0)),
        )
        st.setup(source)
        st.reset()
        meter = SavedTensorMeter(*st.modules())
        start = time.perf_counter()
        with meter.measure():
            st.adapt(x)
        seconds = time.perf_counter() - start
        state = state_bytes(*st.modules(), *st.state_tensors())
        print(
            f"| {label} | {meter.peak / 2**20:.0f} | {state / 2**20:.0f} | "
            f"{st.num_trainable_parameters():,} | {seconds:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
