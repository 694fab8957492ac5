"""Sharding a ``ContinualLM``'s model: FSDP2 (``fully_shard``) and FSDP1 (``wrap``) unit layouts.

Called from ``ContinualLM.configure_model``; the strategy side (adapter-only sharded checkpoints,
padded evaluation) is in :mod:`crma_lightning.distributed`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from crma_lightning.adapters import CRMABlock, find_decoder_layers, lora_layers

# fp16 is left out on purpose: FSDP2's policy has no loss scaling, and fp16 gradients underflow without it.
MIXED_PRECISION_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------- FSDP2 (fully_shard)
def fsdp2_mixed_precision(name: str | None) -> Any:
    """``MixedPrecisionPolicy`` for ``name`` (``"bf16"``; ``None``: no policy).

    Parameters are all-gathered and computed in the low-precision dtype; gradients are reduced in
    float32, and the sharded parameters (hence the optimizer) stay in their own dtype - float32 for
    the adapters.
    """
    if name is None:
        return None
    if name not in MIXED_PRECISION_DTYPES:
        raise ValueError(
            f"fsdp_mixed_precision={name!r} is invalid: expected one of {sorted(MIXED_PRECISION_DTYPES)} or None"
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=MIXED_PRECISION_DTYPES[name], reduce_dtype=torch.float32)


def _float32_policy() -> Any:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)


def is_fsdp2_module(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was already applied to ``module``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def apply_fsdp2(
    model: nn.Module, mesh: Any, mixed_precision: str | None = None, activation_checkpointing: bool = False
) -> int:
    """``fully_shard`` every decoder block, then the root; returns how many modules were newly sharded.

    A block is the :class:`CRMABlock` wrapper when CRMA is attached, so each CRMA adapter is sharded
    (and all-gathered) together with its block - except under mixed precision, where the adapter gets a
    float32 unit of its own inside the block. LoRA factors live inside the block's linears and are
    sharded with it.
    Idempotent: the stage driver builds a new ``Trainer`` per stage and Lightning calls
    ``configure_model`` for every ``fit``/``validate``, so modules already sharded are skipped.

    Frozen base weights and trainable adapters share an FSDP2 unit without cost: FSDP2 keeps one
    ``DTensor`` per parameter and only allocates and reduce-scatters gradients of parameters that
    require them, re-reading ``requires_grad`` at every all-gather - so flipping it between stages
    (stage 2 trains adapter ``b`` while ``a`` is frozen) needs no re-wrapping. The one thing FSDP2
    fixes at the first forward, each unit's gradient dtypes, is refreshed on every call (see
    :func:`refresh_fsdp2_gradient_dtypes`).

    Args:
        model: The Hugging Face model (``ContinualLM.model``).
        mesh: A 1-D device mesh over the data-parallel ranks.
        mixed_precision: See :func:`fsdp2_mixed_precision`.
        activation_checkpointing: Recompute each block's activations in the backward pass (torch's
            composable ``checkpoint``, which keeps parameter names unchanged - checkpoints stay
            interchangeable with unsharded runs).
    """
    from torch.distributed.fsdp import fully_shard

    kwargs: dict[str, Any] = {"mesh": mesh}
    policy = fsdp2_mixed_precision(mixed_precision)
    if policy is not None:
        kwargs["mp_policy"] = policy
    _, layers = find_decoder_layers(model)
    count = 0
    for block in layers:
        if is_fsdp2_module(block):
            continue
        if policy is not None and isinstance(block, CRMABlock):
            # CRMA keeps float32 parameters under mixed precision: its Sinkhorn and norm constraints run in
            # float32 by design (the structural bound needs exact unit row/column sums), and its mixing
            # product needs one dtype. Its own unit (one small extra all-gather per block) keeps it so;
            # inputs stay in the compute dtype, and so does its output.
            fully_shard(block.crma, mesh=mesh, mp_policy=_float32_policy())
            count += 1
        if activation_checkpointing:
            from torch.distributed._composable import checkpoint

            checkpoint(block)
        fully_shard(block, **kwargs)
        count += 1
    if not is_fsdp2_module(model):
        fully_shard(model, **kwargs)
        count += 1
    refresh_fsdp2_gradient_dtypes(model, required=policy is not None)
    return count


def refresh_fsdp2_gradient_dtypes(model: nn.Module, required: bool = True) -> None:
    """Make FSDP2 re-derive each unit's gradient dtypes from the parameters that train *now*.

    Why: FSDP2 fixes a unit's original/reduce dtypes once, at its first forward, from the parameters
    that require grad at that moment (``FSDPParamGroup._init_mp_dtypes``, called from ``lazy_init``).
    In a continual run the first forward is the base-model evaluation, when most adapters are
    frozen; a unit with no trainable parameter then gets ``None`` for both, and under a mixed
    precision policy its gradients would later be reduced in bf16 and assigned to float32 parameters
    (``RuntimeError: attempting to assign a gradient with dtype BFloat16 ...``). Re-running that
    initialisation after ``requires_grad`` changed (every ``fit``, via ``configure_model``) fixes it.
    Without a mixed precision policy gradients already have the parameters' dtype and nothing changes.

    Uses FSDP2 internals (torch >= 2.6); with ``required`` a missing internal raises instead of
    failing later with the error above.
    """
    for module in model.modules():
        if not is_fsdp2_module(module):
            continue
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None and hasattr(state, "_fsdp_param_group"):
            groups = [state._fsdp_param_group] if state._fsdp_param_group is not None else []
        if groups is None or not all(hasattr(g, "_init_mp_dtypes") for g in groups):
            if required:
                raise RuntimeError(
                    "this torch version's FSDP2 internals changed: cannot refresh gradient dtypes after "
                    "requires_grad changes; run without fsdp_mixed_precision"
                )
            return
        for group in groups:
            group._init_mp_dtypes()


def data_parallel_mesh(mesh: Any) -> Any:
    """The data-parallel sub-mesh of Lightning's 2-D ``(data_parallel, tensor_parallel)`` mesh.

    Raises:
        ValueError: Tensor parallelism was requested; ``ContinualLM`` has no tensor-parallel plan.
    """
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"tensor_parallel_size={mesh['tensor_parallel'].size()} is not supported: ContinualLM shards "
            "with FSDP2 over the data-parallel dimension only; use tensor_parallel_size=1"
        )
    return mesh["data_parallel"] if "data_parallel" in names else mesh


# ---------------------------------------------------------------------- FSDP1 (FSDPStrategy)
def apply_fsdp1(model: nn.Module, activation_checkpointing: bool = False) -> nn.Module:
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
    :class:`~crma_lightning.fsdp1.AdapterFSDPStrategy`, whose checkpoints gather only the
    adapter units (:func:`fsdp1_gather_params`).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import wrap

    if isinstance(model, FullyShardedDataParallel):
        return model  # already wrapped by an earlier stage's trainer
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
    return wrap(model)


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def clean_parameter_name(name: str) -> str:
    """``name`` without the segments FSDP1 / activation-checkpoint wrappers insert.

    FSDP1's ``named_parameters`` keeps them (outside ``summon_full_params``) while its state dict keys
    do not; stripping them makes both agree with the unwrapped model (and with checkpoints of it).
    """
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


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


def fsdp1_units(model: nn.Module) -> list[nn.Module]:
    """The FSDP1 units of ``model`` (which must contain the root), in module order, root lazily initialised.

    Call before unsharding inner units: ``summon_full_params`` on a unit lazily initialises it as a
    root if the real root has not been initialised yet (no forward has run).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel

    units = [m for m in model.modules() if isinstance(m, FullyShardedDataParallel)]
    if units:
        units[0].check_is_root()
    return units


def _fsdp1_units(model: nn.Module, names: Iterable[str]) -> list[tuple[nn.Module, str, list[str]]]:
    holding = fsdp1_units_holding(model, names)  # raises for unknown names before any collective
    fsdp1_units(model)
    return holding


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
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    keep = rank == 0 or not rank0_only
    for unit, path, unit_names in _fsdp1_units(model, names):
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

    for unit, path, unit_names in _fsdp1_units(model, values):
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
    saved = sum(len(g["params"]) for g in state["param_groups"])
    if saved != len(names):
        raise ValueError(
            f"optimizer state does not match: the checkpoint has {saved} parameters, the optimizer {len(names)}"
        )
    by_name = {
        "state": {names[int(i)]: s for i, s in state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in state["param_groups"]],
    }
    with _fsdp1_full_state_dict_type(module, rank0_only=False):
        flat = FSDP.optim_state_dict_to_load(module, optimizer, by_name)
    optimizer.load_state_dict(flat)
