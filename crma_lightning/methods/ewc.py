"""EWC: elastic weight consolidation with a diagonal Fisher (Kirkpatrick et al., 2017; docs/method.md).

At the end of stage ``s`` the diagonal Fisher ``F_s`` of the trainable parameters is estimated on that
stage's data and the parameters are anchored: ``θ*_s`` = their values at the stage's end. Every later
training step adds

    penalty = λ/2 · Σ_s Σ_i F_s,i (θ_i − θ*_s,i)²

summed over the stages consolidated so far (``online=False``), or, with ``online=True`` (Schwarz et al.,
2018), a single running Fisher ``F ← γ F + F_new`` with the single, latest anchor.

Which Fisher: the *batch-level empirical* Fisher, ``F = mean over batches b of (∇_θ L_b)²`` where ``L_b``
is the mean next-token cross-entropy of batch ``b`` on its own labels (no sampling from the model).
It is smaller than the per-example empirical Fisher by about the batch's token count; pass batches of
one row for the per-example version. Parameters are matched by name (``trainable_parameters()``
names), so a parameter frozen in a later stage still contributes its (then constant) term.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from crma_lightning.checks import check_number
from crma_lightning.methods.base import (
    Batch,
    ContinualMethod,
    lm_loss,
    named_parameters,
    trainable_named_parameters,
)
from crma_lightning.parallel.dist import distribute_tensor, full_tensor, is_dtensor


def fisher_diagonal(
    params: Mapping[str, torch.Tensor],
    batches: Iterable[Batch],
    loss_fn: Callable[[Batch], torch.Tensor],
    max_batches: int,
) -> dict[str, torch.Tensor]:
    """Batch-level empirical diagonal Fisher: the mean of ``grad(loss_fn(b))²`` over the first ``max_batches``.

    Gradients are taken with ``torch.autograd.grad``, so the parameters' ``.grad`` are left untouched.
    Batches with a non-finite loss or gradient are skipped (a single NaN would poison every later step).
    FSDP2-sharded parameters (``DTensor``) get their gradients only from FSDP's reduce-scatter, so for
    them ``loss.backward()`` is used and ``.grad`` (the mean over ranks, equal when every rank reads the
    same batch) is read and cleared; the Fisher then has the parameters' sharding.

    Returns:
        ``{name: F}`` in float32, each shaped like its parameter.

    Raises:
        ValueError: No batch, or no finite one, to estimate from.
    """
    names = list(params)
    tensors = [params[n] for n in names]
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    used = 0
    sharded = any(is_dtensor(t) for t in tensors)
    with torch.enable_grad():
        for batch in batches:
            if used >= max_batches:
                break
            loss = loss_fn(batch)
            if not torch.isfinite(loss):
                continue
            grads = _backward_grads(loss, tensors) if sharded else torch.autograd.grad(loss, tensors, allow_unused=True)
            if any(g is not None and not torch.isfinite(_local(g)).all() for g in grads):
                continue
            for name, grad in zip(names, grads, strict=True):
                if grad is not None:  # unused in this loss: its Fisher is zero
                    sums[name] += grad.detach().float() ** 2
            used += 1
    if used == 0:
        raise ValueError("EWC: no batch (with a finite loss and gradient) to estimate the Fisher from")
    return {n: s / used for n, s in sums.items()}


def _backward_grads(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor | None]:
    saved = [t.grad for t in tensors]
    for t in tensors:
        t.grad = None
    loss.backward()
    grads = [t.grad for t in tensors]
    for t, g in zip(tensors, saved, strict=True):
        t.grad = g
    return grads


def _local(value: torch.Tensor) -> torch.Tensor:
    return value.to_local() if is_dtensor(value) else value


class EWC(ContinualMethod):
    """Elastic weight consolidation.

    Args:
        lam: Penalty strength ``λ`` (≥ 0).
        fisher_samples: Batches of the stage's training data the Fisher is estimated from (≥ 1).
        online: Online EWC: one running Fisher ``F ← γ F + F_new`` and only the latest anchor.
        gamma: Decay ``γ`` of the running Fisher in ``[0, 1]`` (used with ``online=True``).
    """

    name = "ewc"

    def __init__(self, lam: float = 1000.0, fisher_samples: int = 32, online: bool = False, gamma: float = 1.0) -> None:
        check_number("ewc lam", lam, 0.0)
        check_number("ewc fisher_samples", fisher_samples, 1, integer=True)
        if not isinstance(online, bool):
            raise ValueError(f"ewc online={online!r} is invalid: expected true or false")
        check_number("ewc gamma", gamma, 0.0, 1.0)
        self.lam, self.fisher_samples, self.online, self.gamma = float(lam), fisher_samples, online, float(gamma)
        self.tasks: list[str] = []  # stages consolidated, in order
        self.fisher: list[dict[str, torch.Tensor]] = []  # one per stage (one in total when online)
        self.anchors: list[dict[str, torch.Tensor]] = []  # θ* matching each Fisher entry

    def config(self) -> dict[str, Any]:
        return {"lam": self.lam, "fisher_samples": self.fisher_samples, "online": self.online, "gamma": self.gamma}

    def on_task_end(
        self,
        module: nn.Module,
        task: str,
        index: int,
        train_batches: Iterable[Batch],
        train_rows: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Estimate ``F`` on ``train_batches`` (dropout off) and anchor the trainable parameters."""
        if task in self.tasks:
            return  # idempotent: a repeated stage end (resume right after it) must not consolidate twice
        params = dict(trainable_named_parameters(module))
        was_training = module.training
        module.eval()  # a deterministic Fisher: no dropout noise in the gradients
        try:
            fisher = fisher_diagonal(params, train_batches, lambda b: lm_loss(module, b), self.fisher_samples)
        finally:
            module.train(was_training)
        self.consolidate(task, fisher, params)

    def consolidate(self, task: str, fisher: Mapping[str, torch.Tensor], params: Mapping[str, torch.Tensor]) -> None:
        """Add stage ``task``'s Fisher and anchor it at the current values of ``params``."""
        anchor = {n: params[n].detach().float().clone() for n in fisher}
        fisher = {n: f.detach().float().clone() for n, f in fisher.items()}
        if self.online and self.fisher:
            running = {n: self.gamma * f for n, f in self.fisher[0].items()}
            for n, f in fisher.items():
                running[n] = running[n] + f if n in running else f
            # The anchor moves to the latest values; parameters absent this stage keep their old anchor.
            self.fisher, self.anchors = [running], [{**self.anchors[0], **anchor}]
        else:
            self.fisher.append(fisher)
            self.anchors.append(anchor)
        self.tasks.append(task)

    def penalty(self, module: nn.Module) -> torch.Tensor | None:
        """``λ/2 Σ_s Σ_i F_s,i (θ_i − θ*_s,i)²`` in float32; ``None`` before the first stage has ended."""
        if not self.fisher:
            return None
        params = named_parameters(module)
        total: torch.Tensor | None = None
        for fisher, anchor in zip(self.fisher, self.anchors, strict=True):
            for name, f in fisher.items():
                if name not in params:
                    raise KeyError(f"EWC: parameter {name!r} of the Fisher is not in the model any more")
                p = params[name]
                if f.device != p.device or is_dtensor(p) != is_dtensor(f):  # once after a checkpoint load
                    fisher[name] = f = _like(f, p)
                    anchor[name] = _like(anchor[name], p)
                term = (f * (p.float() - anchor[name]) ** 2).sum()
                total = term if total is None else total + term
        assert total is not None
        return 0.5 * self.lam * full_tensor(total)  # sharded: the sum over every rank's shard (differentiable)

    def state_dict(self) -> dict[str, Any]:
        """Fisher and anchors as whole tensors (sharded ones are gathered: every rank must call it)."""
        fisher = [{n: full_tensor(t) for n, t in entry.items()} for entry in self.fisher]
        anchors = [{n: full_tensor(t) for n, t in entry.items()} for entry in self.anchors]
        return {"config": self.config(), "tasks": list(self.tasks), "fisher": fisher, "anchors": anchors}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_config(state)
        self.tasks = list(state["tasks"])
        self.fisher = [dict(f) for f in state["fisher"]]
        self.anchors = [dict(a) for a in state["anchors"]]

    def summary(self) -> dict[str, Any]:
        floats = sum(t.numel() for entry in (*self.fisher, *self.anchors) for t in entry.values())
        return {**super().summary(), "consolidated": list(self.tasks), "stored_floats": floats, "bytes": 4 * floats}


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` on ``param``'s device, sharded like ``param`` when that is a ``DTensor`` (a checkpoint's tensors)."""
    if is_dtensor(param) and not is_dtensor(value):
        return distribute_tensor(value.to(param.to_local().device), param.device_mesh, param.placements)
    return value.to(param.device)
