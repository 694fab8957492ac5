"""Prototype routing: pick a sequence's task from one forward of the frozen base model (DESIGN §3.4).

Per task, the statistics of the frozen base model's hidden states (every adapter off, CRMA off) on the
task's training rows, each row pooled over its first ``P`` tokens (the same prefix a routed evaluation
reads): the row count, the sum of the pooled vectors and - shared by all tasks - the sum of their outer
products. From these, the class means ``m_k`` and the pooled within-task covariance
``S = (sum x x^T - sum_k n_k m_k m_k^T) / (N - K)``, shrunk towards a multiple of the identity
(``(1 - a) S + a tr(S)/H I``, ``a = shrinkage``) so that it stays invertible with few rows. A sequence goes
to the task with the smallest Mahalanobis distance ``(x - m_k)^T S^-1 (x - m_k)`` (``estimator:
mahalanobis``, LDA without priors) or the smallest Euclidean one (``estimator: nearest``).

Everything kept is a sum over rows (float64), so processes reduce it with one all-reduce (sum) and the
statistics of ``N`` processes equal one process's up to summation order. Storage: ``K x H`` means and
one ``H x H`` matrix (H = hidden size): ~2 KB per task and 130 KB shared for H = 128; 128 MB shared for
H = 4096 (float64).

Serving costs 2 forwards per sequence whatever the number of tasks: one base forward over the prefix
(features), one with the chosen adapter. Pure PyTorch: the Lightning side is in
:mod:`crma_lightning.callbacks.routing` and :class:`crma_lightning.module.ContinualLM`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crma_lightning.checks import check_choice, check_number

POOLINGS = ("mean", "last", "mean_last")
"""``mean``: mean over the prefix's real tokens; ``last``: its last real token; ``mean_last``: both, concatenated."""
ESTIMATORS = ("mahalanobis", "nearest")
DEFAULT_LAYER = -1
"""Hidden state read by default: the last layer's; the layers measured within noise on the demo base (benchmarks.md)."""
DEFAULT_POOLING = "mean"
"""Within 0.05 of the best pooling at every layer measured; last-token pooling was unstable (docs/benchmarks.md)."""
DEFAULT_SHRINKAGE = 0.1


def validate_prototype(layer: int, pooling: str, estimator: str, shrinkage: float) -> None:
    """Raise ``ValueError`` naming a bad prototype-routing setting."""
    if not isinstance(layer, int) or isinstance(layer, bool):
        raise ValueError(f"routing.layer must be an integer (a hidden_states index, -1: last), got {layer!r}")
    check_choice("routing.pooling", pooling, POOLINGS)
    check_choice("routing.estimator", estimator, ESTIMATORS)
    check_number("routing.shrinkage", shrinkage, 0.0, 1.0)


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """``(B, T, H)`` hidden states -> ``(B, H')`` float64 features over the real (``mask == 1``) positions."""
    hidden = hidden.double()
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    weights = mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    last_index = (mask.long().cumsum(dim=1).argmax(dim=1)).clamp_min(0)  # the last real position (right padding)
    last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_index]
    if pooling == "mean":
        return mean
    if pooling == "last":
        return last
    return torch.cat([mean, last], dim=1)


@torch.no_grad()
def base_features(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, layer: int, pooling: str
) -> torch.Tensor:
    """Pooled ``hidden_states[layer]`` of ``model`` on ``ids`` (the caller turns the adapters off)."""
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states
    if not -len(hidden) <= layer < len(hidden):
        raise ValueError(f"routing.layer {layer} is out of range: the model has hidden_states 0..{len(hidden) - 1}")
    return pool(hidden[layer], mask, pooling)


@contextmanager
def adapters_off(model: nn.Module, activate: Callable[[str | None], None] | None = None) -> Iterator[None]:
    """Run the frozen base model: LoRA off (``activate(None)``) and every CRMA block off, restored after.

    ``activate``: the host's adapter switch (``ContinualLM.activate_task``); the caller re-activates what it
    needs afterwards (the LoRA choice is not restored here, the CRMA flags are).
    """
    from crma_lightning.adapters.crma import CRMABlock

    blocks = [m for m in model.modules() if isinstance(m, CRMABlock)]
    flags = [b.enabled for b in blocks]
    if activate is not None:
        activate(None)
    for b in blocks:
        b.enabled = False
    try:
        yield
    finally:
        for b, flag in zip(blocks, flags, strict=True):
            b.enabled = flag


class PrototypeRouter:
    """Per-task sums of pooled base hidden states, and the nearest-task choice they give.

    Args:
        prefix_tokens: ``P``: each row is pooled over its first ``P`` tokens (fit and routing alike).
        layer: Index into the model's ``hidden_states`` (0: embeddings, -1: last layer).
        pooling: One of :data:`POOLINGS`.
        estimator: ``mahalanobis`` (shared shrunk covariance) or ``nearest`` (Euclidean nearest mean).
        shrinkage: ``a`` in ``(1 - a) S + a tr(S)/H I``.
    """

    def __init__(
        self,
        prefix_tokens: int,
        layer: int = DEFAULT_LAYER,
        pooling: str = DEFAULT_POOLING,
        estimator: str = "mahalanobis",
        shrinkage: float = DEFAULT_SHRINKAGE,
    ) -> None:
        validate_prototype(layer, pooling, estimator, shrinkage)
        check_number("routing.prefix_tokens", prefix_tokens, 2, integer=True)
        self.prefix_tokens, self.layer, self.pooling = prefix_tokens, layer, pooling
        self.estimator, self.shrinkage = estimator, shrinkage
        self.tasks: list[str] = []
        self.counts: torch.Tensor | None = None  # (K,) float64
        self.sums: torch.Tensor | None = None  # (K, H) float64
        self.second: torch.Tensor | None = None  # (H, H) float64, over every task's rows
        self._solver: tuple[torch.Tensor, torch.Tensor] | None = None  # (means, precision) cache

    # ------------------------------------------------------------------ fitting
    def settings(self) -> dict[str, Any]:
        """What decides the statistics and the choice (compared on resume)."""
        return {
            "prefix_tokens": self.prefix_tokens,
            "layer": self.layer,
            "pooling": self.pooling,
            "estimator": self.estimator,
            "shrinkage": self.shrinkage,
        }

    def features(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Pooled features of the first ``P`` tokens of each row (the caller turns the adapters off)."""
        p = self.prefix_tokens
        return base_features(model, ids[:, :p], None if mask is None else mask[:, :p], self.layer, self.pooling)

    @staticmethod
    def row_sums(features: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
        """``[count, sum x, sum x x^T]`` of the real rows, flattened into one float64 vector (for one all-reduce)."""
        x = features.double()
        if real is not None:
            x = x * real.to(x.dtype)[:, None]
        count = x.new_tensor([float(x.shape[0] if real is None else real.sum())])
        return torch.cat([count, x.sum(dim=0), (x.T @ x).flatten()])

    def add_task(self, task: str, totals: torch.Tensor) -> None:
        """Record ``task``'s statistics from :meth:`row_sums` summed over its rows (and over processes)."""
        if task in self.tasks:
            raise ValueError(f"prototype router already has statistics for task {task!r}")
        totals = totals.detach().double().cpu()
        h = round((-1 + (1 + 4 * (totals.numel() - 1)) ** 0.5) / 2)  # 1 + H + H^2 values
        if 1 + h + h * h != totals.numel():
            raise ValueError(f"statistics of {totals.numel()} values are not [count, sum, outer sum]")
        if totals[0] < 1:
            raise ValueError(f"task {task!r} has no training rows to fit its routing statistics on")
        count, total, second = totals[:1], totals[1 : 1 + h], totals[1 + h :].reshape(h, h)
        if self.sums is None:
            self.counts, self.sums, self.second = count, total[None], second
        else:
            if self.sums.shape[1] != h:
                raise ValueError(f"task {task!r} features have {h} dimensions, the others {self.sums.shape[1]}")
            self.counts = torch.cat([self.counts, count])
            self.sums = torch.cat([self.sums, total[None]])
            self.second = self.second + second
        self.tasks.append(task)
        self._solver = None

    def configure(self, estimator: str, shrinkage: float) -> None:
        """Change how the stored statistics are read (the statistics themselves stay)."""
        validate_prototype(self.layer, self.pooling, estimator, shrinkage)
        self.estimator, self.shrinkage, self._solver = estimator, shrinkage, None

    # ------------------------------------------------------------------ choosing
    def _means_precision(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._solver is None:
            means = self.sums / self.counts[:, None]  # (K, H)
            h = means.shape[1]
            if self.estimator == "nearest":
                precision = torch.eye(h, dtype=torch.float64)
            else:
                scatter = self.second - (means.T * self.counts) @ means
                dof = max(float(self.counts.sum()) - len(self.tasks), 1.0)
                cov = scatter / dof
                scale = float(torch.trace(cov)) / h
                scale = scale if scale > 0 else 1.0
                cov = (1 - self.shrinkage) * cov + self.shrinkage * scale * torch.eye(h, dtype=torch.float64)
                precision = torch.linalg.pinv(cov, hermitian=True)
            self._solver = (means, precision)
        return self._solver

    def distances(self, features: torch.Tensor, tasks: Sequence[str] | None = None) -> torch.Tensor:
        """``(B, K)`` squared distances of each row to each task's mean (``tasks``: which, default all fitted)."""
        if not self.tasks:
            raise ValueError("the prototype router has no task statistics yet (they are fitted at each stage's end)")
        names = list(self.tasks if tasks is None else tasks)
        missing = [t for t in names if t not in self.tasks]
        if missing:
            raise ValueError(f"no routing statistics for tasks {missing}; fitted: {self.tasks}")
        means, precision = self._means_precision()
        idx = torch.tensor([self.tasks.index(t) for t in names])
        diff = features.double().cpu()[:, None, :] - means[idx][None]  # (B, K, H)
        return torch.einsum("bkh,hg,bkg->bk", diff, precision, diff).to(features.device)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain values and tensors (``torch.load(weights_only=True)`` reads them back bit for bit)."""
        return {
            "settings": self.settings(),
            "tasks": list(self.tasks),
            "counts": self.counts,
            "sums": self.sums,
            "second": self.second,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the settings must agree: the statistics depend on them)."""
        saved = dict(state.get("settings", {}))
        mine = self.settings()
        fitted_by = {k: saved.get(k) for k in ("prefix_tokens", "layer", "pooling")}
        if state.get("tasks") and fitted_by != {k: mine[k] for k in fitted_by}:
            raise ValueError(
                f"the routing statistics were fitted with {fitted_by}; this run has "
                f"{ {k: mine[k] for k in fitted_by} } (use the original settings or a new run dir)"
            )
        self.tasks = list(state.get("tasks", []))
        self.counts, self.sums, self.second = state.get("counts"), state.get("sums"), state.get("second")
        self._solver = None

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PrototypeRouter:
        """A router with the saved settings and statistics."""
        router = cls(**state["settings"])
        router.load_state_dict(state)
        return router


def right_padded(prompts: Sequence[Sequence[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of token-id lists, right-padded with ``pad``."""
    width = max(1, max(len(p) for p in prompts))
    ids = torch.tensor([list(p) + [pad] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts], dtype=torch.long, device=device)
    return ids, mask


@torch.no_grad()
def local_task_sums(
    router: PrototypeRouter,
    model: nn.Module,
    token_rows: Sequence[Sequence[int]],
    batch_size: int,
    device: torch.device,
    pad: int,
    world: int = 1,
    rank: int = 0,
) -> torch.Tensor:
    """This process's :meth:`PrototypeRouter.row_sums` over rows ``rank, rank + world, ...`` of ``token_rows``.

    Every process runs as many batches (a short shard repeats a row that counts for nothing), so sharded
    models see matching collectives; sum the result over processes. The caller turns the adapters off.
    """
    mine = [list(r)[: router.prefix_tokens] for r in token_rows[rank::world]]
    batches = -(-len(token_rows[0::world]) // batch_size)
    real = [True] * len(mine) + [False] * (batches * batch_size - len(mine))
    mine += [mine[-1] if mine else list(token_rows[0])[: router.prefix_tokens]] * (len(real) - len(mine))
    total = None
    for b in range(batches):
        ids, mask = right_padded(mine[b * batch_size : (b + 1) * batch_size], pad, device)
        flags = torch.tensor(real[b * batch_size : (b + 1) * batch_size], device=device)
        part = router.row_sums(router.features(model, ids, mask), flags)
        total = part if total is None else total + part
    if total is None:
        raise ValueError("no training rows to fit the routing statistics on")
    return total


def candidate_scores(
    router: PrototypeRouter, features: torch.Tensor, candidates: dict[str, Sequence[str]]
) -> torch.Tensor:
    """``(B, K)`` distance of each row to each candidate: the nearest of the candidate's tasks' means.

    ``candidates`` maps a candidate (an adapter set) to the tasks it serves (several when tasks share it).
    """
    tasks = [t for names in candidates.values() for t in names]
    dist = router.distances(features, tasks)  # (B, sum of tasks)
    out, start = [], 0
    for names in candidates.values():
        out.append(dist[:, start : start + len(names)].min(dim=1).values)
        start += len(names)
    return torch.stack(out, dim=1)


ROUTER_FILE_SUFFIX = ".router.safetensors"
"""Beside each exported adapter file ``X.safetensors``: ``X.router.safetensors`` (prototype statistics)."""


def save_router(router: PrototypeRouter, path: str | os.PathLike) -> Path:
    """Write the statistics as safetensors (settings and task order in the metadata), atomically."""
    from safetensors.torch import save_file

    from crma_lightning.adapters.serialization import atomic_write

    tensors = {"counts": router.counts, "sums": router.sums, "second": router.second}
    meta = {"settings": json.dumps(router.settings()), "tasks": json.dumps(router.tasks)}
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta))
    return Path(path)


def load_router(path: str | os.PathLike) -> PrototypeRouter:
    """Read :func:`save_router`'s file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if "settings" not in meta:
            raise ValueError(f"{path} is not a prototype router file (no routing settings in its metadata)")
        state = {k: f.get_tensor(k) for k in ("counts", "sums", "second")}
    return PrototypeRouter.from_state(
        {"settings": json.loads(meta["settings"]), "tasks": json.loads(meta["tasks"]), **state}
    )


@torch.no_grad()
def fit_missing_tasks(
    router: PrototypeRouter,
    model: nn.Module,
    activate: Callable[[str | None], None],
    train_rows: dict[str, Sequence[Sequence[int]]],
    tasks: Sequence[str],
    batch_size: int,
    pad: int,
    device: torch.device,
) -> list[str]:
    """Fit (in one process) the statistics of every task of ``tasks`` the router lacks; returns those tasks.

    For a run trained without ``routing: prototype``: its training rows give the statistics after the fact.
    """
    missing = [t for t in tasks if t not in router.tasks]
    was_training = model.training
    model.eval()
    try:
        with adapters_off(model, activate):
            for task in missing:
                router.add_task(task, local_task_sums(router, model, train_rows[task], batch_size, device, pad))
    finally:
        model.train(was_training)
    return missing
