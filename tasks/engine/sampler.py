"""The training data order: a resumable, sharded sampler keyed by (epoch, index), and the dataset adapter."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Dataset, Sampler

from tasks.engine.task import TaskDataset


class ResumableDistributedSampler(Sampler):
    """Shuffled, sharded, resumable: yields `(epoch, index)` keys for this rank, starting at a given step.

    The epoch's order is a permutation seeded by (seed, epoch), cut to whole global batches; rank r takes every
    world-th entry, so optimizer step s covers exactly entries [s·G, (s+1)·G) of the permutation on any world
    size. The epoch travels with each index so datasets can seed their randomness per (epoch, index) inside
    DataLoader workers (see `EpochKeyedDataset`).

    With `lengths` (`[N]` or `[N, K]` per-sample lengths, most important first: region count, then text length;
    `length_keys`), each window of `group_window` global batches of the permutation is sorted by them, longest
    first, before it is cut into batches, and the epoch's batches are then shuffled: batches hold items of
    similar region count and text length, so collates that pad to the batch's longest item pad little. The
    order stays a function of (seed, epoch) alone: every rank and every resumed run cuts the same batches.
    """

    def __init__(self, size: int, global_batch_size: int, rank: int, world_size: int, seed: int, shuffle=True,
                 lengths: np.ndarray | None = None, group_window: int = 50):
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"lengths has {len(lengths)} entries for a dataset of {size}")
        if lengths is not None:
            lengths = np.asarray(lengths).reshape(size, -1)
        self.size, self.global_batch_size = size, global_batch_size
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.lengths, self.group_window = lengths, group_window
        self.steps_per_epoch = size // global_batch_size
        self.epoch, self.start_step = 0, 0

    def set_position(self, epoch: int, start_step: int) -> None:
        self.epoch, self.start_step = epoch, start_step

    def epoch_order(self) -> np.ndarray:
        """This epoch's sample order over all ranks: `steps_per_epoch` global batches, one after another."""
        order = (
            np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
            if self.shuffle
            else np.arange(self.size)
        )
        used = order[: self.steps_per_epoch * self.global_batch_size]
        if self.lengths is None:
            return used
        window = self.group_window * self.global_batch_size
        # sort inside each window, longest first (first column, ties by the next, then by position); then shuffle
        # whole batches
        grouped = np.concatenate([
            chunk[np.lexsort([-self.lengths[chunk, k] for k in reversed(range(self.lengths.shape[1]))])]
            for chunk in np.split(used, range(window, len(used), window))
        ])
        batches = grouped.reshape(self.steps_per_epoch, self.global_batch_size)
        return batches[np.random.default_rng([self.seed, self.epoch, 1]).permutation(len(batches))].reshape(-1)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        mine = self.epoch_order()[self.rank :: self.world_size]
        start = self.start_step * (self.global_batch_size // self.world_size)
        for index in mine[start:]:
            yield (self.epoch, int(index))

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * (self.global_batch_size // self.world_size)


def length_keys(dataset: TaskDataset) -> np.ndarray | None:
    """`[N, K]` sort keys for length grouping: the dataset's region counts, then its text lengths (those it has);
    None when it has neither."""
    columns = [np.asarray(c) for c in (dataset.region_counts, dataset.text_lengths) if c is not None]
    return np.stack(columns, axis=1) if columns else None


def length_order(dataset: TaskDataset) -> np.ndarray:
    """Evaluation order: longest items first (region count, then text length), ties in dataset order; the
    dataset's order when it gives no lengths. Batches of similar items pad little; the caller restores the
    original order of their predictions (`np.argsort(order)`)."""
    keys = length_keys(dataset)
    if keys is None:
        return np.arange(len(dataset))
    return np.lexsort([-keys[:, k] for k in reversed(range(keys.shape[1]))])


class EpochKeyedDataset(Dataset):
    """Adapts a task's training set to the sampler's `(epoch, index)` keys (`TaskDataset.sample`)."""

    def __init__(self, dataset: TaskDataset):
        if not isinstance(dataset, TaskDataset):
            raise TypeError(f"training sets subclass tasks.engine.task.TaskDataset, got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        return self.dataset.sample(index, epoch)
