"""FSDP1 (``FullyShardedDataParallel``) for a ``ContinualLM``'s model: units, gathering, optimizer state.

Called by :class:`~crma_lightning.parallel.fsdp1_strategy.AdapterFSDPStrategy` (and, with a warning,
under Lightning's plain ``FSDPStrategy``) from ``ContinualLM.configure_model``. Every function that
unshards is a collective: every rank calls it with the same arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from crma_lightning.adapters import CRMAAdapter, CRMABlock, find_decoder_layers, lora_layers
from crma_lightning.parallel.dist import global_rank
from crma_lightning.parallel.gather import check_optimizer_layout, clean_parameter_name
from crma_lightning.parallel.rank0_init import fill_from_rank0, fsdp1_rank0_kwargs, full_state_on_rank0


def apply_fsdp1(
    model: nn.Module,
    activation_checkpointing: bool = False,
    init_on_rank0: bool = False,
    device: torch.device | None = None,
) -> nn.Module:
    """Wrap adapters, blocks and the root as FSDP1 units; returns the wrapped root.

    Call inside Lightning's ``FSDPStrategy.model_sharded_context`` (``configure_model`` is), where
    ``torch.distributed.fsdp.wrap.wrap`` builds ``FullyShardedDataParallel`` units with the strategy's
    settings; outside it ``wrap`` is a no-op. The PEFT recipe: FSDP1 flattens the parameters of a unit
    into one ``FlatParameter`` and allocates a gradient for all of it when any of them trains, so each
    LoRA factor (``lora_A[name]``, ``lora_B[name]``) and each CRMA adapter is its own unit and the
    frozen base weights of a block are in a separate one - frozen and trainable parameters never
    share a flat parameter, and no gradient memory is spent on frozen weights. Per-task adapters
    change ``requires_grad`` between stages; with ``use_orig_params=True`` (Lightning's default)
    FSDP1 re-derives each flat parameter's ``requires_grad`` from its original parameters before
    every forward.

    Do not also set the strategy's ``auto_wrap_policy`` (the wrapping is done here). Use it with
    :class:`~crma_lightning.parallel.fsdp1_strategy.AdapterFSDPStrategy`, whose checkpoints gather only the
    adapter units (:func:`fsdp1_gather_params`).

    With ``init_on_rank0`` (the model is complete on rank 0 only, on the meta device elsewhere), every unit
    is allocated on ``device`` and filled from rank 0 once the root is wrapped (:mod:`.rank0_init`). A collective.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import wrap as plain_wrap

    if isinstance(model, FullyShardedDataParallel):
        return model  # already wrapped by an earlier stage's trainer
    device = device or torch.device("cpu")
    extra = fsdp1_rank0_kwargs(device) if init_on_rank0 else {}
    full_state = full_state_on_rank0(model, global_rank()) if init_on_rank0 else None

    def wrap(module: nn.Module, **kwargs: Any) -> nn.Module:
        return plain_wrap(module, **extra, **kwargs)

    for _, layer in list(lora_layers(model)):  # list: the loop replaces modules of the tree it walks
        for bank in (layer.lora_A, layer.lora_B):
            for name in list(bank):
                # No mixed precision for adapter units (here and for CRMA below): the adapters keep
                # float32 weights and math, and LoRA casts its input to its weights' dtype itself
                # (under a bf16 policy the unit's weights would be bf16 while its input is float32).
                bank[name] = wrap(bank[name], mixed_precision=None)
    _, layers = find_decoder_layers(model)
    for i, block in enumerate(layers):
        if isinstance(block, CRMABlock):
            # CRMA's Sinkhorn and norm constraints run on float32 parameters by design (as under FSDP2).
            block.crma = wrap(block.crma, mixed_precision=None)
        if activation_checkpointing:
            from torch.distributed._composable import checkpoint

            checkpoint(block)
        layers[i] = wrap(block)
    root = wrap(model)
    if full_state is not None:
        fill_from_rank0(root, full_state, device)
    return root


def has_fsdp1_modules(module: nn.Module) -> bool:
    """Whether any submodule of ``module`` is an FSDP1 ``FullyShardedDataParallel`` unit."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules())


def fsdp1_units_holding(model: nn.Module, names: Iterable[str]) -> list[tuple[nn.Module, str, list[str]]]:
    """``(unit, its path, its names)`` for the FSDP1 units whose flat parameter holds one of ``names``.

    ``model`` must contain the FSDP root. A parameter belongs to the innermost
    ``FullyShardedDataParallel`` unit around the module that registers it. Units come in module
    order, the same on every rank: the order in which the collectives over them must run. Raises
    ``KeyError`` (before any collective) for a name that is not a parameter of ``model``.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    wanted, units, found = set(names), {}, set()

    def visit(module: nn.Module, prefix: str, unit: tuple[nn.Module, str] | None) -> None:
        if isinstance(module, FullyShardedDataParallel):
            unit = (module, prefix.rstrip("."))
        for pname, _ in module.named_parameters(prefix=prefix.rstrip("."), recurse=False):
            name = clean_parameter_name(pname)
            if name in wanted and name not in found:
                found.add(name)
                if unit is not None:
                    units.setdefault(id(unit[0]), (*unit, []))[2].append(name)
        for cname, child in module.named_children():
            visit(child, f"{prefix}{cname}.", unit)

    visit(model, "", None)
    missing = sorted(wanted - found)
    if missing:
        raise KeyError(f"no parameter named {missing[:3]} ({len(missing)} in all) in the model")
    return list(units.values())


def init_fsdp1_root(model: nn.Module) -> list[nn.Module]:
    """Lazily initialise the FSDP1 root of ``model``; returns its units in module order.

    Call before unsharding inner units: ``summon_full_params`` on a unit lazily initialises it as a
    root if the real root has not been initialised yet (no forward has run).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    units = [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]
    if units:
        units[0].check_is_root()
    return units


def _units_for(model: nn.Module, names: Iterable[str]) -> list[tuple[nn.Module, str, list[str]]]:
    holding = fsdp1_units_holding(model, names)  # raises for unknown names before any collective
    init_fsdp1_root(model)
    return holding


def shard_group(model: Any) -> Any:
    """The process group over which FSDP1 shards ``model``'s gradients; ``None`` if it is not FSDP1.

    The group of the first unit: the whole world, or the intra-node group under ``HYBRID_SHARD``.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    for module in model.modules() if isinstance(model, nn.Module) else ():
        if isinstance(module, FullyShardedDataParallel):
            return module.process_group
    return None


@contextmanager
def crma_units_unsharded(model: nn.Module) -> Iterator[bool]:
    """Unshard the CRMA adapters' own units onto rank 0 for reading (a collective); yields whether any exist.

    FSDP1 flattens a unit's parameters, so a shard does not hold whole matrices; the CRMA health needs
    them. :func:`apply_fsdp1` gives every adapter a unit of its own, so this gathers a few tiny tensors.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units = [u for u in init_fsdp1_root(model) if isinstance(u.module, CRMAAdapter)]
    with ExitStack() as stack:
        for unit in units:
            stack.enter_context(FSDP.summon_full_params(unit, recurse=False, writeback=False, rank0_only=True))
        yield bool(units)


def fsdp1_gather_params(model: nn.Module, names: Iterable[str], rank0_only: bool = True) -> dict[str, torch.Tensor]:
    """Full CPU copies of the named parameters of an FSDP1 model; ``{}`` on ranks > 0 with ``rank0_only``.

    A collective: every rank must call it with the same names. Only the units that hold the names are
    all-gathered (``summon_full_params(unit, recurse=False)``), one at a time: for adapter names that
    is the adapters' own units, never the frozen base - which is why :func:`apply_fsdp1` gives every
    adapter a unit of its own. Needs ``use_orig_params=True`` (Lightning's default), under which the
    original parameters hold the full tensors inside ``summon_full_params``.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    names = list(names)
    gathered: dict[str, torch.Tensor] = {}
    keep = global_rank() == 0 or not rank0_only
    for unit, path, unit_names in _units_for(model, names):
        on_cpu = all(p.device.type == "cpu" for p in unit.parameters())
        # offload_to_cpu only from an accelerator: with CPU parameters torch's offload path crashes.
        with FullyShardedDataParallel.summon_full_params(
            unit, recurse=False, writeback=False, rank0_only=rank0_only, offload_to_cpu=not on_cpu
        ):
            if keep:
                params = _full_names(unit, path)
                for name in unit_names:
                    # clone: on CPU, .cpu() would alias storage that is freed when the context exits.
                    gathered[name] = params[name].detach().to("cpu", copy=True)
    return {n: gathered[n] for n in names if n in gathered}


def fsdp1_load_params(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Write full tensors into the named parameters of an FSDP1 model, unit by unit (a collective).

    Every rank passes the same ``values`` (full tensors); each unit is unsharded, updated and
    resharded (``summon_full_params(unit, recurse=False, writeback=True)``).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    for unit, path, unit_names in _units_for(model, values):
        with FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=True), torch.no_grad():
            params = _full_names(unit, path)
            for name in unit_names:
                param, value = params[name], values[name]
                if tuple(value.shape) != tuple(param.shape):
                    # Same values on every rank: every rank raises here, so no rank waits on a collective.
                    raise ValueError(f"{name}: saved shape {tuple(value.shape)} vs model {tuple(param.shape)}")
                param.copy_(value)


def _full_names(unit: nn.Module, path: str) -> dict[str, nn.Parameter]:
    """``unit``'s parameters by clean name relative to the model (``path``: the unit's own path in it)."""
    return {clean_parameter_name(n): p for n, p in unit.named_parameters(prefix=path)}


def _fsdp1_full_state_dict_type(module: nn.Module, rank0_only: bool) -> Any:
    """FSDP1's full state dict settings on every unit of ``module``.

    ``rank0_only``: saving gathers the optimizer state on rank 0 only; loading needs it on every
    rank. Gathered state goes to the CPU as it is gathered when the parameters are on an
    accelerator; on the CPU no offload is asked for, because ``offload_to_cpu`` with parameters
    already there crashes torch (observed: a segfault in FSDP1's state dict hooks).
    """
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    offload = any(p.device.type != "cpu" for p in module.parameters())
    return FSDP.state_dict_type(
        module,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=False),
        FullOptimStateDictConfig(offload_to_cpu=offload, rank0_only=rank0_only),
    )


def _optimizer_parameter_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Clean names of the optimizer's parameters, in optimizer order (the single-process indices)."""
    names = {id(p): clean_parameter_name(n) for n, p in module.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def fsdp1_full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state of FSDP1-sharded parameters, gathered on rank 0, in the single-process layout.

    A collective over the units whose parameters have optimizer state (the adapters). The result
    (rank 0; other ranks get no state) is keyed by parameter index like ``optimizer.state_dict()`` of
    an unsharded model, so a checkpoint written by N processes resumes in one.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    names = _optimizer_parameter_names(module, optimizer)
    with _fsdp1_full_state_dict_type(module, rank0_only=True):
        by_name = FSDP.optim_state_dict(module, optimizer).get("state", {})
    state = {
        i: {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in by_name[n].items()}
        for i, n in enumerate(names)
        if n in by_name
    }
    return {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}


def fsdp1_load_full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a single-process-layout optimizer state into an optimizer over FSDP1-sharded parameters."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    names = _optimizer_parameter_names(module, optimizer)
    check_optimizer_layout(state["param_groups"], len(names))
    by_name = {
        "state": {names[int(i)]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }
    with _fsdp1_full_state_dict_type(module, rank0_only=False):
        flat = FSDP.optim_state_dict_to_load(module, optimizer, by_name)
    optimizer.load_state_dict(flat)
