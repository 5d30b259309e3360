"""A training order that can stop and resume: each epoch's order and each image's augmentation
depend only on the seed, the epoch and the image, never on what ran before.

:class:`EpochSampler` is torch's ``DistributedSampler`` (one shard per process, a new seeded order
per epoch; one shard of everything without ``torchrun``) that can start a pass part-way through
and tells the dataset which epoch an index belongs to. :class:`SeededItems` draws each image's
random augmentation from a generator seeded by (seed, epoch, index), so the same image gets the
same crop in an interrupted and an uninterrupted run, whichever process or worker decodes it.
"""

from __future__ import annotations

import math
import random
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from ..core.distributed import rank, world_size


class EpochSampler(DistributedSampler):
    """Indices of this process's shard of a seeded per-epoch order, as ``(epoch, index)`` pairs for
    :class:`SeededItems` (``(epoch, index, copy)`` with repeats). :meth:`skip_next` starts the next
    pass part-way (resuming mid-epoch) without decoding the images skipped.

    ``repeats`` > 1 is DeiT's repeated augmentation (Hoffer et al., CVPR 2020; ``RASampler`` in
    ``samplers.py`` of ``facebookresearch/deit``, which IdleViT and EViT train with): each index of
    the epoch's order comes ``repeats`` times in a row, the copies dealt round-robin to the
    processes, and a process reads as many items per epoch as without repeats, so an epoch sees
    1/``repeats`` of the images, each in ``repeats`` augmentations. One deviation: DeiT rounds the
    epoch down to a multiple of 256 images, which would leave a folder of fewer than 256 empty.
    """

    def __init__(self, dataset: Dataset, seed: int, drop_last: bool = False, repeats: int = 1) -> None:
        super().__init__(dataset, num_replicas=world_size(), rank=rank(), shuffle=True, seed=seed, drop_last=drop_last)
        self.skipped = 0
        self.repeats = repeats

    def skip_next(self, count: int) -> None:
        """Leave out the first ``count`` indices of the next pass only."""
        self.skipped = count

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        skipped, self.skipped = self.skipped, 0
        items = super().__iter__() if self.repeats == 1 else self._repeated()
        for position, item in enumerate(items):
            if position >= skipped:
                yield (self.epoch, item) if self.repeats == 1 else (self.epoch, *item)

    def _repeated(self) -> Iterator[tuple[int, int]]:
        """This process's (index, copy) pairs of the epoch's repeated order."""
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        copies = [(index, copy) for index in order.tolist() for copy in range(self.repeats)]
        padded = math.ceil(len(copies) / self.num_replicas) * self.num_replicas
        copies += copies[:padded - len(copies)]
        return iter(copies[self.rank::self.num_replicas][:len(self)])


def item_seed(seed: int, epoch: int, index: int, copy: int = 0) -> int:
    """A 63-bit seed for one image (one of its repeated copies) of one epoch (tuples of ints hash
    alike in every process)."""
    return hash((seed, epoch, index) if copy == 0 else (seed, epoch, index, copy)) & (2**63 - 1)


class SeededItems(Dataset):
    """``dataset`` read by ``(epoch, index[, copy])`` (from :class:`EpochSampler`): each item's transform
    draws from torch's, Python's and NumPy's generators seeded by (``seed``, epoch, index, copy), and the
    caller's generator states are left as they were. Plain indices read as epoch 0."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Any) -> Any:
        epoch, index, *copy = key if isinstance(key, tuple) else (0, key)
        seed = item_seed(self.seed, epoch, index, *copy)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % 2**32)
                return self.dataset[index]
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

