"""Every access to a private attribute of Lightning, torch or datasets, in one place.

Why: these internals have no public equivalent, and they move between releases. Keeping each behind
one small named function means an upgrade breaks this file and its test (``tests/test_compat.py``
has one test per accessor), loudly, instead of a callback somewhere failing silently. Each accessor
names the versions it was checked against; update the note when you re-check.

Checked against: lightning 2.6.6, torch 2.13.0, datasets 4.x (the versions ``.ci/run`` installs).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

# ---------------------------------------------------------------------- Lightning trainer loops


def logging_step(trainer: Any) -> int:
    """The step number Lightning logs with: optimizer steps taken by this trainer's fit loop.

    ``fit_loop.epoch_loop._batches_that_stepped`` (lightning 2.0-2.6). The stage driver carries it
    across the per-stage trainers so that TensorBoard shows one continuous run; ``global_step``
    cannot be used because it restarts at 0 with every trainer and is what ``max_steps`` counts.
    """
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def set_logging_step(trainer: Any, step: int) -> None:
    """Make ``trainer`` log its next optimizer step as ``step`` (see :func:`logging_step`)."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = int(step)


def saved_logging_step(checkpoint: dict[str, Any]) -> int:
    """The logging step stored in a Lightning checkpoint's loop state (lightning 2.0-2.6 layout)."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    return int(loop["_batches_that_stepped"])


def saved_train_loader_states(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The training dataloaders' saved states in a Lightning checkpoint (lightning 2.0-2.6 layout)."""
    loop = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})
    states = loop.get("combined_loader") or []
    return [s for s in states if isinstance(s, dict) and "batches" in s]


def is_accumulating(trainer: Any) -> bool:
    """Whether the batch that just ended accumulates gradients without an optimizer step.

    ``fit_loop.epoch_loop._should_accumulate()`` (lightning 2.0-2.6). A checkpoint between
    micro-batches would drop the partial gradients, so mid-stage checkpoints wait for a step.
    """
    return bool(trainer.fit_loop.epoch_loop._should_accumulate())


def clear_received_sigterm(trainer: Any) -> None:
    """Tell Lightning's signal connector to forget a SIGTERM it recorded (``trainer._signal_connector``).

    lightning 2.0-2.6: with the flag set, the loops raise ``SIGTERMException`` (a ``SystemExit`` with
    code 0) at the next epoch end, without a checkpoint; the stage driver stops with a checkpoint
    instead. Missing attribute (a newer Lightning): nothing to clear, the driver's fallback still
    reports the stop as an interruption.
    """
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None and getattr(connector, "received_sigterm", False):
        connector.received_sigterm = False


@contextmanager
def quiet_lightning_info(quiet: bool = True) -> Iterator[None]:
    """Hide Lightning's info-level banners ("GPU available", tips) while a trainer is built.

    They go to the ``lightning.pytorch.utilities.rank_zero`` and ``lightning.fabric.utilities.rank_zero``
    loggers (lightning 2.0-2.6); the stage driver builds one trainer per stage and shows them once.
    """
    if not quiet:
        yield
        return
    loggers = [
        logging.getLogger(n) for n in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def silence_known_library_warnings() -> None:
    """Filter warnings that Lightning raises about itself and a user cannot act on.

    lightning 2.6 with torch 2.13: ``_pytree.py`` warns that ``isinstance(treespec, LeafSpec)`` is
    deprecated at every ``fit``; LightningCLI warns that ``args`` is meant for Python use when our
    dispatcher hands it the command line after the subcommand.
    """
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside a ``LightningOptimizer`` (its public ``optimizer`` property); others as is."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


# ---------------------------------------------------------------------- Lightning strategies and CLI


def resolve_auto_data_parallel_size(strategy: Any) -> None:
    """Make ``ModelParallelStrategy(data_parallel_size="auto")`` mean "every rank".

    ``strategy._data_parallel_size`` (lightning 2.4-2.6): Lightning's ``"auto"`` is one data-parallel
    group per node (tensor parallel inside a node); without tensor parallelism every rank shards.
    """
    if strategy._data_parallel_size == "auto":
        strategy._data_parallel_size = strategy.num_nodes * strategy.num_processes


# ---------------------------------------------------------------------- torch


def foreach_norm(tensors: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Per-tensor L2 norms in one fused kernel (``torch._foreach_norm``, torch 2.1-2.13).

    ``torch.nn.utils.clip_grad_norm_`` uses the same kernel; falling back to a Python loop keeps the
    result if it ever moves.
    """
    fused = getattr(torch, "_foreach_norm", None)
    if fused is not None:
        return list(fused(tensors, 2, dtype=dtype))
    return [torch.linalg.vector_norm(t, 2, dtype=dtype) for t in tensors]


def fused_optimizer_devices() -> list[str]:
    """Device types with fused optimizer kernels (``torch.utils._foreach_utils``, torch 2.4-2.13: cpu, cuda, ...).

    Falls back to ``["cuda"]`` if the helper moves: the fused path is then only chosen where it
    certainly exists.
    """
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:
        return ["cuda"]
    return list(_get_fused_kernels_supported_devices())


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module.compile()`` ran on ``module`` (torch 2.2+: it keeps the compiled call on the module)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def tensor_version(tensor: torch.Tensor) -> int:
    """The in-place version counter of ``tensor`` (``Tensor._version``, torch 1.x-2.13).

    Every in-place change (an optimizer step, ``copy_`` from a loaded state dict) increments it; CRMA's
    per-step factor cache (:mod:`crma_lightning.adapters.crma_batch`) uses it to never serve stale factors.
    """
    return int(tensor._version)


def refresh_fsdp2_gradient_dtypes(module: torch.nn.Module, required: bool = True) -> bool:
    """Re-run FSDP2's ``FSDPParamGroup._init_mp_dtypes`` on an FSDP2 unit; ``False`` if it cannot.

    torch 2.6-2.13: ``module._get_fsdp_state()._fsdp_param_groups`` (``_fsdp_param_group`` before 2.10).
    Why it is needed: :func:`crma_lightning.parallel.fsdp2.apply_fsdp2`.

    Raises:
        RuntimeError: With ``required``, when the internals are missing (a newer torch).
    """
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None and hasattr(state, "_fsdp_param_group"):
        single = state._fsdp_param_group
        groups = [single] if single is not None else []
    if groups is None or not all(hasattr(g, "_init_mp_dtypes") for g in groups):
        if required:
            raise RuntimeError(
                "this torch version's FSDP2 internals changed: cannot refresh gradient dtypes after "
                "requires_grad changes; run without fsdp_mixed_precision"
            )
        return False
    for group in groups:
        group._init_mp_dtypes()
    return True


# ---------------------------------------------------------------------- datasets


def dataset_fingerprint(dataset: Any) -> str:
    """The content fingerprint ``datasets`` keeps for a ``Dataset`` (``_fingerprint``, datasets 2.x-4.x)."""
    return str(dataset._fingerprint)
