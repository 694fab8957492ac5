"""Replay: a buffer of earlier domains' training rows, mixed into later stages' batches (docs/method.md).

The buffer is filled at each stage's *end* (:meth:`Replay.on_task_end`) from the stage's whole
training set, so it never holds the current stage's rows while that stage trains, and every rank
fills the same buffer. From the next stage on, :meth:`Replay.train_data` hands the data module a
:class:`ReplayDataset` (stage rows, then buffer rows) and a :class:`ReplaySampler`: every per-process
batch of ``B`` rows holds exactly ``round(ratio · B)`` buffer rows, chosen by a generator seeded only
by ``(seed, stage, step)`` - so a run resumed mid-stage (``ResumableLoader`` skips batches) draws
exactly the batches of an uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from crma_lightning.checks import check_choice, check_number
from crma_lightning.data.sampling import GlobalBatchSampler
from crma_lightning.methods.base import Batch, ContinualMethod

SELECTIONS = ("reservoir", "per_domain")
Row = dict[str, list[int]]  # {"input_ids": [...], optionally "labels": [...] of the same length}


def mix_seed(*values: int) -> int:
    """A 63-bit seed from several integers (splitmix64 steps): nearby inputs give unrelated seeds."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x >> 1


def replay_indices(seed: int, stage: int, step: int, num_buffer: int, count: int) -> torch.Tensor:
    """The ``count`` buffer rows of global batch ``step`` of ``stage``: a function of its arguments only.

    Without replacement within the batch when the buffer is large enough, with replacement otherwise.
    """
    gen = torch.Generator().manual_seed(mix_seed(seed, stage, step))
    if count <= num_buffer:
        return torch.randperm(num_buffer, generator=gen)[:count]  # (count,)
    return torch.randint(num_buffer, (count,), generator=gen)


class ReplayDataset(Dataset):
    """Index ``i < len(stage_rows)``: the stage's row ``i``; above: buffer row ``i - len(stage_rows)``."""

    def __init__(self, stage_rows: Sequence[Mapping[str, Any]], buffer_rows: Sequence[Row]) -> None:
        self.stage_rows = stage_rows
        self.buffer_rows = list(buffer_rows)  # a snapshot: later buffer updates do not reach this stage
        self.num_stage_rows = len(stage_rows)

    def __len__(self) -> int:
        return self.num_stage_rows + len(self.buffer_rows)

    def __getitem__(self, index: int) -> Mapping[str, Any]:
        if index < self.num_stage_rows:
            return self.stage_rows[index]
        return self.buffer_rows[index - self.num_stage_rows]


class ReplaySampler(GlobalBatchSampler):
    """:class:`GlobalBatchSampler` whose batches hold ``R = round(ratio · batch_size)`` buffer rows each.

    Global batch ``j`` (``W`` processes): ``S·W`` stage rows from the (seed, epoch) permutation, then
    ``R·W`` buffer rows from :func:`replay_indices` (seeded by ``replay_seed`` and ``seed``, ``stage`` and
    ``step = epoch · batches_per_epoch + j``); rank
    ``r`` gets stage rows ``[r·S, (r+1)·S)`` and buffer rows ``[r·R, (r+1)·R)``, ``S = B − R``. An epoch
    is one pass over the stage's rows, so it has ``len(stage) // (S·W)`` batches. The global batch
    equals a one-process run's with batch ``B·W`` when ``ratio · B`` is an integer.
    """

    def __init__(
        self,
        dataset: ReplayDataset,
        batch_size: int,
        ratio: float,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        stage: int = 0,
        replay_seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__(dataset, batch_size, num_replicas, rank, seed=seed, shuffle=shuffle)
        self.stage = stage
        self.replay_seed = mix_seed(replay_seed, seed)  # the method's seed and the stage order's
        self.num_stage_rows = dataset.num_stage_rows
        self.num_buffer_rows = len(dataset) - dataset.num_stage_rows
        self.replay_per_batch = round(ratio * batch_size) if self.num_buffer_rows else 0
        if self.replay_per_batch >= batch_size:
            raise ValueError(
                f"replay ratio={ratio!r} with batch_size={batch_size} leaves no row of the current domain "
                f"(round(ratio x batch_size) = {self.replay_per_batch}); lower the ratio or raise batch_size"
            )
        self.stage_per_batch = batch_size - self.replay_per_batch
        # Overrides the parent's sizes, which counted buffer rows as if they were stage rows.
        self.batches_per_epoch = self.num_stage_rows // (self.stage_per_batch * num_replicas)
        self.num_samples = self.batches_per_epoch * batch_size
        self.total_size = self.num_samples * num_replicas

    def __iter__(self) -> Iterator[int]:
        n, world, s, r = self.num_stage_rows, self.num_replicas, self.stage_per_batch, self.replay_per_batch
        if self.shuffle:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            perm = torch.arange(n)
        stage_part = perm[: self.batches_per_epoch * world * s].view(self.batches_per_epoch, world, s)
        start, self._skip = self._skip, 0
        out: list[int] = []
        for j in range(start, self.batches_per_epoch):
            out += stage_part[j, self.rank].tolist()
            if r:
                step = self.epoch * self.batches_per_epoch + j
                buf = replay_indices(self.replay_seed, self.stage, step, self.num_buffer_rows, r * world)
                out += (buf.view(world, r)[self.rank] + n).tolist()
        return iter(out)


class Replay(ContinualMethod):
    """Experience replay of earlier domains' training rows.

    Args:
        buffer_size: Buffer capacity in rows (all domains together). Default 1000 when ``fraction`` is unset.
        fraction: Instead, keep ``max(1, round(fraction · n_d))`` rows of each domain ``d`` of ``n_d`` rows
            (``per_domain``), or grow the reservoir's capacity by that much per domain (``reservoir``).
        selection: ``reservoir`` - a uniform sample of every earlier row (Vitter's algorithm R over the
            rows in a seeded order; large domains get more rows); ``per_domain`` - an equal quota of
            ``buffer_size // k`` rows for each of the ``k`` earlier domains (the first ``buffer_size % k``
            domains one more), a seeded random subset, trimmed when a domain arrives.
        ratio: Fraction of every batch drawn from the buffer, in ``(0, 1)``.
        seed: Seed of the selection and of the buffer rows drawn per batch.
    """

    name = "replay"

    def __init__(
        self,
        buffer_size: int | None = None,
        fraction: float | None = None,
        selection: str = "reservoir",
        ratio: float = 0.25,
        seed: int = 0,
    ) -> None:
        if buffer_size is not None and fraction is not None:
            raise ValueError(f"replay: set buffer_size={buffer_size!r} or fraction={fraction!r}, not both")
        if buffer_size is None and fraction is None:
            buffer_size = 1000
        if buffer_size is not None:
            check_number("replay buffer_size", buffer_size, 1, integer=True)
        if fraction is not None:
            check_number("replay fraction", fraction, 0.0, 1.0, low_open=True)
        check_choice("replay selection", selection, SELECTIONS)
        check_number("replay ratio", ratio, 0.0, 1.0, low_open=True, high_open=True)
        check_number("replay seed", seed, -(2**63), integer=True)
        self.buffer_size = buffer_size
        self.fraction = fraction
        self.selection = selection
        self.ratio = ratio
        self.seed = seed
        self.buffer: list[tuple[str, Row]] = []  # (domain, row) per slot
        self.seen = 0  # rows streamed through the reservoir so far
        self.capacity = buffer_size or 0
        self.domains: list[str] = []  # domains added, in stage order

    def config(self) -> dict[str, Any]:
        return {
            "buffer_size": self.buffer_size,
            "fraction": self.fraction,
            "selection": self.selection,
            "ratio": self.ratio,
            "seed": self.seed,
        }

    # ------------------------------------------------------------------ filling the buffer
    def on_task_end(
        self,
        module: Any,
        task: str,
        index: int,
        train_batches: Iterable[Batch],
        train_rows: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        if train_rows is None:
            raise ValueError("replay needs the stage's training rows: call on_task_end(..., train_rows=dataset)")
        self.add_domain(task, train_rows, index)

    def add_domain(self, domain: str, rows: Sequence[Mapping[str, Any]], index: int) -> None:
        """Offer every row of ``domain`` (stage ``index``) to the buffer; a domain is added once."""
        if domain in self.domains:
            return  # idempotent: a repeated stage end (e.g. resume right after it) must not add twice
        n = len(rows)
        gen = torch.Generator().manual_seed(mix_seed(self.seed, index, 1))
        order = torch.randperm(n, generator=gen).tolist()  # the seeded order rows are offered in
        if self.selection == "per_domain":
            by_domain: dict[str, list[Row]] = {}
            for d, row in self.buffer:
                by_domain.setdefault(d, []).append(row)
            by_domain[domain] = [_as_row(rows[i]) for i in order[: self._quota(n, len(self.domains))]]
            if self.buffer_size is not None:  # equal quotas: every kept subset is a prefix of a random order
                k = len(by_domain)
                for i, d in enumerate(by_domain):
                    by_domain[d] = by_domain[d][: self.buffer_size // k + (i < self.buffer_size % k)]
            self.buffer = [(d, row) for d, kept in by_domain.items() for row in kept]
        else:
            if self.fraction is not None:
                self.capacity += max(1, round(self.fraction * n))
            u = torch.rand(n, generator=gen, dtype=torch.float64).tolist()
            for k, i in enumerate(order):
                if len(self.buffer) < self.capacity:
                    self.buffer.append((domain, _as_row(rows[i])))
                else:  # algorithm R: the (t+1)-th row replaces a uniform slot with probability capacity/(t+1)
                    slot = int(u[k] * (self.seen + k + 1))
                    if slot < self.capacity:
                        self.buffer[slot] = (domain, _as_row(rows[i]))
            self.seen += n
        self.domains.append(domain)

    def _quota(self, n: int, earlier: int) -> int:
        if self.fraction is not None:
            return max(1, round(self.fraction * n))
        k = earlier + 1
        return min(n, self.buffer_size // k + (earlier < self.buffer_size % k))

    # ------------------------------------------------------------------ mixing
    def train_data(
        self,
        stage: int,
        domain: str,
        rows: Sequence[Mapping[str, Any]],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> tuple[ReplayDataset, ReplaySampler] | None:
        """Stage ``stage``'s dataset and sampler with buffer rows mixed in (``None`` while the buffer is empty)."""
        buffer = [row for d, row in self.buffer if d != domain]  # a domain trained twice is not its own replay
        if not buffer:
            return None
        dataset = ReplayDataset(rows, buffer)
        sampler = ReplaySampler(
            dataset, batch_size, self.ratio, num_replicas, rank, seed=seed, stage=stage, replay_seed=self.seed
        )
        return dataset, sampler

    # ------------------------------------------------------------------ state and report
    def state_dict(self) -> dict[str, Any]:
        lengths = [len(row["input_ids"]) for _, row in self.buffer]
        ids = [t for _, row in self.buffer for t in row["input_ids"]]
        labels = [t for _, row in self.buffer if "labels" in row for t in row["labels"]]  # only rows that have them
        return {
            "config": self.config(),
            "domains": list(self.domains),
            "seen": self.seen,
            "capacity": self.capacity,
            "slot_domains": [d for d, _ in self.buffer],
            "lengths": torch.tensor(lengths, dtype=torch.long),  # (m,)
            "input_ids": torch.tensor(ids, dtype=torch.long),  # (Σ lengths,) the rows, concatenated
            "labels": torch.tensor(labels, dtype=torch.long),  # (Σ lengths of the rows with labels,)
            "has_labels": torch.tensor([("labels" in row) for _, row in self.buffer], dtype=torch.bool),  # (m,)
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_config(state)
        lengths, has_labels = state["lengths"].tolist(), state["has_labels"].tolist()
        ids = state["input_ids"].split(lengths)
        labelled = iter(state["labels"].split([n for n, has in zip(lengths, has_labels, strict=True) if has]))
        self.buffer = []
        for d, x, has in zip(state["slot_domains"], ids, has_labels, strict=True):
            row: Row = {"input_ids": x.tolist()}
            if has:
                row["labels"] = next(labelled).tolist()
            self.buffer.append((d, row))
        self.domains, self.seen, self.capacity = list(state["domains"]), int(state["seen"]), int(state["capacity"])

    def summary(self) -> dict[str, Any]:
        per_domain: dict[str, int] = {d: 0 for d in self.domains}
        for d, _ in self.buffer:
            per_domain[d] += 1
        tokens = sum(len(row["input_ids"]) for _, row in self.buffer)
        return {
            **super().summary(),
            "buffer_rows": len(self.buffer),
            "buffer_rows_per_domain": per_domain,
            "buffer_tokens": tokens,
            "buffer_bytes": 8 * tokens,  # as int64 token ids (the checkpoint's layout)
        }


def _as_row(row: Mapping[str, Any]) -> Row:
    """Keep a row's token ids (and labels, if any) as plain int lists: small, picklable, checkpointable."""
    out: Row = {"input_ids": [int(t) for t in row["input_ids"]]}
    flags = row.get("scored")  # prompt/response and chat rows: which tokens the loss scores (data.Collator)
    if row.get("labels") is None and flags is not None and not all(flags):
        out["labels"] = [t if f else -100 for t, f in zip(out["input_ids"], flags, strict=True)]
    elif row.get("labels") is not None:
        if len(row["labels"]) != len(out["input_ids"]):
            raise ValueError(
                f"replay row has {len(row['labels'])} labels for {len(out['input_ids'])} input_ids; expected equal"
            )
        out["labels"] = [int(t) for t in row["labels"]]
    return out
