"""Optimizer parameter groups of an adapted model, and learning-rate schedules usable from YAML.

``model.init_args.lr_scheduler.class_path: crma_lightning.model.optim.WarmupCosine``. Pure torch.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from crma_lightning import _compat
from crma_lightning.adapters import crma_adapters, lora_layers

GROUP_NAMES = ("lora", "crma", "crma_structural", "crma_gate", "other")


def adapter_param_groups(
    model: nn.Module, params: Iterable[nn.Parameter], lrs: dict[str, float | None] | None = None
) -> list[dict[str, Any]]:
    """Split ``params`` into optimizer groups ``lora``, ``crma``, ``crma_structural``, ``crma_gate``, ``other``.

    ``crma_structural`` holds the CRMA mixing logits ``Λ``, ``crma_gate`` the gate logits ``γ``, ``crma``
    the other CRMA parameters (the projections ``R~``, ``W~``), ``lora``
    the LoRA factors, ``other`` anything else (a subclass's own parameters). Groups keep that order;
    empty ones are left out. ``lrs`` maps a group name to its own learning rate (``None``: the
    optimizer's).
    """
    structural = {id(m.mix_logits) for _, m in crma_adapters(model)}
    gates = {id(m.gate_logit) for _, m in crma_adapters(model)}
    crma = {id(p) for _, m in crma_adapters(model) for p in m.parameters()}
    lora = {id(p) for _, layer in lora_layers(model) for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters())}
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    for p in params:
        if id(p) in structural:
            key = "crma_structural"
        elif id(p) in gates:
            key = "crma_gate"
        elif id(p) in crma:
            key = "crma"
        else:
            key = "lora" if id(p) in lora else "other"
        groups[key].append(p)
    out = []
    for name, members in groups.items():
        if members:
            group: dict[str, Any] = {"params": members, "name": name}
            if (lrs or {}).get(name) is not None:
                group["lr"] = lrs[name]
            out.append(group)
    return out


FUSED_BY_DEFAULT = (torch.optim.Adam, torch.optim.AdamW)
"""Optimizers built with ``fused=True`` unless the configuration chose ``fused`` or ``foreach`` itself."""


def prefer_fused(optimizer: Optimizer) -> Optimizer:
    """The same optimizer with ``fused=True`` when it is an Adam/AdamW left at its implementation default.

    Why: the fused kernel updates every parameter in one call with no host sync (the default
    per-tensor path reads each parameter's step count with ``.item()``), and it skips a step on the
    device when told through ``found_inf`` - how the non-finite guard avoids a sync per step
    (:class:`~crma_lightning.model.nonfinite.NonFiniteGuard`). A configuration that sets ``fused`` or
    ``foreach``, other optimizer classes, and parameters the fused kernel does not take (not floating
    point, or on a device without it) keep the optimizer as built.
    """
    if type(optimizer) not in FUSED_BY_DEFAULT or optimizer.state:
        return optimizer
    defaults = optimizer.defaults
    if defaults.get("fused") is not None or defaults.get("foreach") is not None or defaults.get("differentiable"):
        return optimizer
    if any(g.get("fused") is not None or g.get("foreach") is not None for g in optimizer.param_groups):
        return optimizer
    devices = _compat.fused_optimizer_devices()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not all(p.is_floating_point() and p.device.type in devices for p in params):
        return optimizer
    groups = [{**{k: v for k, v in g.items() if k not in ("fused", "foreach")}, "params": g["params"]}
              for g in optimizer.param_groups]
    accepted = inspect.signature(type(optimizer).__init__).parameters  # AdamW's defaults hold more than it takes
    settings = {k: v for k, v in defaults.items() if k in accepted}
    return type(optimizer)(groups, **{**settings, "fused": True, "foreach": None})


class WarmupCosine(LambdaLR):
    """Linear warm-up to the base learning rate, then cosine decay to ``min_ratio`` of it.

    The driver builds a new optimizer and scheduler for every stage, so ``total_steps`` is the
    per-stage budget (``trainer.max_steps``) and every stage warms up again.

    Args:
        optimizer: The wrapped optimizer (LightningCLI passes it).
        warmup_steps: Steps of linear warm-up from 0.
        total_steps: Steps after which the rate stays at ``min_ratio``.
        min_ratio: Final learning rate as a fraction of the base rate.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, total_steps: int = 1000, min_ratio: float = 0.1):
        if warmup_steps < 0 or total_steps < 1 or not 0.0 <= min_ratio <= 1.0:
            raise ValueError(
                f"WarmupCosine(warmup_steps={warmup_steps}, total_steps={total_steps}, min_ratio={min_ratio}) is "
                "invalid: expected warmup_steps >= 0, total_steps >= 1 and 0 <= min_ratio <= 1"
            )

        def factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        super().__init__(optimizer, factor)
