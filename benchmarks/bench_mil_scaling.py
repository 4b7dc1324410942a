"""Time and memory of one training step of the MIL aggregators as the bag grows (CPU).

    OMP_NUM_THREADS=1 python benchmarks/bench_mil_scaling.py [--sizes 1000 10000 50000]
        [--models abmil transmil gdat] [--dim 1024] [--repeats 3]

For each aggregator and bag size ``N``: one forward + backward of the classifier the MIL
strategies train (``ClassifierModel(aggregator, 512)``, a 2-class head, cross-entropy,
train mode) on a random bag ``(1, N, dim)``, in a fresh subprocess with one thread.

- ``tokens``: the sequence length the model runs on: TransMIL pads to a square (plus
  CLS), GDAT to a grid whose side is a multiple of 16 (Nystrom attention pads further to a
  multiple of its 256 landmarks, with zeros that cost only the attention).
- ``s/bag``: median wall time of ``--repeats`` steps after one warm-up step; ``cpu s``:
  their median process CPU time, less disturbed by other load on a shared machine.
- ``GFLOP``: the step's floating-point operations (``torch.utils.flop_counter``: matrix
  products and convolutions), counted in one more step; independent of the load.
- ``peak MiB``: the process's peak resident memory (``getrusage`` ``ru_maxrss``, the
  kernel's high-water mark, so no sampling) minus its resident memory just before the
  first step (model and bag built): what a step adds, autograd's saved tensors included.

The ratios at the end compare consecutive sizes: CPU time, FLOP and peak memory. From 10k
to 50k instances a linear model's ratios are about 5, a quadratic one's about 25.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import psutil
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

MODELS = ("abmil", "transmil", "gdat")
SIZES = (1_000, 10_000, 50_000)


def step_once(model: torch.nn.Module, bag: torch.Tensor, label: torch.Tensor) -> list[float]:
    """Wall and CPU seconds of one forward + backward (gradients dropped afterwards)."""
    wall, cpu = time.perf_counter(), time.process_time()
    F.cross_entropy(model(bag), label).backward()
    elapsed = [time.perf_counter() - wall, time.process_time() - cpu]
    model.zero_grad(set_to_none=True)
    return elapsed


def tokens(name: str, n: int) -> int:
    """The sequence length ``name`` runs on for a bag of ``n`` instances."""
    from clbench.backbones.mil import agent_grid

    if name == "transmil":
        return math.ceil(math.sqrt(n)) ** 2 + 1
    if name == "gdat":
        return agent_grid(n, 16)[0] ** 2
    return n


def child(name: str, n: int, dim: int, repeats: int) -> dict[str, float]:
    """One (model, size) measurement, in this (fresh) process."""
    from clbench.models import ClassifierModel
    from clbench.registry import BACKBONES

    torch.set_num_threads(1)
    torch.manual_seed(0)
    build = BACKBONES.get(name)
    backbone = build(build.Config(in_dim=dim))
    model = ClassifierModel(backbone.module, backbone.feature_dim)
    model.head.grow(2)
    model.train()
    bag, label = torch.randn(1, n, dim), torch.tensor([1])
    rss_before = psutil.Process().memory_info().rss
    step_once(model, bag, label)  # warm-up
    times = [step_once(model, bag, label) for _ in range(repeats)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    with FlopCounterMode(display=False) as counter:
        step_once(model, bag, label)
    return {
        "seconds": statistics.median(t[0] for t in times),
        "cpu_seconds": statistics.median(t[1] for t in times),
        "peak_mib": (peak - rss_before) / 2**20,
        "params": sum(p.numel() for p in model.parameters()),
        "gflop": counter.get_total_flops() / 1e9,
    }


def measure(name: str, n: int, dim: int, repeats: int) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--child", name, str(n), "--dim", str(dim)]
    cmd += ["--repeats", str(repeats)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{name} at N={n} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(args.child[0], int(args.child[1]), args.dim, args.repeats)
        print(json.dumps(result))
        return

    sizes = sorted(args.sizes)
    print(
        f"one forward+backward per bag, D={args.dim}, 1 thread, median of {args.repeats}; "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{psutil.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}"
    )
    print("| model | N | tokens | s/bag | cpu s | GFLOP | peak MiB | params |")
    print("|---|---|---|---|---|---|---|---|")
    results: dict[str, dict[int, dict[str, float]]] = {}
    for name in args.models:
        for n in sizes:
            r = results.setdefault(name, {})[n] = measure(name, n, args.dim, args.repeats)
            print(
                f"| {name} | {n:,} | {tokens(name, n):,} | {r['seconds']:.3f} | "
                f"{r['cpu_seconds']:.3f} | {r['gflop']:.1f} | {r['peak_mib']:.0f} | "
                f"{int(r['params']):,} |",
                flush=True,
            )
    print()
    print("growth from one size to the next: CPU time, FLOP, peak memory ratios [N ratio]")
    for name, by_size in results.items():
        parts = []
        for small, large in itertools.pairwise(sizes):
            a, b = by_size[small], by_size[large]
            t = b["cpu_seconds"] / a["cpu_seconds"]
            f = b["gflop"] / a["gflop"]
            m = b["peak_mib"] / max(a["peak_mib"], 1e-9)
            parts.append(f"{large:,}/{small:,}: {t:.1f}, {f:.1f}, {m:.1f} [{large / small:g}]")
        print(f"{name}: " + "; ".join(parts))


if __name__ == "__main__":
    main()
