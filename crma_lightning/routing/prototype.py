"""Prototype routing: pick a sequence's task from one forward of the frozen base model (DESIGN §3.4).

Per task, the statistics of the frozen base model's hidden states (every adapter off, CRMA off) on the
task's training rows, each row pooled over its first ``P`` tokens (the same prefix a routed evaluation
reads; the held-out rows a routed evaluation reads are cut from their text exactly as the training rows
are, so the fitted prefixes and the routed ones are the same kind) and the pooled vectors of the chosen
layers concatenated: the row count, the sum of the pooled vectors and - shared by all tasks - the sum of their outer
products. From these, the class means ``m_k`` and the pooled within-task covariance
``S = (sum x x^T - sum_k n_k m_k m_k^T) / (N - K)``, shrunk towards a multiple of the identity
(``(1 - a) S + a tr(S)/H I``, ``a = shrinkage``) so that it stays invertible with few rows. A sequence goes
to the task with the smallest Mahalanobis distance ``(x - m_k)^T S^-1 (x - m_k)`` (``estimator:
mahalanobis``, LDA without priors) or the smallest Euclidean one (``estimator: nearest``).

Everything kept is a sum over rows (float64), so processes reduce it with one all-reduce (sum) and the
statistics of ``N`` processes equal one process's up to summation order. Storage, with ``F`` feature
dimensions (hidden size x layers read x 2 for ``mean_std``/``mean_last``): ``K x F`` means and one
``F x F`` matrix, float64. The defaults (``layer: auto``, ``mean_std``) read every hidden state while that
stays within :data:`AUTO_FEATURES`: ``F = 2 H (L + 1)`` = 1,280 and 13 MB shared for the benchmark's 4-layer
H = 128 base; wider models read the last hidden state only (``F = 2 H``: 8,192 and 512 MB at H = 4096 - choose
``pooling: mean`` to halve F and quarter the matrix). ``F`` above :data:`MAX_FEATURES` is refused with a
message saying so.

Serving costs 2 forwards per sequence whatever the number of tasks: one base forward over the prefix
(features), one with the chosen adapter. A hybrid (``fallback_margin``) falls back to perplexity routing
(one prefix forward per task) for the sequences whose two nearest tasks are closer than the margin:
between 2 and ``T + 2`` forwards, its average reported by the routed evaluation. Pure PyTorch: the Lightning side is in
:mod:`crma_lightning.callbacks.routed_evaluation` and :class:`crma_lightning.model.continual_lm.ContinualLM`.
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
from crma_lightning.data.sampling import right_padded

POOLINGS = ("mean", "last", "mean_last", "mean_std")
"""``mean``: mean over the prefix's real tokens; ``last``: its last real token; ``mean_last``: both, concatenated;
``mean_std``: the mean and the (population) standard deviation over the real tokens, concatenated."""
ESTIMATORS = ("mahalanobis", "nearest")
ALL_LAYERS = "all"
AUTO_LAYERS = "auto"
DEFAULT_LAYER: int | list[int] | str = AUTO_LAYERS
"""Hidden states read by default (``auto``): all of them (embeddings and every layer), concatenated, while that
gives at most :data:`AUTO_FEATURES` feature dimensions - on the shared real corpora the most accurate of every
single layer and layer set measured (docs/benchmarks-history.md) - and only the last one for wider models (a 7B model's
33 hidden states of 4096 would give 270k features: a shared covariance far beyond memory)."""
AUTO_FEATURES = 4096
"""``auto`` reads every hidden state up to this many feature dimensions (a 128 MB float64 covariance)."""
DEFAULT_POOLING = "mean_std"
"""Mean and standard deviation over the prefix: the best pooling at every layer set measured on the real corpora."""
DEFAULT_SHRINKAGE = 0.01
"""Weight of the identity in the shrunk covariance: 0.01 beat 0.1 at every layer set and pooling measured on the
real corpora (about 2,600 rows per task to fit; with far fewer rows than features a larger value is safer)."""
HYBRID_MARGIN = 2.0
"""A ``fallback_margin`` for the hybrid: on training rows held out from the fit (the shared real corpora), the
smallest margin whose hybrid accuracy came within 0.01 of perplexity routing's (docs/benchmarks-history.md). Measured
at ``F`` = 1,280 features (the 4-layer H = 128 base, ``auto``/``mean_std``) and shrinkage 0.01: the distances'
scale, hence the margin's meaning, changes with ``F`` and the shrinkage, so it does not transfer automatically to
other models or settings - measure it again on held-out training rows."""
MAX_FEATURES = 16384
"""Feature dimensions refused (the shared ``F x F`` float64 matrix would take over 2 GB): choose fewer layers."""


def _layer_list(layer: Any) -> list[int] | None:
    """The integer indices of ``layer`` (``None`` for ``all``); raises ``ValueError`` on anything else."""
    if layer in (ALL_LAYERS, AUTO_LAYERS):
        return None
    items = [layer] if isinstance(layer, int) else list(layer) if isinstance(layer, (list, tuple)) else None
    if not items or any(not isinstance(i, int) or isinstance(i, bool) for i in items):
        raise ValueError(
            f"routing.layer must be a hidden_states index (-1: last), a list of them, 'all' or 'auto', got {layer!r}"
        )
    return items


def layer_indices(layer: Any, count: int, hidden: int | None = None, pooling: str = DEFAULT_POOLING) -> list[int]:
    """The ``hidden_states`` indices ``layer`` names, for a model with ``count`` hidden states of size ``hidden``.

    ``auto``: every hidden state while ``count x hidden x (2 for two-part poolings)`` <= :data:`AUTO_FEATURES`
    (always, when ``hidden`` is not given), else the last one.
    """
    items = _layer_list(layer)
    if items is None:
        per_layer = (hidden or 0) * (1 if pooling in ("mean", "last") else 2)
        if layer == AUTO_LAYERS and count * per_layer > AUTO_FEATURES:
            return [count - 1]
        return list(range(count))
    for i in items:
        if not -count <= i < count:
            raise ValueError(f"routing.layer {i} is out of range: the model has hidden_states 0..{count - 1}")
    return items


def validate_prototype(layer: int, pooling: str, estimator: str, shrinkage: float) -> None:
    """Raise ``ValueError`` naming a bad prototype-routing setting."""
    _layer_list(layer)
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
    if pooling == "mean_std":
        var = ((hidden - mean[:, None]) ** 2 * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return torch.cat([mean, var.sqrt()], dim=1)
    return torch.cat([mean, last], dim=1)


@torch.no_grad()
def base_features(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, layer: Any, pooling: str
) -> torch.Tensor:
    """Pooled ``hidden_states`` of ``model`` on ``ids``, of each layer ``layer`` names, concatenated.

    The caller turns the adapters off. Raises ``ValueError`` for a layer out of range, or features of more
    than :data:`MAX_FEATURES` dimensions.
    """
    return base_features_at(model, ids, mask, layer, pooling)[0]


@torch.no_grad()
def base_features_at(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, layer: Any, pooling: str
) -> tuple[torch.Tensor, list[int]]:
    """:func:`base_features` and the ``hidden_states`` indices ``layer`` resolved to (``auto``: per model)."""
    out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states
    indices = layer_indices(layer, len(hidden), hidden[0].shape[-1], pooling)
    _check_width(len(indices), hidden[0].shape[-1], layer, pooling)
    return torch.cat([pool(hidden[i], mask, pooling) for i in indices], dim=1), indices


def _check_width(layers: int, hidden: int, layer: Any, pooling: str) -> None:
    width = layers * hidden * (1 if pooling in ("mean", "last") else 2)
    if width > MAX_FEATURES:
        raise ValueError(
            f"routing features of {width} dimensions (routing.layer {layer!r}: {layers} hidden states x hidden size "
            f"{hidden} x pooling {pooling!r}) exceed {MAX_FEATURES}: set routing.layer to one or a few layers "
            "(e.g. -1, or [-3, -2, -1]) or pooling: mean"
        )


def check_model(config: Any, layer: Any, pooling: str) -> None:
    """Refuse, before any training, settings the model's config makes invalid (a layer out of range, too wide).

    ``config``: a Hugging Face config with ``hidden_size`` and ``num_hidden_layers`` (others: nothing checked
    here; :func:`base_features` checks at the first routing forward).
    """
    hidden, count = getattr(config, "hidden_size", None), getattr(config, "num_hidden_layers", None)
    if not isinstance(hidden, int) or not isinstance(count, int):
        return
    _check_width(len(layer_indices(layer, count + 1, hidden, pooling)), hidden, layer, pooling)


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
        layer: Index into the model's ``hidden_states`` (0: embeddings, -1: last layer), a list of indices,
            ``all`` (every hidden state) or ``auto`` (:data:`DEFAULT_LAYER`); the pooled vectors of the layers
            are concatenated. The indices it resolves to at the first forward (the fit) are kept in
            ``indices`` and stored with the statistics: later features are read at those.
        pooling: One of :data:`POOLINGS`.
        estimator: ``mahalanobis`` (shared shrunk covariance) or ``nearest`` (Euclidean nearest mean).
        shrinkage: ``a`` in ``(1 - a) S + a tr(S)/H I``.
    """

    def __init__(
        self,
        prefix_tokens: int,
        layer: int | list[int] | str = DEFAULT_LAYER,
        pooling: str = DEFAULT_POOLING,
        estimator: str = "mahalanobis",
        shrinkage: float = DEFAULT_SHRINKAGE,
    ) -> None:
        validate_prototype(layer, pooling, estimator, shrinkage)
        check_number("routing.prefix_tokens", prefix_tokens, 2, integer=True)
        self.prefix_tokens, self.layer, self.pooling = prefix_tokens, plain_layer(layer), pooling
        self.estimator, self.shrinkage = estimator, shrinkage
        self.tasks: list[str] = []
        # The hidden_states indices ``layer`` resolved to at the fit (``auto`` depends on the model): features are
        # read at these afterwards, so the width always matches the statistics (None: not resolved yet).
        self.indices: list[int] | None = None
        self.counts: torch.Tensor | None = None  # (K,) float64
        self.sums: torch.Tensor | None = None  # (K, H) float64
        self.second: torch.Tensor | None = None  # (H, H) float64, over every task's rows
        self._solver: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (means, precision) cache, on CPU
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # its copy per device

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
        layer = self.layer if self.indices is None else self.indices
        feats, indices = base_features_at(model, ids[:, :p], None if mask is None else mask[:, :p], layer, self.pooling)
        if self.indices is None:
            self.indices = indices
        return feats

    @staticmethod
    def row_sums(
        features: torch.Tensor, real: torch.Tensor | None = None, into: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[count, sum x, sum x x^T]`` of the real rows, flattened into one float64 vector (for one all-reduce).

        ``into``: an earlier result, to which these rows' sums are added in place and which is returned (the
        ``F x F`` block is accumulated by one ``addmm_``: no ``F x F`` temporary per batch).
        """
        x = features.double()
        if real is not None:
            x = x * real.to(x.dtype)[:, None]
        count = float(x.shape[0] if real is None else real.sum())
        f = x.shape[1]
        if into is None:
            into = x.new_zeros(1 + f + f * f)
        elif into.shape != (1 + f + f * f,) or into.dtype != torch.float64:
            raise ValueError(f"row sums of {f} features cannot be added to a vector of {tuple(into.shape)}")
        into[0] += count
        into[1 : 1 + f] += x.sum(dim=0)
        into[1 + f :].view(f, f).addmm_(x.T, x)
        return into

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
        self._solver, self._on_device = None, {}

    def configure(self, estimator: str, shrinkage: float) -> None:
        """Change how the stored statistics are read (the statistics themselves stay)."""
        validate_prototype(self.layer, self.pooling, estimator, shrinkage)
        self.estimator, self.shrinkage, self._solver, self._on_device = estimator, shrinkage, None, {}

    # ------------------------------------------------------------------ choosing
    def _means_precision(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Means and precision, solved once on the CPU in float64 and kept on ``device`` (no copy per batch)."""
        if device not in self._on_device:
            means, precision = self._solve()
            self._on_device[device] = (means.to(device), None if precision is None else precision.to(device))
        return self._on_device[device]

    def _solve(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Means and the shrunk covariance's inverse (``None`` for ``nearest``: the identity, never built).

        Memory: besides ``second``, two ``F x F`` float64 buffers (the covariance, built in place, and its
        Cholesky factor) and the precision - no identity matrix, no eigendecomposition unless the Cholesky
        factorization fails (only possible with ``shrinkage: 0`` on a singular covariance: then ``pinv``).
        """
        if self._solver is None:
            means = self.sums / self.counts[:, None]  # (K, F)
            precision = None
            if self.estimator != "nearest":
                dof = max(float(self.counts.sum()) - len(self.tasks), 1.0)
                cov = self.second.clone().addmm_(means.T * self.counts, means, alpha=-1.0).div_(dof)
                scale = float(torch.trace(cov)) / means.shape[1]
                scale = scale if scale > 0 else 1.0
                cov.mul_(1 - self.shrinkage).diagonal().add_(self.shrinkage * scale)
                factor, info = torch.linalg.cholesky_ex(cov)
                if int(info) == 0:  # positive definite (always with shrinkage > 0 and a non-zero trace)
                    del cov
                    precision = torch.cholesky_inverse(factor)  # the solve against the identity, without it
                else:
                    del factor
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
        means, precision = self._means_precision(features.device)
        if features.shape[1] != self.sums.shape[1]:
            raise ValueError(
                f"routing features of {features.shape[1]} dimensions, but the statistics have {self.sums.shape[1]} "
                f"(fitted with {self.settings()}, hidden_states {self.indices}): route with the model and "
                "settings the statistics were fitted with"
            )
        idx = torch.tensor([self.tasks.index(t) for t in names], device=features.device)
        x, m = features.double(), means[idx]  # (B, H), (K, H), on the features' device
        # (x - m)^T S^-1 (x - m) expanded: one (B, H) x (H, H) product per batch instead of one per task.
        xs, ms = (x, m) if precision is None else (x @ precision, m @ precision)
        return (xs * x).sum(dim=1, keepdim=True) - 2 * xs @ m.T + (ms * m).sum(dim=1)[None]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Plain values and tensors (``torch.load(weights_only=True)`` reads them back bit for bit)."""
        return {
            "settings": self.settings(),
            "tasks": list(self.tasks),
            "counts": self.counts,
            "sums": self.sums,
            "second": self.second,
            "indices": None if self.indices is None else list(self.indices),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the settings must agree: the statistics depend on them)."""
        if state.get("tasks"):
            check_same_fit(dict(state.get("settings", {})), self.settings())
        self.tasks = list(state.get("tasks", []))
        self.counts, self.sums, self.second = state.get("counts"), state.get("sums"), state.get("second")
        indices = state.get("indices")  # absent in statistics saved before it was stored: resolved again
        self.indices = None if indices is None else [int(i) for i in indices]
        self._solver, self._on_device = None, {}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PrototypeRouter:
        """A router with the saved settings and statistics."""
        router = cls(**state["settings"])
        router.load_state_dict(state)
        return router


FIT_SETTINGS = ("prefix_tokens", "layer", "pooling")
"""What a router's statistics depend on: statistics are reused only under the same values of these."""


def check_same_fit(fitted: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Raise ``ValueError`` when statistics fitted with ``fitted`` settings cannot serve ``wanted`` ones.

    The estimator and shrinkage may differ (they are applied to the same statistics); the
    :data:`FIT_SETTINGS` may not.
    """
    have = {k: plain_layer(fitted[k]) if k == "layer" and k in fitted else fitted.get(k) for k in FIT_SETTINGS}
    want = {k: plain_layer(wanted[k]) if k == "layer" and k in wanted else wanted.get(k) for k in FIT_SETTINGS}
    if have != want:
        raise ValueError(
            f"the routing statistics were fitted with {have}; this run has {want} "
            "(use the original settings or a new run dir)"
        )


def plain_layer(layer: Any) -> int | list[int] | str:
    """``layer`` as stored and compared: an int, ``all``, or a list of ints (a tuple becomes a list)."""
    _layer_list(layer)
    return list(layer) if isinstance(layer, (list, tuple)) else layer


def margins(scores: torch.Tensor) -> torch.Tensor:
    """``(B,)`` half the gap between each row's two lowest scores (``inf`` with one candidate).

    For squared Mahalanobis distances it is the log-odds of the nearest task against the runner-up
    (LDA, equal priors): the hybrid falls back to perplexity routing where it is below ``fallback_margin``.
    """
    if scores.shape[1] < 2:
        return torch.full(scores.shape[:1], float("inf"), dtype=scores.dtype, device=scores.device)
    low = scores.topk(2, dim=1, largest=False).values
    return (low[:, 1] - low[:, 0]) / 2


def _prefixes(rows: Any, indices: Sequence[int], prefix: int) -> list[list[int]]:
    """The first ``prefix`` token ids of ``rows[i]`` for ``i`` in ``indices``.

    ``rows``: a ``datasets.Dataset`` with an ``input_ids`` column (only these rows are read) or a sequence
    of token-id sequences.
    """
    if hasattr(rows, "column_names"):
        picked = rows[list(indices)]["input_ids"] if indices else []
    else:
        picked = [rows[i] for i in indices]
    return [list(r[:prefix]) for r in picked]


@torch.no_grad()
def local_task_sums(
    router: PrototypeRouter,
    model: nn.Module,
    token_rows: Any,
    batch_size: int,
    device: torch.device,
    pad: int,
    world: int = 1,
    rank: int = 0,
) -> torch.Tensor:
    """This process's :meth:`PrototypeRouter.row_sums` over rows ``rank, rank + world, ...`` of ``token_rows``.

    ``token_rows``: a ``datasets.Dataset`` with an ``input_ids`` column (read one batch at a time) or a
    sequence of token-id sequences. Every process runs as many batches (a short shard repeats a row that
    counts for nothing), so sharded models see matching collectives; sum the result over processes. The
    caller turns the adapters off.
    """
    n, p = len(token_rows), router.prefix_tokens
    if n == 0:
        raise ValueError("no training rows to fit the routing statistics on")
    mine = list(range(rank, n, world))
    batches = -(-len(range(0, n, world)) // batch_size)
    real = [True] * len(mine) + [False] * (batches * batch_size - len(mine))
    mine += [mine[-1] if mine else 0] * (len(real) - len(mine))
    total = None
    for b in range(batches):
        ids, mask = right_padded(_prefixes(token_rows, mine[b * batch_size : (b + 1) * batch_size], p), pad, device)
        flags = torch.tensor(real[b * batch_size : (b + 1) * batch_size], device=device)
        total = router.row_sums(router.features(model, ids, mask), flags, into=total)  # in place after the first
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
    meta = {
        "settings": json.dumps(router.settings()),
        "tasks": json.dumps(router.tasks),
        "indices": json.dumps(router.indices),
    }
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
        {
            "settings": json.loads(meta["settings"]),
            "tasks": json.loads(meta["tasks"]),
            "indices": json.loads(meta.get("indices", "null")),
            **state,
        }
    )


@torch.no_grad()
def fit_missing_tasks(
    router: PrototypeRouter,
    model: nn.Module,
    activate: Callable[[str | None], None],
    train_rows: dict[str, Any],
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
