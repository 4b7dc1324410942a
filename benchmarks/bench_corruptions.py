"""How long a full CIFAR-sized corrupted domain takes to generate.

    python benchmarks/bench_corruptions.py [N]

Makes N (default 10,000) 32x32 RGB images (natural crops of the photograph that ships
with matplotlib, CIFAR's size and dtype) and times each of the 15 corruptions at
severity 5 on all of them at once, with the library in scenarios/corruptions.py.
"""

from __future__ import annotations

import os
import sys
import time

import matplotlib
import numpy as np
from clbench.scenarios.corruptions import CORRUPTIONS, corrupt
from PIL import Image


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


def main(n: int) -> None:
    x = images(n)
    total = 0.0
    print(f"{n} images of 32x32x3, severity 5, one process")
    for name in CORRUPTIONS:
        t0 = time.perf_counter()
        corrupt(x, name, 5, seed=0)
        dt = time.perf_counter() - t0
        total += dt
        print(f"  {name:18s} {dt:6.2f} s")
    print(f"  {'all 15':18s} {total:6.2f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000)
