"""Data loading for in-memory experiences.

Avalanche datasets fetch one sample at a time through several wrappers. For data
that already lives in memory as tensors (every embedded scenario) the experience is
materialised once and mini-batches are slices of the stacked tensors: the same
samples, the same order for a given generator, a fraction of the overhead.
"""

from __future__ import annotations

from collections.abc import Iterator

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
