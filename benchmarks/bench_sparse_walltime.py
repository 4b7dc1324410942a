"""Wall time of masked (sparse) training against dense training on this CPU.

    OMP_NUM_THREADS=1 python benchmarks/bench_sparse_walltime.py [--threads 1,2] [--repeats 11]

The sparse methods (strategies/dst.py, strategies/sparcl.py) train a dense weight times a
0/1 mask (:class:`clbench.adapters.sparse.MaskedLayer`): the matmul is still a dense one,
so a lower density lowers the counted FLOPs (:mod:`clbench.flops`) but not the work the
CPU does. Measured here at each thread count (``torch.set_num_threads``):

(a) one training step (forward, backward, SGD step with momentum) of WRN-16-2 on 16x16
    grey images, batch 64, dense and with every convolution and the classifier masked at
    uniform density 0.2 and 0.05;
(b) the same for one Linear 1024x1024 at batch 256 (a regression loss);
(c) the forward of that Linear at batch 256: dense, masked (``weight * mask``, then the
    dense matmul) and with the weight as a ``torch.sparse`` tensor (CSR and COO) holding
    only the non-zeros, the one way here to skip the zeros.

The variants of one group are timed in turn, round after round (``--repeats`` rounds
after one warm-up), so that a background load hits them alike. The table gives the
median and the minimum wall time over rounds, the median CPU time of the process (all
its threads: less sensitive to other processes sharing the cores, but it includes the
threads' spin-waiting), each variant's time against dense (the median over rounds of the
ratio of the two times taken in the same round) and the training FLOPs counted for it
against dense (what papers report as the saving). The closing paragraphs are computed
from the measurements.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clbench.adapters.sparse import MaskSet, mask_layers, uniform_densities
from clbench.backbones.wideresnet import WideResNet
from clbench.flops import TrainingFlops

DENSITIES = (0.2, 0.05)


@dataclass
class Row:
    """One measured variant."""

    group: str
    variant: str
    times: list[float]  # wall seconds, one per round
    cpu: list[float]  # CPU seconds of the process (all its threads), one per round
    flops_vs_dense: float

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1000

    @property
    def min_ms(self) -> float:
        return min(self.times) * 1000

    @property
    def cpu_ms(self) -> float:
        return statistics.median(self.cpu) * 1000


def interleaved(
    group: str, variants: dict[str, tuple[Callable[[], object], float]], repeats: int
) -> list[Row]:
    """Time every variant once per round, ``repeats`` rounds after one warm-up round."""
    for fn, _ in variants.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (fn, _) in variants.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return [Row(group, name, times[name], cpu[name], f) for name, (_, f) in variants.items()]


def wrn() -> nn.Module:
    torch.manual_seed(0)
    return WideResNet(depth=16, widen_factor=2, num_classes=10, in_chans=1)


def linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(1024, 1024)


def masked(model: nn.Module, density: float | None) -> nn.Module:
    """``model`` with every Linear / Conv2d masked at ``density`` (None: left dense)."""
    if density is None:
        return model
    if isinstance(model, nn.Linear):
        model = nn.Sequential(model)
    masks = MaskSet(mask_layers(model), torch.Generator().manual_seed(0))
    masks.randomize(uniform_densities(masks.shapes(), density))
    masks.apply()
    return model


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    classify = y.dtype == torch.long

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out, y) if classify else F.mse_loss(out, y)
        loss.backward()
        opt.step()

    return step


def training_variants(
    make: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor
) -> dict[str, tuple[Callable[[], None], float]]:
    """Dense and masked training steps, each with its counted FLOPs against dense."""
    out = {}
    for density in (None, *DENSITIES):
        model = masked(make(), density)
        step = train_step(model, x, y)
        with TrainingFlops(model) as f:
            step()
        out["dense" if density is None else f"masked d={density}"] = (
            step,
            f.flops / f.dense_flops,
        )
    return out


def forward_variants() -> dict[str, tuple[Callable[[], torch.Tensor], float]]:
    """The Linear's forward: dense, masked, and torch.sparse CSR / COO at each density."""
    w = linear().weight.detach().clone()
    x = torch.randn(256, 1024)
    xt = x.t().contiguous()
    g = torch.Generator().manual_seed(0)
    out: dict[str, tuple[Callable[[], torch.Tensor], float]] = {
        "dense": (lambda: F.linear(x, w), 1.0)
    }
    for d in DENSITIES:
        keep = torch.rand(w.shape, generator=g) < d
        mask = keep.to(w.dtype)
        stored = w * mask
        out[f"masked d={d}"] = (lambda s=stored, m=mask: F.linear(x, s * m), d)
        for fmt, sparse in (("CSR", stored.to_sparse_csr()), ("COO", stored.to_sparse())):
            got = torch.sparse.mm(sparse, xt).t()
            assert torch.allclose(got, F.linear(x, stored), atol=1e-4)  # the same product
            out[f"torch.sparse {fmt} d={d}"] = (lambda s=sparse: torch.sparse.mm(s, xt).t(), d)
    return out


def vs_dense(rows: list[Row], group: str, variant: str, stat: str = "wall") -> float:
    """``variant`` against dense: the median over rounds of the paired ratio (both timed in
    the same round, so a load that comes and goes cancels), of wall (``wall``) or CPU
    (``cpu``) time; ``min``: fastest round against fastest round."""
    by = {(r.group, r.variant): r for r in rows}
    mine, dense = by[(group, variant)], by[(group, "dense")]
    if stat == "min":
        return mine.min_ms / dense.min_ms
    a, b = (mine.times, dense.times) if stat == "wall" else (mine.cpu, dense.cpu)
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def conclusion(results: dict[int, list[Row]], loads: dict[int, float]) -> str:
    """The paragraphs closing the output, from the measurements."""

    def word(r: float) -> str:
        return "faster" if r < 0.95 else "slower" if r > 1.05 else "about as fast"

    def span(values: list[float]) -> str:
        lo, hi = f"{min(values):.2f}x", f"{max(values):.2f}x"
        return lo if lo == hi else f"{lo} to {hi}"

    def as_dense(r: float) -> str:
        w = word(r)
        return f"{w} as dense" if w == "about as fast" else f"{w} than dense"

    parts = []
    cores = os.cpu_count() or 1
    for threads, rows in results.items():
        steps = [(g, f"masked d={d}") for g in ("WRN-16-2 step", "Linear step") for d in DENSITIES]
        med = [vs_dense(rows, g, v) for g, v in steps]
        mins = [vs_dense(rows, g, v, "min") for g, v in steps]
        cpus = [vs_dense(rows, g, v, "cpu") for g, v in steps]
        counted = [
            r.flops_vs_dense for r in rows if r.group != "Linear fwd" and r.variant != "dense"
        ]
        each = ", ".join(
            f"{g.split()[0]} d={v.split('=')[1]} {m:.2f}x"
            for (g, v), m in zip(steps, med, strict=True)
        )
        sparse = "; ".join(
            f"{fmt} d={d}: {r:.2f}x ({word(r)})"
            for d in DENSITIES
            for fmt in ("CSR", "COO")
            for r in [vs_dense(rows, "Linear fwd", f"torch.sparse {fmt} d={d}")]
        )
        masked_fwd = [vs_dense(rows, "Linear fwd", f"masked d={d}") for d in DENSITIES]
        text = (
            f"{threads} thread(s): a masked training step takes {each} the dense step's wall "
            f"time ({span(mins)} by the fastest round, {span(cpus)} in CPU time), so "
            "masked training is "
            f"{as_dense(statistics.median(med))} by wall time and "
            f"{as_dense(statistics.median(cpus))} by CPU time, although its counted training FLOPs "
            f"are {min(counted):.2f} to {max(counted):.2f} of dense (layers left dense keep "
            "them above the density where there are any). The masked "
            f"forward of the Linear takes {span(masked_fwd)} the dense one; with a torch.sparse "
            f"weight it takes {sparse}."
        )
        if loads[threads] + threads > cores:
            text += (
                f" The machine's load average was {loads[threads]:.1f} on {cores} cores during "
                "this measurement: other processes shared the cores, so the wall-time ratios "
                "carry their noise (CPU time is the steadier measure, with one thread above all)."
            )
        parts.append(text)
    parts.append(
        "Why: a MaskedLayer multiplies the stored weight by its mask and runs the same dense "
        "matmul or convolution, so every zero is still multiplied and the mask product adds "
        "elementwise work (forward and backward): its FLOP saving is on paper only, and any "
        "difference from dense here is that extra work or noise. Only a kernel that skips the "
        "zeros (a sparse matmul, here torch.sparse) turns low density into time, and on a CPU "
        "it pays off only at low enough density, since indexing each non-zero costs more than "
        "a dense BLAS kernel's streaming multiply; a sparse training step would need sparse "
        "backward kernels (input and weight gradients) too, which these layers do not have."
    )
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds per group")
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    command = ["OMP_NUM_THREADS=1", "python", "benchmarks/bench_sparse_walltime.py", *sys.argv[1:]]
    print("command:", " ".join(command))
    cpu = platform.processor() or platform.machine()
    print(f"torch {torch.__version__}, {cpu}, {os.cpu_count()} cores")
    torch.manual_seed(0)
    xw, yw = torch.randn(64, 1, 16, 16), torch.randint(0, 10, (64,))
    xl, yl = torch.randn(256, 1024), torch.randn(256, 1024)
    results: dict[int, list[Row]] = {}
    loads: dict[int, float] = {}
    for n in threads:
        torch.set_num_threads(n)
        load0 = os.getloadavg()[0]
        with torch.no_grad():
            rows = interleaved("Linear fwd", forward_variants(), args.repeats * 3)
        rows = [
            *interleaved("WRN-16-2 step", training_variants(wrn, xw, yw), args.repeats),
            *interleaved("Linear step", training_variants(linear, xl, yl), args.repeats * 2),
            *rows,
        ]
        results[n] = rows
        loads[n] = max(load0, os.getloadavg()[0])
    print()
    print(
        "| threads | what | variant | median ms | min ms | CPU ms | vs dense | "
        "vs dense (CPU) | FLOPs vs dense |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n, rows in results.items():
        for r in rows:
            ratio = vs_dense(rows, r.group, r.variant)
            cpu = vs_dense(rows, r.group, r.variant, "cpu")
            print(
                f"| {n} | {r.group} | {r.variant} | {r.median_ms:.1f} | {r.min_ms:.1f} | "
                f"{r.cpu_ms:.1f} | {ratio:.2f}x | {cpu:.2f}x | {r.flops_vs_dense:.3f} |"
            )
    print()
    print(
        "load average (1 min, the higher of start and end) per thread count: "
        + ", ".join(f"{n} thread(s) {v:.2f}" for n, v in loads.items())
    )
    print()
    print(conclusion(results, loads))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
