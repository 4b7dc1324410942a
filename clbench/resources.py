"""The machine's resources a run uses (threads) and measures (peak memory)."""

from __future__ import annotations

import contextlib
import os
import resource
import sys

#: ceiling of the default thread count: past it the small per-step work of the embedded
#: models and of adapter training gains little, and a shared node is not taken over
MAX_DEFAULT_THREADS = 16


#: iterations a GNU OpenMP thread (torch's intra-op pool on Linux) spins at a barrier
#: before it sleeps; libgomp's default is 300000. Measured here (2 cores, 2 threads, 60
#: pretraining steps): beside a process saturating one core, 59.5 s with the default,
#: 16.7 s with 10000, 10.2 s idle; idle, 10000 costs nothing (benchmarks/RESULTS.md)
GOMP_SPINCOUNT = "10000"


def configure_openmp() -> None:
    """Shorten OpenMP's busy wait (before torch is imported) unless the environment sets
    a wait policy or a spin count itself."""
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a SLURM or container
    allocation), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity masks
        return os.cpu_count() or 1


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when the environment sets it to a number, else the cores this
    process may use, at most :data:`MAX_DEFAULT_THREADS`."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(available_cores(), MAX_DEFAULT_THREADS))


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op and inter-op thread counts to ``threads`` (None: the default
    above); returns the count. The inter-op count can only be set before the process runs
    inter-op work; a later call leaves it as it is."""
    import torch

    n = threads or default_threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if torch.get_num_interop_threads() != n:
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(n)
    return n
