"""Full (unsharded) copies of states and back: the gather/scatter helpers both FSDP versions share.

Checkpoints and adapter files always hold full tensors in the single-process layout, so a file
written by N processes (FSDP1, FSDP2, DDP) loads on M processes or on one. Pure torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from crma_lightning.parallel.dist import distribute_tensor, full_tensor, is_dtensor

_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_parameter_name(name: str) -> str:
    """``name`` without the segments FSDP1 / activation-checkpoint wrappers insert.

    FSDP1's ``named_parameters`` keeps them (outside ``summon_full_params``) while its state dict keys
    do not; stripping them makes both agree with the unwrapped model (and with checkpoints of it).
    """
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def gather_full_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """Full, detached CPU copies of the tensors of ``state``; sharded ``DTensor`` values are all-gathered.

    A collective when ``state`` holds a ``DTensor``: every rank must call it with the same keys in
    the same order (the module's own order; the state dicts of identical modules agree).
    """
    out: dict[str, Any] = {}
    for key, value in state.items():
        value = full_tensor(value) if isinstance(value, torch.Tensor) else value
        # clone(): on CPU, .cpu() would alias the live (or, under FSDP1's summon_full_params, soon freed) storage.
        out[key] = value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value
    return out


def shard_like(value: Any, param: Any) -> Any:
    """``value`` (a full tensor) as a ``DTensor`` laid out like ``param``; anything else unchanged.

    Every rank holds the full tensor, so each takes its own shard locally (``src_data_rank=None``):
    no communication.
    """
    if not (is_dtensor(param) and isinstance(value, torch.Tensor)) or is_dtensor(value):
        return value
    if tuple(value.shape) != tuple(param.shape):
        raise ValueError(f"shape mismatch: saved {tuple(value.shape)} vs model {tuple(param.shape)}")
    return distribute_tensor(
        value.to(device=param.device, dtype=param.dtype), param.device_mesh, param.placements, src_data_rank=None
    )


def load_full_state(module: nn.Module, state: Mapping[str, Any], strict: bool = True) -> Any:
    """Load full (unsharded) tensors into a possibly sharded module through its own ``load_state_dict``.

    The module's ``load_state_dict`` keeps its checks (``ContinualLM`` verifies the adapter keys);
    the values are converted to ``DTensor`` shards matching the parameters first.
    """
    params = dict(module.named_parameters())
    converted = {k: shard_like(v, params[k]) if k in params else v for k, v in state.items()}
    return module.load_state_dict(converted, strict=strict)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every sharded state tensor gathered (a collective under FSDP2).

    The result has the single-process layout (state keyed by parameter index), so a checkpoint
    written by N processes resumes on M. Pass the raw torch optimizer (see ``_compat.unwrap_optimizer``).
    """
    state = optimizer.state_dict()
    gathered = {idx: gather_full_state(dict(sorted(s.items()))) for idx, s in sorted(state["state"].items())}
    return {"state": gathered, "param_groups": state["param_groups"]}


def check_optimizer_layout(saved_groups: list[dict[str, Any]], n_params: int) -> None:
    """Raise ``ValueError`` unless a saved optimizer state has ``n_params`` parameters."""
    saved = sum(len(g["params"]) for g in saved_groups)
    if saved != n_params:
        raise ValueError(
            f"optimizer state does not match: the checkpoint has {saved} parameters, the optimizer {n_params}"
        )


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Load a full (single-process layout) optimizer state into an optimizer over DTensor-sharded parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    check_optimizer_layout(state["param_groups"], len(params))
    sharded = {
        idx: {k: shard_like(v, params[int(idx)]) if k != "step" else v for k, v in s.items()}
        for idx, s in state["state"].items()
    }
    optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})
