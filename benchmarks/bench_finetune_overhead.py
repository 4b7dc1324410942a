"""Framework overhead: `finetune` training on one experience vs a hand-written PyTorch loop.

Both train the same micro ViT (same initial weights) with Adam on the same samples in
the same shuffled order for the same number of epochs. Runs are interleaved
(ABAB..., alternating which goes first) so machine drift hits both alike; the
reported figure is the median of the per-pair time ratios clbench / hand-written.

    python benchmarks/bench_finetune_overhead.py [--repeats 15] [--epochs 20]
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from clbench.backbones.micro_vit import build_micro_vit
from clbench.data import materialise
from clbench.models import ClassifierModel
from clbench.progress import ProgressPlugin, StepCounter
from clbench.registry import SCENARIOS, STRATEGIES
from clbench.seeding import derived_generator


def clbench_run(model: ClassifierModel, experience, epochs: int, batch: int, lr: float) -> float:
    cls = STRATEGIES.get("finetune")
    cfg = cls.Config(name="finetune", epochs=epochs, batch_size=batch, lr=lr, optimizer="adam")
    # the plugins `clbench run` attaches (progress bars off: console output is not timed)
    plugins = [StepCounter(), ProgressPlugin(1, enabled=False)]
    strategy = cls(model=model, cfg=cfg, seed=0, plugins=plugins)
    t0 = time.perf_counter()
    strategy.train(experience, eval_streams=[])
    return time.perf_counter() - t0


def hand_run(model: ClassifierModel, experience, epochs: int, batch: int, lr: float) -> float:
    t0 = time.perf_counter()
    x, y, _ = materialise(experience.dataset)
    n_classes = int(y.max()) + 1
    model.head.grow(n_classes)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    gen = derived_generator(0, int(experience.current_experience))
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        xs, ys = x[order], y[order]
        for i in range(0, len(ys), batch):
            opt.zero_grad()
            loss = F.cross_entropy(model(xs[i : i + batch]), ys[i : i + batch])
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()

    build = SCENARIOS.get("split_digits")
    experience = build(build.Config()).train_stream[0]
    torch.manual_seed(0)
    vit = build_micro_vit()
    template = ClassifierModel(vit, vit.num_features)
    runners = {"clbench": clbench_run, "hand": hand_run}
    # warm-up (allocator, lazy imports)
    for fn in runners.values():
        fn(copy.deepcopy(template), experience, 1, args.batch_size, args.lr)

    times: dict[str, list[float]] = {"clbench": [], "hand": []}
    ratios = []
    for r in range(args.repeats):
        order = ["clbench", "hand"] if r % 2 == 0 else ["hand", "clbench"]
        pair = {}
        for name in order:
            pair[name] = runners[name](
                copy.deepcopy(template), experience, args.epochs, args.batch_size, args.lr
            )
            times[name].append(pair[name])
        ratios.append(pair["clbench"] / pair["hand"])

    n_samples = len(experience.dataset)
    steps = args.epochs * -(-n_samples // args.batch_size)
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}"
    )
    print(
        f"work: {n_samples} samples x {args.epochs} epochs, batch {args.batch_size} "
        f"= {steps} steps per run, {args.repeats} interleaved pairs"
    )
    for name, ts in times.items():
        print(
            f"{name:>8}: median {statistics.median(ts):.3f} s  "
            f"(min {min(ts):.3f}, max {max(ts):.3f})"
        )
    print("ratios: " + " ".join(f"{x:.3f}" for x in ratios))
    best = min(times["clbench"]) / min(times["hand"])
    print(f"best-time ratio clbench / hand-written: {best:.3f}")
    print(f"median ratio clbench / hand-written: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
