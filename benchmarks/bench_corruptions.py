"""How long a full CIFAR-sized corrupted domain takes to generate, batched and per image.

    OMP_NUM_THREADS=1 python benchmarks/bench_corruptions.py [N] [REF_N]

Makes N (default 10,000) 32x32 RGB images (natural crops of the photograph that ships
with matplotlib, CIFAR's size and dtype) and times each of the 15 corruptions at
severity 5: the library (scenarios/corruptions.py) on all N at once, and the per-image
reference loop (benchmarks/cifar_c_reference.py: make_cifar_c.py written out one image at
a time, the structure of the script that made CIFAR-10-C) on the first REF_N (default
500) images, its time scaled to N. Both take the same draws from the same seed, so the
outputs on the REF_N images are compared as well (max |difference| in grey levels).
Each timing is the best of three runs (the first pays first-call costs: caches such as the
frost photographs, memory).
"""

from __future__ import annotations

import os
import sys
import time

import matplotlib
import numpy as np
from clbench.scenarios.corruptions import CORRUPTIONS, corrupt
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cifar_c_reference import corrupt_loop

REPEAT = 3


def images(n: int) -> np.ndarray:
    path = os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")
    a = np.asarray(Image.open(path).convert("RGB"))
    rng = np.random.default_rng(0)
    crops = []
    for _ in range(256):  # 256 distinct crops, tiled up to n
        s = int(rng.integers(64, 256))
        y, x = rng.integers(0, a.shape[0] - s), rng.integers(0, a.shape[1] - s)
        img = Image.fromarray(a[y : y + s, x : x + s]).resize((32, 32), Image.BILINEAR)
        crops.append(np.asarray(img))
    return np.resize(np.stack(crops), (n, 32, 32, 3))


def main(n: int, ref_n: int) -> None:
    x = images(n)
    ref_n = min(ref_n, n)
    scale = n / ref_n
    total_lib = total_ref = 0.0
    print(f"{n} images of 32x32x3, severity 5, one process, OMP_NUM_THREADS=1, best of {REPEAT}")
    print(f"reference: the per-image loop on the first {ref_n} images, time x {scale:g}")
    print(
        f"  {'corruption':18s} {'library':>9s} {'reference':>10s} {'speed-up':>9s} {'max diff':>9s}"
    )
    for name in CORRUPTIONS:
        dt_lib = dt_ref = float("inf")
        for _ in range(REPEAT):  # best of REPEAT: the first pass pays first-call costs
            t0 = time.perf_counter()
            lib = corrupt(x, name, 5, seed=0)
            t1 = time.perf_counter()
            ref = corrupt_loop(x[:ref_n], name, 5, seed=0)
            t2 = time.perf_counter()
            dt_lib, dt_ref = min(dt_lib, t1 - t0), min(dt_ref, (t2 - t1) * scale)
        total_lib += dt_lib
        total_ref += dt_ref
        diff = int(np.abs(lib[:ref_n].astype(int) - ref).max())
        print(
            f"  {name:18s} {dt_lib:7.2f} s {dt_ref:8.2f} s {dt_ref / dt_lib:8.1f}x {diff:9d}",
            flush=True,
        )
    print(f"  {'all 15':18s} {total_lib:7.2f} s {total_ref:8.2f} s {total_ref / total_lib:8.1f}x")


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]]
    main(*(args + [10_000, 500][len(args) :]))
