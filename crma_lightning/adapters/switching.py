"""Switch, freeze, merge and delete the named LoRA adapters of an adapted model; turn CRMA on or off.

Every LoRA layer keeps a bank of named adapters (one per task with ``task_adapters: per_task``); these
functions act on the same adapter in every layer at once and check the name first. Pure PyTorch.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from crma_lightning.adapters.crma import CRMABlock
from crma_lightning.adapters.inject import crma_adapters, lora_adapter_names, lora_layers
from crma_lightning.adapters.lora import LoRAConfig, check_adapter_name


def add_lora_adapter(model: nn.Module, name: str, config: LoRAConfig, trainable: bool = True) -> None:
    """Add LoRA adapter ``name`` to every LoRA layer (it does not become active)."""
    check_adapter_name(name)
    config.validate()
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("the model has no LoRA layers; attach_adapters() first")
    if name in layers[0][1].lora_A:
        raise ValueError(f"LoRA adapter {name!r} already exists; existing adapters: {lora_adapter_names(model)}")
    for _, layer in layers:
        layer.add_adapter(name, config)
        layer.set_trainable(name, trainable)


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Activate LoRA adapter ``name`` in every LoRA layer (``None``: LoRA off)."""
    existing = lora_adapter_names(model)
    if name is not None and name not in existing:
        raise ValueError(f"unknown LoRA adapter {name!r}; existing adapters: {existing}")
    for _, layer in lora_layers(model):
        layer.set_adapter(name)


def set_active_adapters(model: nn.Module, names: Sequence[str]) -> None:
    """Activate every LoRA adapter in ``names`` at once in every LoRA layer; their updates are summed.

    O-LoRA keeps all earlier task adapters active (and frozen) next to the new one. ``[]`` turns LoRA
    off; one name is the same as :func:`set_active_adapter`.
    """
    existing = lora_adapter_names(model)
    unknown = [n for n in names if n not in existing]
    if unknown:
        raise ValueError(f"unknown LoRA adapter(s) {unknown}; existing adapters: {existing}")
    for _, layer in lora_layers(model):
        layer.set_active_adapters(list(names))


def active_adapter_names(model: nn.Module) -> list[str]:
    """Names of the LoRA adapters active in the model (taken from the first LoRA layer; all layers agree)."""
    for _, layer in lora_layers(model):
        return layer.active_adapters
    return []


def set_adapter_trainable(model: nn.Module, name: str, trainable: bool) -> None:
    """Freeze or unfreeze LoRA adapter ``name`` everywhere."""
    existing = lora_adapter_names(model)
    if name not in existing:
        raise ValueError(f"unknown LoRA adapter {name!r}; existing adapters: {existing}")
    for _, layer in lora_layers(model):
        layer.set_trainable(name, trainable)


def delete_lora_adapter(model: nn.Module, name: str) -> None:
    """Delete LoRA adapter ``name`` everywhere."""
    existing = lora_adapter_names(model)
    if name not in existing:
        raise ValueError(f"unknown LoRA adapter {name!r}; existing adapters: {existing}")
    for _, layer in lora_layers(model):
        layer.delete_adapter(name)


def set_crma_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn every CRMA block on or off (off: exactly the base decoder layers)."""
    for module in model.modules():
        if isinstance(module, CRMABlock):
            module.enabled = enabled


def set_crma_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze or unfreeze every CRMA adapter."""
    for _, module in crma_adapters(model):
        module.requires_grad_(trainable)


def merge_lora(model: nn.Module, name: str | None = None) -> None:
    """Fold LoRA adapter ``name`` (default: the active one) into the base weights."""
    for _, layer in lora_layers(model):
        layer.merge(name)


def unmerge_lora(model: nn.Module) -> None:
    """Undo :func:`merge_lora`."""
    for _, layer in lora_layers(model):
        layer.unmerge()
