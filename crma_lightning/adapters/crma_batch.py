"""CRMA's per-step factors for all blocks at once: one batched Sinkhorn, one batched normalisation.

Why: each :class:`~crma_lightning.adapters.crma.CRMAAdapter` computing its own ``M = Sinkhorn(Λ)``, its
spectral normalisations and (in the backward) the implicit Sinkhorn gradient is a few hundred tiny ops
per block and step; on a GPU each is a kernel launch, so CRMA's cost grew with depth, not with work.
None of these factors depends on the tokens, so all blocks' factors are computed together, once per model
forward, on stacked parameters (``(L, n, n)`` logits, ``(2L, n·k, d)`` projections): the op count of that
part no longer depends on the number of blocks. The math is the same functions on a leading batch
dimension - exact doubly-stochastic rounding, exact ``σ_max`` from the small Gram matrices - so the
bounds hold exactly as per block, and the result equals the per-block one up to float rounding.

How: :func:`precompute_step_factors` (called by a forward pre-hook on the model that
:func:`~crma_lightning.adapters.attach_adapters` registers) builds the batched factors with autograd and
remembers, per adapter, a stamp of its parameters (identity and in-place version counter). An adapter's
forward asks :func:`step_factors` for its ``(R, E)``; it gets them only while the stamp still matches and
the grad mode allows it, else ``None`` and it computes its own, as before; any optimizer step drops them
all (a fused optimizer updates parameters without bumping their versions). So an optimizer step, a loaded
state dict or a direct call of one block outside the model's forward can never see stale factors, and the
recomputation of a block under (non-reentrant) activation checkpointing reuses the step's factors, whose
gradient then flows through the one batched backward. Under FSDP2 the adapters' parameters are ``DTensor``
shards at the model's pre-forward: all of them are gathered in one collective first, and their gradients
reduce-scattered in one (:mod:`crma_lightning.adapters.crma_shards`). FSDP1's flat-parameter shards (views
into a unit's flat buffer, gathered by FSDP1 only inside the unit's forward) keep the per-block path.

Pure PyTorch; the cache is a weak mapping, so it never keeps adapters alive nor travels with a
``deepcopy``/``state_dict`` of the model.
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from crma_lightning import _compat
from crma_lightning.adapters.crma_shards import gather_stacked, is_fsdp2_shard
from crma_lightning.adapters.matrices import frobenius_normalize, gated_write, orthonormal_rows, spectral_normalize
from crma_lightning.adapters.sinkhorn import sinkhorn


@dataclass
class _StepGroup:
    """Batched factors of adapters with the same settings: ``reads`` ``(L, n·k, d)``, ``effective`` ``(L, d, n·k)``."""

    reads: torch.Tensor
    effective: torch.Tensor
    grad: bool
    per_dtype: dict[torch.dtype, tuple[tuple[torch.Tensor, ...], ...]] = field(default_factory=dict)

    def slices(self, dtype: torch.dtype) -> tuple[tuple[torch.Tensor, ...], ...]:
        """Per block, in ``dtype``: ``Rᵀ``, ``Eᵀ`` (with autograd) and ``R``, ``E`` (detached, for the backward).

        One cast and one unbind per dtype and step for all blocks (not two casts and transposes per block);
        all four are views of the same two stacked tensors.
        """
        if dtype not in self.per_dtype:
            reads, effective = self.reads.to(dtype), self.effective.to(dtype)
            self.per_dtype[dtype] = (
                reads.mT.unbind(0),
                effective.mT.unbind(0),
                reads.detach().unbind(0),
                effective.detach().unbind(0),
            )
        return self.per_dtype[dtype]


class _ReadWrite(torch.autograd.Function):
    """``h + (h R^T) E^T`` for ``h`` ``(T, d)``: two matmuls forward, four backward, no per-block transposes.

    Takes ``R^T``, ``E^T`` (views of this step's stacked factors, with autograd) and ``R``, ``E`` (the same
    values detached) so that neither pass needs a transpose of the factors; the gradients w.r.t. ``R^T`` and
    ``E^T`` flow into the one batched backward of all blocks' factors.
    """

    @staticmethod
    def forward(ctx, flat, read_t, effective_t, read, effective):
        s = flat.mm(read_t)  # (T, n·k)
        ctx.save_for_backward(flat, s, read, effective)
        return torch.addmm(flat, s, effective_t)  # the residual add folded into the write matmul

    @staticmethod
    def backward(ctx, grad):
        flat, s, read, effective = ctx.saved_tensors
        grad_s = grad.mm(effective)  # (T, n·k)
        grad_flat = torch.addmm(grad, grad_s, read) if ctx.needs_input_grad[0] else None
        grad_read_t = flat.mT.mm(grad_s) if ctx.needs_input_grad[1] else None  # (d, n·k)
        grad_effective_t = s.mT.mm(grad) if ctx.needs_input_grad[2] else None  # (n·k, d)
        return grad_flat, grad_read_t, grad_effective_t, None, None


# adapter -> (its group, its index in the group, the tensors it was built from, their stamp then)
_STEP: weakref.WeakKeyDictionary[nn.Module, tuple[_StepGroup, int, list[torch.Tensor], tuple]] = (
    weakref.WeakKeyDictionary()
)


def _forget_after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Drop every cached factor after any optimizer step.

    Why: the stamp's version counters do not see every update - torch's fused Adam/AdamW kernels (and
    other fused optimizers) write parameters in place without bumping them, so factors cached before a
    step (a training forward's, or an evaluation's) would be served after it.
    """
    if _STEP:
        _STEP.clear()


register_optimizer_step_post_hook(_forget_after_optimizer_step)


def _params(adapter: nn.Module) -> list[torch.Tensor]:
    return list(adapter.parameters(recurse=False))


def _stamp(tensors: list[torch.Tensor]) -> tuple:
    """What must not change for cached factors to stay valid: each tensor's identity, storage and version.

    For an FSDP2 shard, the ``DTensor``'s version and its local tensor's storage and version (an optimizer
    step or a loaded state dict changes the ``DTensor`` in place, or replaces the parameter).
    """
    stamp = []
    with torch.no_grad():  # to_local without an autograd node
        for p in tensors:
            local = p.to_local() if is_fsdp2_shard(p) else p
            stamp.append((id(p), local.data_ptr(), _compat.tensor_version(p), _compat.tensor_version(local)))
    return tuple(stamp)


def _unchanged(adapter: nn.Module, entry: tuple) -> bool:
    """Whether the tensors ``entry`` was built from are unchanged and (unless FSDP2 shards) still ``adapter``'s.

    Under FSDP2 the adapter may hold unsharded copies of the shards the entry was gathered from (while FSDP2
    has its unit gathered): the shards are what is checked - an optimizer step or a loaded state dict bumps
    the ``DTensor``'s version counter (its local tensor's stays unchanged).
    """
    sources, stamp = entry[2], entry[3]
    current = _params(adapter)
    # Identity is skipped only while FSDP2 has the unit gathered (its parameters are then plain copies of the
    # shards); a replaced shard (load_state_dict(assign=True), re-sharding) is a new DTensor and must not match.
    gathered = is_fsdp2_shard(sources[0]) and not any(is_fsdp2_shard(p) for p in current)
    if not gathered and any(p is not q for p, q in zip(current, sources, strict=True)):
        return False
    return _stamp(sources) == stamp


def _layout(adapter: nn.Module) -> str | None:
    """``"plain"``: full matrices as plain tensors; ``"sharded"``: FSDP2 dim-0 shards of them; else ``None``.

    ``None`` (FSDP1 flat-parameter shards, other layouts, meta tensors) keeps the per-block path.
    """
    c, d = adapter.config, adapter.hidden_size
    nk = c.n_streams * c.stream_rank
    expected = {"read_weight": (nk, d), "write_weight": (d, nk), "mix_logits": (c.n_streams,) * 2, "gate_logit": (1,)}
    params = list(adapter.named_parameters(recurse=False))
    if any(tuple(p.shape) != expected.get(name) or p.device.type == "meta" for name, p in params):
        return None
    if all(type(p.data) is torch.Tensor for _, p in params):
        return "plain"
    # One mesh and one dtype: the gather is one collective over one group, and its buffer has one dtype.
    if all(is_fsdp2_shard(p) for _, p in params) and len({(p.device_mesh, p.dtype) for _, p in params}) == 1:
        return "sharded"
    return None


def _group_key(adapter: nn.Module) -> tuple:
    c, p = adapter.config, adapter.read_weight
    settings = (c.form, c.norm, c.n_streams, c.stream_rank, c.g_max, c.sinkhorn_iters, c.exact_sinkhorn)
    mesh = p.device_mesh if is_fsdp2_shard(p) else None  # adapters on different meshes never share a gather
    return (*settings, c.newton_steps, c.sinkhorn_backward, adapter.hidden_size, p.device, p.dtype, mesh)


def _build(adapters: list[nn.Module], stacked: dict[str, torch.Tensor]) -> _StepGroup:
    """The batched factors of adapters sharing one :func:`_group_key` (the per-block formulas, on a batch).

    ``stacked``: per parameter name, the adapters' full parameters stacked ``(L, ...)`` (with autograd).
    """
    c, layers = adapters[0].config, len(adapters)
    reads = stacked["read_weight"]  # (L, n·k, d)
    if c.form == "mix":
        read = orthonormal_rows(reads)
        write = read.mT  # (L, d, n·k)
    else:
        normalize = spectral_normalize if c.norm == "spectral" else frobenius_normalize
        writes = stacked["write_weight"].mT  # (L, n·k, d)
        both = normalize(torch.cat([reads, writes]))  # (2L, n·k, d): one eigh for all blocks
        read, write = both[:layers], both[layers:].mT
    logits = stacked["mix_logits"]  # (L, n, n)
    m = sinkhorn(logits, c.sinkhorn_iters, c.exact_sinkhorn, c.sinkhorn_backward == "implicit", c.newton_steps)
    effective = gated_write(write, m, stacked["gate_logit"], c.g_max, c.form)  # (L, d, n·k): CRMAAdapter's formula
    return _StepGroup(reads=read.float(), effective=effective, grad=torch.is_grad_enabled())


_PER_BLOCK = contextvars.ContextVar("crma_per_block_factors", default=False)
"""Set inside :func:`per_block_factors` only (a context-local flag, like ``torch.no_grad``'s)."""


@contextlib.contextmanager
def per_block_factors() -> Iterator[None]:
    """Within the block, every adapter computes its own factors (the scheme before batching; for comparisons)."""
    token = _PER_BLOCK.set(True)
    try:
        yield
    finally:
        _PER_BLOCK.reset(token)


def precompute_step_factors(adapters: Iterable[nn.Module]) -> int:
    """Compute the factors of all full or FSDP2-sharded ``adapters`` together; returns how many were batched.

    Adapters are grouped by settings, device and dtype (normally one group: all blocks of a model). FSDP2
    shards are first gathered, all adapters' in one collective (:mod:`.crma_shards`): every rank must then
    call this with the same adapters, as every rank runs the model's forward under FSDP2. Earlier cached
    factors of these adapters are replaced (dropped inside :func:`per_block_factors`), except without
    autograd, where factors whose (unsharded) parameters are unchanged are kept - a decision local to a rank,
    hence never taken for shards, whose gathering every rank must join.
    """
    groups: dict[tuple, list[nn.Module]] = {}
    batching = not _PER_BLOCK.get()
    reuse = batching and not torch.is_grad_enabled()  # generation, evaluation: parameters unchanged
    for adapter in adapters:
        entry = _STEP.get(adapter)
        layout = _layout(adapter) if batching else None
        if reuse and layout == "plain" and entry is not None and _unchanged(adapter, entry):
            continue  # no parameter replaced or changed in place since these factors were built
        _STEP.pop(adapter, None)
        if layout is not None:
            groups.setdefault((layout, *_group_key(adapter)), []).append(adapter)
    for key, members in groups.items():
        names = [name for name, _ in members[0].named_parameters(recurse=False)]
        same = [[getattr(a, name) for a in members] for name in names]
        # FSDP2 shards: one all-gather of every member's shards (a collective); full tensors: stacked here
        stacks = gather_stacked(same) if key[0] == "sharded" else [torch.stack(params) for params in same]
        group = _build(members, dict(zip(names, stacks)))
        for i, adapter in enumerate(members):
            sources = _params(adapter)
            _STEP[adapter] = (group, i, sources, _stamp(sources))
    return sum(len(m) for m in groups.values())


def apply_step_factors(adapter: nn.Module, flat: torch.Tensor) -> torch.Tensor | None:
    """``h + g W vec(M s)`` (or the mix form) for ``flat`` ``(T, d)`` from this step's batched factors.

    ``None`` (the adapter computes its own factors) unless they are valid: no parameter the batch was built
    from was replaced or changed in place since, and the batch was built with autograd when it is needed now
    (gradient enabled and a parameter trains). Under FSDP2 the adapter's parameters here are the block's
    unsharded copies of the shards the batch was gathered from, which are the ones checked.
    """
    entry = _STEP.get(adapter)
    if entry is None:
        return None
    group, index = entry[:2]
    if not _unchanged(adapter, entry):
        _STEP.pop(adapter, None)
        return None
    if not group.grad and torch.is_grad_enabled() and any(p.requires_grad for p in _params(adapter)):
        return None
    read_t, effective_t, read, effective = (part[index] for part in group.slices(flat.dtype))
    return _ReadWrite.apply(flat, read_t, effective_t, read, effective)


def clear_step_factors(adapters: Iterable[Any]) -> None:
    """Forget the cached factors of ``adapters`` (they compute their own until the next batch)."""
    for adapter in adapters:
        _STEP.pop(adapter, None)
