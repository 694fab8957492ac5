"""Deterministic, resumable, rank-aware sampling for the training and evaluation loaders, and the collator.

Why not Lightning's automatic ``DistributedSampler``: (1) a run resumed mid-stage must see exactly
the batches an uninterrupted run would have seen, and (2) a run on N processes must train on the
same *global* batches as a single-process run with the same seed, so that the two can be compared
number for number. Both samplers subclass ``DistributedSampler`` so Lightning leaves them alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from crma_lightning.data.domains import SCORED_COLUMN


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


def shard_bounds(num_examples: int, world_size: int, rank: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s contiguous evaluation shard; shard sizes differ by at most one."""
    return rank * num_examples // world_size, (rank + 1) * num_examples // world_size


class EvalShardSampler(DistributedSampler):
    """Contiguous, unpadded shards for evaluation: every example is evaluated exactly once.

    ``DistributedSampler`` pads the last shard by repeating examples, which biases a token-weighted
    mean; here shard sizes differ by at most one example instead (a rank can get none when there are
    fewer examples than ranks), and the metric sums are reduced across ranks. See
    :class:`PaddedEvalLoader` for equal batch counts.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self._start, self._stop = shard_bounds(len(dataset), num_replicas, rank)
        self.num_samples = self._stop - self._start

    def __iter__(self) -> Iterator[int]:
        return iter(range(self._start, self._stop))

    def __len__(self) -> int:
        return self.num_samples


def eval_batches_per_rank(num_examples: int, world_size: int, batch_size: int) -> list[int]:
    """Batches each rank gets from :class:`EvalShardSampler` shards of ``num_examples`` rows."""
    bounds = [shard_bounds(num_examples, world_size, r) for r in range(world_size)]
    return [math.ceil((stop - start) / batch_size) for start, stop in bounds]


class PaddedEvalLoader:
    """An evaluation loader topped up with padding batches so that every rank runs as many batches.

    Why: unpadded shards (exact token-weighted means) can give ranks different batch counts - or none.
    Under FSDP every forward is a collective, so a rank with an extra batch would wait forever; under
    DDP a rank with an empty shard is refused by Lightning. A padding batch is the dataset's first row
    with every label ``-100``: it runs through the model like any batch and adds zero tokens.
    """

    def __init__(self, loader: DataLoader, num_batches: int) -> None:
        self.loader = loader
        self.num_batches = num_batches
        # What Lightning inspects on an evaluation loader (shuffling, sampler) is the wrapped loader's.
        self.sampler = loader.sampler
        self.batch_sampler = loader.batch_sampler
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Any]:
        seen = 0
        for batch in self.loader:
            seen += 1
            yield batch
        for _ in range(self.num_batches - seen):
            yield self.padding_batch()

    def padding_batch(self) -> dict[str, Any]:
        batch = self.loader.collate_fn([self.loader.dataset[0]])
        batch["labels"] = torch.full_like(batch["labels"], -100)
        return batch


def equalize_eval_batches(loader: Any) -> Any:
    """Wrap an :class:`EvalShardSampler` loader in :class:`PaddedEvalLoader` when ranks' batch counts differ."""
    sampler = getattr(loader, "sampler", None)
    if not isinstance(loader, DataLoader) or not isinstance(sampler, EvalShardSampler) or not loader.batch_size:
        return loader
    counts = eval_batches_per_rank(len(loader.dataset), sampler.num_replicas, loader.batch_size)
    if len(set(counts)) == 1:
        return loader
    return PaddedEvalLoader(loader, max(counts))


def resume_batches(state: dict[str, int], global_batch: int) -> int:
    """Global batches of ``global_batch`` rows to skip to resume a loader saved as ``state``.

    The stage driver calls it before anything is written (a refused resume leaves the run untouched),
    the loader again when Lightning restores it.

    Raises:
        ValueError: The rows consumed are not a whole number of global batches.
    """
    rows = int(state.get("rows", int(state["batches"]) * global_batch))
    if rows % global_batch:
        raise ValueError(
            f"the checkpoint consumed {rows} rows, not a whole number of global batches of {global_batch} "
            "(batch_size x processes changed); resume with the original batch size and process count, or from "
            "a stage checkpoint"
        )
    return rows // global_batch


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
        sampler = self.sampler
        assert isinstance(sampler, GlobalBatchSampler)
        # Rows, not batches: a resume with another batch size or process count skips the same data.
        return {"epoch": int(epoch), "batches": int(batches), "rows": int(batches) * sampler.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.sampler
        assert isinstance(sampler, GlobalBatchSampler)
        sampler.set_epoch(int(state["epoch"]))  # Lightning sets it again at the epoch start
        batches = resume_batches(state, sampler.global_batch)
        # A checkpoint written on an epoch's last batch resumes at the start of the next epoch.
        sampler.skip_batches(batches if batches < sampler.batches_per_epoch else 0)


class Collator:
    """Pad a list of rows into a batch; labels are the ids, with -100 wherever the loss must not look.

    Rows are ``{"input_ids": [...]}``; rows of prompt/response and chat domains also carry
    ``{"scored": [...]}``, one flag per token (see :func:`crma_lightning.data.packing.tokenize`). Labels are
    -100 on padding and on unscored tokens (prompts, non-assistant turns). Training and validation
    loaders use this same collator, so the held-out loss is masked exactly like the training loss.
    """

    def __init__(self, pad_id: int, domain: str) -> None:
        self.pad_id = pad_id
        self.domain = domain

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        length = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        scored = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, r in enumerate(rows):
            x = torch.as_tensor(r["input_ids"], dtype=torch.long)
            ids[i, : len(x)] = x
            mask[i, : len(x)] = 1
            flags = r.get(SCORED_COLUMN)
            if flags is None and r.get("labels") is not None:  # a replayed row: its scored tokens as labels
                flags = [t != -100 for t in r["labels"]]
            scored[i, : len(x)] = True if flags is None else torch.as_tensor(flags, dtype=torch.bool)
        labels = ids.masked_fill(~scored, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "domain": self.domain}


def right_padded(prompts: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of token-id lists, right-padded with ``pad``."""
    width = max(1, max(len(p) for p in prompts))
    ids = torch.tensor([list(p) + [pad] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
    return ids, mask
