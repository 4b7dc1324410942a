"""Data loading for in-memory experiences.

Avalanche datasets fetch one sample at a time through several wrappers. For data
that already lives in memory as tensors (every embedded scenario) the experience is
materialised once and mini-batches are slices of the stacked tensors: the same
samples, the same order for a given generator, a fraction of the overhead. Lazy datasets
(images read from files) are read batch by batch with :func:`read_batches`; a strategy's
loader over them is :class:`LazyBatches` (seeded order and per-sample augmentation).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset


def materialise(dataset: Dataset, chunk: int = 4096) -> list[torch.Tensor]:
    """Stack every item of ``dataset`` into tensors (x, y, task label, ...)."""
    collate = getattr(dataset, "collate_fn", None)
    parts = [list(b) for b in DataLoader(dataset, batch_size=chunk, collate_fn=collate)]
    if not parts:
        raise ValueError("cannot materialise an empty dataset")
    return [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]


class TensorBatches:
    """Iterate mini-batches of stacked tensors; reshuffled on every pass if ``shuffle``."""

    def __init__(
        self,
        tensors: list[torch.Tensor],
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> None:
        self.tensors = tensors
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.drop_last = drop_last
        self.n = len(tensors[0])

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=self.generator)
            data = [t[order] for t in self.tensors]
        else:
            data = self.tensors
        for i in range(len(self)):
            s = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield [t[s] for t in data]


def read_batches(
    dataset: Dataset,
    batches: Sequence[Sequence[Any]],
    num_workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[list[torch.Tensor]]:
    """The items of ``dataset`` at each batch of indices, collated (x, y, ...), read through
    a DataLoader (``num_workers`` processes; ``pin_memory``: page-locked batches, for a CUDA
    device) in the order given: for lazy datasets.

    A :class:`~clbench.errors.ClbenchError` raised while reading (an unreadable file) stays
    one line when it comes from a worker process."""
    from clbench.errors import ClbenchError

    try:  # no more processes than the CPUs this process may use
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    loader = DataLoader(
        dataset,
        batch_sampler=[list(b) for b in batches],
        collate_fn=getattr(dataset, "collate_fn", None),
        num_workers=min(num_workers, cpus),
        pin_memory=pin_memory,
    )
    try:
        for batch in loader:
            yield list(batch)
    except ClbenchError as e:
        text = str(e)
        if not text.startswith("Caught "):
            raise
        # a worker's error comes back as "Caught ClbenchError in DataLoader worker process
        # N.\nOriginal Traceback ...\nclbench.errors.ClbenchError: <message>"
        last = text.strip().splitlines()[-1]
        raise type(e)(last.partition("Error: ")[2] or last) from None


class SeededItems(Dataset):
    """``dataset`` indexed by ``(index, seed)``: the item is read with torch's RNG seeded
    with ``seed`` (its random transforms draw from it) and the RNG's state restored after,
    so a sample's augmentation depends on its seed only, in any process."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.collate_fn = getattr(dataset, "collate_fn", None)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class LazyBatches:
    """Mini-batches of a lazy dataset (images read from files), read through
    :func:`read_batches` with ``num_workers`` processes.

    Each pass draws its order (if ``shuffle``) and, with a ``generator``, one seed per
    sample from ``generator`` (:class:`SeededItems`): the batches and every sample's random
    transforms are a function of the generator's seed alone, whatever the number of
    workers, and a run rebuilt from a checkpoint replays them."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool = False,
    ) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.drop_last = drop_last
        self.n = len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (0 if self.drop_last or rest == 0 else 1)

    def __iter__(self) -> Iterator[list[torch.Tensor]]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=self.generator).tolist()
        else:
            order = list(range(self.n))
        data: Dataset = self.dataset
        keys: list[Any] = order
        if self.generator is not None:
            seeds = torch.randint(0, 2**62, (self.n,), generator=self.generator).tolist()
            keys, data = list(zip(order, seeds, strict=True)), SeededItems(self.dataset)
        size = self.batch_size
        batches = [keys[i * size : (i + 1) * size] for i in range(len(self))]
        yield from read_batches(data, batches, self.num_workers, self.pin_memory)
