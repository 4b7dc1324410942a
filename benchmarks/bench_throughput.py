"""Training throughput of ViT-B/16 with LoRA: images/s of one training step.

    python benchmarks/bench_throughput.py                    # GPU if present, else CPU
    python benchmarks/bench_throughput.py --device cpu --batch 8 --steps 5
    python benchmarks/bench_throughput.py --device cuda --batch 128 --precisions fp32,bf16,fp16

One step is what a clbench training iteration does: forward and cross-entropy under the
run's precision (``clbench.precision``: autocast for bf16 / fp16), backward, optimizer
step (fp16: through the loss scaler). The model is clbench's ``vit_b16`` backbone with
random weights (``backbone.pretrained=none``: the same architecture and cost as the
IN-21k weights), a 100-class head (Split CIFAR-100's), and the ``lora`` strategy's
injection with conf/strategy/lora.yaml's rank, alpha and targets (the strategy itself
builds the model, so the trainable parameters are a run's); Adam as in lora.yaml. Inputs
are random 224x224 images. The first ``--warmup`` steps (allocation, cuDNN / oneDNN
kernel choice) are not timed; the result is the median over ``--steps`` timed steps
(CUDA synchronised around each). Deterministic algorithms are on, as in a default run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from clbench.strategies.lora import SequentialLoRA

from clbench.config import compose, typed
from clbench.precision import check_precision, set_deterministic, to_float32
from clbench.registry import BACKBONES
from clbench.resources import set_threads

CLASSES = 100


def cpu_name() -> str:
    """The CPU's model name (Linux), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def build(device: torch.device) -> SequentialLoRA:
    """The lora strategy (lora.yaml) on a randomly initialised ViT-B/16 with 100 classes."""
    cfg = compose(["strategy=lora", "backbone=vit_b16", "backbone.pretrained=none"])
    backbone = BACKBONES.get("vit_b16")(typed("backbone", cfg.backbone))
    model = backbone.classifier([f"class {i}" for i in range(CLASSES)])
    strategy = SequentialLoRA(model=model, cfg=typed("strategy", cfg.strategy), device=device)
    model.head.grow(CLASSES)
    strategy.model = model.to(device).train()
    return strategy


def measure(
    strategy: SequentialLoRA, precision: str, batch: int, warmup: int, steps: int
) -> dict[str, float]:
    """Median seconds of one training step and the images/s it gives."""
    device = strategy.device
    strategy.set_precision(precision)
    p, model = strategy.precision, strategy.model
    optimizer = strategy.build_optimizer()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, generator=g).to(device)
    y = torch.randint(0, CLASSES, (batch,), generator=g).to(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with p.autocast():
            loss = F.cross_entropy(to_float32(model(x)), y)
        p.backward(loss, optimizer)
        p.step(optimizer)
        if cuda:
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    out = {"median_s": median, "images_per_s": batch / median, "loss": float(loss.detach())}
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--batch", type=int, default=None, help="default: 128 on CUDA, 8 on CPU")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help="default: 20 on CUDA, 5 on CPU")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    args = ap.parse_args()
    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    cuda = device.type == "cuda"
    batch = args.batch or (128 if cuda else 8)
    steps = args.steps or (20 if cuda else 5)
    set_threads(args.threads)
    set_deterministic(True)
    precisions = args.precisions.split(",")
    for p in precisions:
        check_precision(p, device, args.device)

    torch.manual_seed(0)
    strategy = build(device)
    what = torch.cuda.get_device_name(device) if cuda else cpu_name()
    print(f"device: {device} ({what}); {platform.machine()}, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, timm {timm.__version__}, python {platform.python_version()}")
    print(
        f"model: vit_b16 (random init) + lora (rank {strategy.cfg.rank}, alpha "
        f"{strategy.cfg.alpha}, targets {','.join(strategy.cfg.targets)}), {CLASSES}-class head"
    )
    print(
        f"trainable params: {strategy.num_trainable_parameters():,} of "
        f"{sum(p.numel() for p in strategy.model.parameters()):,}"
    )
    print(f"batch {batch}, {args.warmup} warm-up steps, median of {steps} timed steps")
    print(f"{'precision':<10}{'batch':>6}{'s/step':>10}{'images/s':>11}{'peak GiB':>10}")
    for p in precisions:
        r = measure(strategy, p, batch, args.warmup, steps)
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else "-"
        print(f"{p:<10}{batch:>6}{r['median_s']:>10.3f}{r['images_per_s']:>11.1f}{peak:>10}")


if __name__ == "__main__":
    main()
