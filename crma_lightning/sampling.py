"""Deterministic, resumable, rank-aware sampling for the training and evaluation loaders.

Why not Lightning's automatic ``DistributedSampler``: (1) a run resumed mid-stage must see exactly
the batches an uninterrupted run would have seen, and (2) a run on N processes must train on the
same *global* batches as a single-process run with the same seed, so that the two can be compared
number for number. Both samplers subclass ``DistributedSampler`` so Lightning leaves them alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class GlobalBatchSampler(DistributedSampler):
    """Shuffle once per (seed, epoch), cut into global batches, give each rank a contiguous slice.

    With ``world_size`` processes and a per-process batch of ``b``, global batch ``i`` is
    ``perm[i·b·W : (i+1)·b·W]`` and rank ``r`` gets ``perm[i·b·W + r·b : i·b·W + (r+1)·b]`` - the
    same global batch a single process with batch ``b·W`` would draw. Incomplete global batches
    are dropped. ``skip_batches`` makes the next epoch start after that many batches (resume).
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.batch_size = batch_size
        self.global_batch = batch_size * num_replicas
        self.batches_per_epoch = len(dataset) // self.global_batch
        self.num_samples = self.batches_per_epoch * batch_size
        self.total_size = self.num_samples * num_replicas
        self._skip = 0

    def skip_batches(self, n: int) -> None:
        """Start the next iteration ``n`` batches into the epoch."""
        self._skip = max(0, int(n))

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        batches = perm[: self.total_size].view(self.batches_per_epoch, self.num_replicas, self.batch_size)
        mine = batches[:, self.rank].reshape(-1)  # (batches_per_epoch * batch_size,)
        start, self._skip = self._skip * self.batch_size, 0
        return iter(mine[start:].tolist())

    def __len__(self) -> int:
        return self.num_samples


class EvalShardSampler(DistributedSampler):
    """Contiguous, unpadded shards for evaluation: every example is evaluated exactly once.

    ``DistributedSampler`` pads the last shard by repeating examples, which biases a token-weighted
    mean; here ranks may get one example fewer instead, and the metric sums are reduced across ranks.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        n = len(dataset)
        per = math.ceil(n / num_replicas)
        self._start, self._stop = min(n, rank * per), min(n, (rank + 1) * per)
        self.num_samples = self._stop - self._start

    def __iter__(self) -> Iterator[int]:
        return iter(range(self._start, self._stop))

    def __len__(self) -> int:
        return self.num_samples


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose position in the epoch survives a checkpoint (Lightning's ``_Stateful``).

    The position is read from ``progress()`` - the training loop's count of processed batches in the
    current epoch - rather than counted here, because Lightning's fetcher prefetches a batch ahead:
    a counter in the loader would be one too high whenever a checkpoint is written mid-epoch.
    """

    def __init__(self, *args, progress: Callable[[], tuple[int, int]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self._progress()
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        assert isinstance(sampler, GlobalBatchSampler)
        sampler.set_epoch(int(state["epoch"]))  # Lightning sets it again at the epoch start
        batches = int(state["batches"])
        # A checkpoint written on an epoch's last batch resumes at the start of the next epoch.
        sampler.skip_batches(batches if batches < sampler.batches_per_epoch else 0)
