"""Merged adapters: per-task LoRAs combined into one adapter that needs no routing (DESIGN §3.4).

Per LoRA layer, each task's update is ``D_t = s_t B_t A_t`` (``out x in``). Two merges:

* ``mean`` (task arithmetic with weight ``1/T``): ``D = (1/T) sum_t D_t``.
* ``ties`` (TIES-merging, Yadav et al. 2023): *trim* each ``D_t`` to its entries at least as large in
  magnitude as its ``k``-th largest (``k = density x size``), *elect* a sign per entry (the sign of the
  trimmed updates' sum), then *disjoint mean*: the mean of the trimmed entries that agree with the elected
  sign (zero where none do), times ``scale`` (λ).

The merge becomes a new LoRA adapter (:func:`add_merged_adapter`) that equals ``D`` exactly: ``mean`` as
the concatenated factors (rank ``T·r``); ``ties`` - not low-rank after trimming - as the SVD factors of
``D`` at rank ``min(out, in)`` of the widest layer (zero-padded where a layer is narrower), scaling 1.
So evaluation, ``export --format peft`` and ``--format merged`` all treat it like any other adapter.
Pure PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from crma_lightning.adapters import LoRAConfig, add_lora_adapter, lora_layers
from crma_lightning.checks import check_choice, check_number

MERGES = ("mean", "ties")
DEFAULT_DENSITY = 0.2
"""TIES' share of each task's update kept by the trim (the paper's k = 20 %)."""
MERGED_ADAPTER = "merged"


def check_merge(task_adapters: str, tasks: Sequence[str], density: float, min_tasks: int = 2) -> None:
    """Refuse a merge before any work: it needs per-task LoRAs, ``min_tasks`` tasks, no task named ``merged``.

    Shared by ``export --merge`` and ``evaluate --merge``.
    """
    if task_adapters != "per_task":
        raise ValueError(f"--merge merges per-task adapters; this run has task_adapters={task_adapters!r}")
    if len(tasks) < min_tasks:
        raise ValueError(f"--merge needs at least {min_tasks} trained tasks at that stage, got {list(tasks)}")
    if MERGED_ADAPTER in tasks:
        raise ValueError(f"--merge names its adapter {MERGED_ADAPTER!r}, which is one of this run's domains")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"--density {density} is invalid: expected a share in (0, 1]")


def task_delta(layer: nn.Module, name: str) -> torch.Tensor:
    """``s B A`` of adapter ``name`` in ``layer`` (float32, ``out x in`` in the factors' own orientation)."""
    return layer.lora_B[name].weight.float() @ layer.lora_A[name].weight.float() * layer.scaling[name]


def mean_merge(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Task-arithmetic mean of the updates."""
    return torch.stack(list(deltas)).mean(dim=0)


def ties_merge(deltas: Sequence[torch.Tensor], density: float = DEFAULT_DENSITY, scale: float = 1.0) -> torch.Tensor:
    """TIES-merging of the updates (trim to ``density``, elect signs, mean of the agreeing entries, ``x scale``)."""
    check_number("density", density, 0.0, 1.0)
    trimmed = []
    for delta in deltas:
        keep = max(1, round(density * delta.numel()))
        threshold = delta.abs().flatten().topk(keep).values[-1]  # the k-th largest magnitude
        trimmed.append(torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta)))
    stack = torch.stack(trimmed)  # (T, out, in)
    sign = torch.sign(stack.sum(dim=0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    count = agree.sum(dim=0)
    return scale * (stack * agree).sum(dim=0) / count.clamp_min(1)


def merged_deltas(
    model: nn.Module, adapters: Sequence[str], how: str, density: float = DEFAULT_DENSITY, scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """Per LoRA layer name, the merged update of ``adapters`` (``how``: ``mean`` or ``ties``).

    A merge of one adapter is that adapter (``mean``) or its trimmed update (``ties``): the merged model after
    the first stage of a run.
    """
    check_choice("merge", how, MERGES)
    if not adapters or len(set(adapters)) < len(adapters):
        raise ValueError(f"merging needs different task adapters, got {list(adapters)}")
    out = {}
    for name, layer in lora_layers(model):
        deltas = [task_delta(layer, a) for a in adapters]
        out[name] = mean_merge(deltas) if how == "mean" else ties_merge(deltas, density, scale)
    return out


@torch.no_grad()
def add_merged_adapter(
    model: nn.Module,
    adapters: Sequence[str],
    how: str,
    density: float = DEFAULT_DENSITY,
    scale: float = 1.0,
    name: str = MERGED_ADAPTER,
) -> dict[str, torch.Tensor]:
    """Add LoRA adapter ``name`` (inactive, frozen) equal to the merge of ``adapters``; returns the updates."""
    deltas = merged_deltas(model, adapters, how, density, scale)
    layers = list(lora_layers(model))
    first = layers[0][1].configs[adapters[0]]
    if how == "mean":
        rank = sum(layers[0][1].lora_A[a].weight.shape[0] for a in adapters)
    else:
        rank = max(min(d.shape) for d in deltas.values())
    config = LoRAConfig(r=rank, alpha=float(rank), dropout=0.0, target_modules=first.target_modules)
    add_lora_adapter(model, name, config, trainable=False)  # scaling alpha / r = 1
    for layer_name, layer in layers:
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        if how == "mean":
            count = len(adapters)
            a.copy_(torch.cat([layer.lora_A[t].weight for t in adapters]).to(a.dtype))
            b.copy_(torch.cat([layer.lora_B[t].weight * layer.scaling[t] / count for t in adapters], dim=1).to(b.dtype))
        else:
            u, s, vh = torch.linalg.svd(deltas[layer_name].double(), full_matrices=False)
            k = s.numel()
            a.zero_()
            b.zero_()
            a[:k] = vh.to(a.dtype)
            b[:, :k] = (u * s).to(b.dtype)
    return deltas
