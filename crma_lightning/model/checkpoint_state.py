"""Adapter-only ``state_dict``: what a checkpoint of a module wrapping a frozen model holds.

A mixin of :class:`~crma_lightning.model.continual_lm.ContinualLM` that needs one thing from its host: the
wrapped model as ``self.model``. Checkpoints hold the adapters, anything trainable and the host's own
state outside ``model`` - never the frozen base weights. The adapter strategies
(:mod:`crma_lightning.parallel.strategies`) rely on it through the ``AdapterCheckpointing`` protocol.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from crma_lightning.adapters import adapter_parameter_names
from crma_lightning.parallel.gather import clean_parameter_name


class AdapterStateMixin:
    """``state_dict``/``load_state_dict`` limited to the adapters, trainable parameters and the host's own state.

    The host (an ``nn.Module``) provides ``model``: the wrapped model whose frozen weights are left out.
    """

    model: nn.Module

    def checkpoint_parameter_names(self) -> list[str]:
        """Names (in ``state_dict`` form) of what a checkpoint holds: adapters + anything trainable."""
        names = set(adapter_parameter_names(self.model)) | {
            n for n, p in self.model.named_parameters() if p.requires_grad
        }
        # FSDP1 units add `_fsdp_wrapped_module.` to parameter names but not to state dict keys.
        return [f"model.{clean_parameter_name(n)}" for n, _ in self.model.named_parameters() if n in names]

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Only the adapters and trainable parameters - never the frozen base weights."""
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        keep = {prefix + n for n in self.checkpoint_parameter_names()}
        # Prune only the wrapped model's frozen weights: a subclass's own parameters/buffers (outside
        # `self.model`) are kept, and `full` may be a destination shared with sibling modules.
        for key in [k for k in full if k.startswith(prefix + "model.") and k not in keep]:
            del full[key]
        return full

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load adapter weights; ``strict`` requires exactly the adapter/trainable keys (and a subclass's own)."""
        if strict:
            self.check_checkpoint_keys(state_dict)
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    def check_checkpoint_keys(self, state_dict: dict[str, Any]) -> None:
        """Raise ``ValueError`` unless ``state_dict`` has exactly this model's checkpoint keys.

        Expected: the adapter/trainable parameters (:meth:`checkpoint_parameter_names`) and a
        subclass's own state (:meth:`own_state_dict`); frozen base keys are tolerated.
        """
        expected = set(self.checkpoint_parameter_names()) | set(self.own_state_dict(keep_vars=True))
        unexpected = sorted(set(state_dict) - expected - self._base_keys())
        missing = sorted(expected - set(state_dict))
        if unexpected or missing:
            raise ValueError(
                f"checkpoint does not match this model's adapters: missing {missing[:5]} "
                f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)"
            )

    def own_state_dict(self, keep_vars: bool = False) -> dict[str, Any]:
        """The state outside the wrapped ``model``: a subclass's own parameters, buffers and submodules.

        Built without recursing into ``model``, whose ``state_dict`` under FSDP1 would gather every unit.
        """
        out: dict[str, Any] = {}
        for name, param in self._parameters.items():
            if param is not None:
                out[name] = param if keep_vars else param.detach()
        for name, buf in self._buffers.items():
            if buf is not None and name not in self._non_persistent_buffers_set:
                out[name] = buf if keep_vars else buf.detach()
        for name, child in self._modules.items():
            if name != "model" and child is not None:
                child.state_dict(destination=out, prefix=f"{name}.", keep_vars=keep_vars)
        return out

    def load_own_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load the entries of :meth:`own_state_dict` from ``state_dict`` without touching ``model``.

        Submodules load through their own ``load_state_dict`` (strict, so hooks and extra state
        apply); the module's direct parameters and buffers are copied in place.
        """
        with torch.no_grad():
            for name, value in list(self._parameters.items()) + list(self._buffers.items()):
                if value is not None and name in state_dict:
                    value.copy_(state_dict[name])
        for name, child in self._modules.items():
            if name != "model" and child is not None:
                prefix = f"{name}."
                child.load_state_dict({k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)})

    def _base_keys(self) -> set[str]:
        return {f"model.{clean_parameter_name(n)}" for n, _ in self.model.named_parameters()} | {
            f"model.{clean_parameter_name(n)}" for n, _ in self.model.named_buffers()
        }
