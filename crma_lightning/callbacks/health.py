"""CRMA health for logging: spectral norm of the mixing matrices, gates, Sinkhorn errors, under any layout.

The values come from :meth:`CRMAAdapter.health` itself, so they are defined in one place; this module
only gathers the tiny mixing/gate parameters when they are sharded (FSDP2 ``DTensor``, FSDP1 units).
"""

from __future__ import annotations

import torch

from crma_lightning.adapters import CRMAAdapter, crma_adapters
from crma_lightning.parallel import fsdp1
from crma_lightning.parallel.dist import full_tensor, is_dtensor

HEALTH_KEYS = ("spectral_norm", "gate", "row_sum_error", "col_sum_error", "sinkhorn_residual")
# Logged reductions of the per-adapter health values: (key, health field, reduction).
HEALTH_METRICS = (
    ("crma/spectral_norm_max", "spectral_norm", "max"),
    ("crma/gate_mean", "gate", "mean"),
    ("crma/gate_max", "gate", "max"),
    ("crma/row_sum_error_max", "row_sum_error", "max"),
    ("crma/col_sum_error_max", "col_sum_error", "max"),
    ("crma/sinkhorn_residual_max", "sinkhorn_residual", "max"),
)


class _GatheredCRMA:
    """A CRMA adapter's tiny mixing/gate parameters gathered from their FSDP2 shards.

    Reuses :class:`CRMAAdapter`'s own maths, so the health values are defined in one place.
    """

    mixing = CRMAAdapter.mixing
    gate = CRMAAdapter.gate
    health = CRMAAdapter.health

    def __init__(self, adapter: CRMAAdapter) -> None:
        self.config = adapter.config
        self.mix_logits = full_tensor(adapter.mix_logits)
        self.gate_logit = full_tensor(adapter.gate_logit)


def crma_health_vector(module: torch.nn.Module) -> torch.Tensor | None:
    """The :data:`HEALTH_METRICS` reductions over every CRMA adapter of ``module``, as one device tensor.

    ``None`` when ``module`` has no CRMA adapters. Sharded (FSDP2) adapters are gathered first, which is
    a collective: call it on every rank then.
    """
    adapters = [a for _, a in crma_adapters(module)]
    if not adapters:
        return None
    with torch.no_grad():
        rows = []
        for adapter in adapters:
            sharded = is_dtensor(adapter.mix_logits)
            health = (_GatheredCRMA(adapter) if sharded else adapter).health()
            rows.append(torch.stack([health[k].float().reshape(()) for k in HEALTH_KEYS]))
        table = torch.stack(rows)  # (adapters, fields)
        out = []
        for _, field, reduction in HEALTH_METRICS:
            column = table[:, HEALTH_KEYS.index(field)]
            out.append(column.max() if reduction == "max" else column.mean())
        return torch.stack(out)


def fsdp1_crma_health_vector(module: torch.nn.Module, compute: bool) -> torch.Tensor | None:
    """:func:`crma_health_vector` under FSDP1, where flattened shards do not hold whole matrices.

    A collective: every rank unshards the CRMA adapters' own units onto rank 0 only; ranks with
    ``compute`` (rank 0) compute the vector, the others return ``None``.
    """
    with fsdp1.crma_units_unsharded(module) as any_crma:
        return crma_health_vector(module) if any_crma and compute else None


def has_sharded_crma(module: torch.nn.Module) -> bool:
    """Whether the CRMA adapters of ``module`` are FSDP2 ``DTensor`` shards (gathering them is a collective)."""
    return any(is_dtensor(a.mix_logits) for _, a in crma_adapters(module))
