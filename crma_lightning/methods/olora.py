"""O-LoRA: orthogonal subspaces for per-task LoRAs (Wang et al., 2023; docs/method.md).

Paper: "Orthogonal Subspace Learning for Language Model Continual Learning" (EMNLP Findings 2023).

Each task gets its own LoRA (``task_adapters: per_task``). While task ``t`` trains, every *earlier* task's
LoRA stays active - frozen - next to it, and their updates are summed (``LoRALinear.set_active_adapters``);
evaluation activates the same stack for every domain, so no task identity is needed. The new LoRA's
down-projection is pushed orthogonal to the earlier ones' and, optionally, its weights are kept small by

    penalty = λ₁ · Σ_layers Σ_{i<t} ‖A_i A_tᵀ‖_F²  +  λ₂ · Σ_layers (‖A_t‖_F + ‖B_t‖_F)

Convention: here ``A`` is the ``lora_A`` weight of shape ``(r, in)`` (rows span the input subspace the
adapter reads), so ``A_i A_tᵀ`` is ``(r_i, r_t)``; the paper writes ``A`` as ``(in, r)`` and the same
quantity as ``A_iᵀ A_t``. ``‖·‖_F²`` is the sum of squared entries, as in the paper's ``Σ_{j,k} |O_{i,t}[j,k]|²``.
The λ₂ term is the reference code's (github.com/cmnfriend/O-LoRA, ``src/uie_trainer_lora.py``:
``l2_loss += torch.norm(param, p=2)`` over every parameter of the new LoRA, A and B, un-squared); it
applies from the first task on, and its default 0 is that code's default and the value its Standard CL
Benchmark scripts use. Where this file differs from that code: docs/method.md, "Fidelity to the papers".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from crma_lightning.adapters.inject import lora_adapter_names, lora_layers
from crma_lightning.adapters.switching import set_active_adapters, set_adapter_trainable
from crma_lightning.checks import check_number
from crma_lightning.methods.base import Batch, ContinualMethod, adapter_name, inner_model
from crma_lightning.parallel.dist import full_tensor


def l2_penalty(params: Sequence[torch.Tensor]) -> torch.Tensor:
    """``Σ_p ‖p‖_F`` (each tensor's L2 norm over all its entries, not squared), in float32.

    Its gradient at an all-zero tensor (a fresh LoRA's B) is 0, not NaN: torch defines the norm's
    subgradient there as 0.
    """
    return torch.stack([p.float().norm(p=2) for p in params]).sum()


def orthogonality_penalty(earlier: Sequence[torch.Tensor], current: torch.Tensor) -> torch.Tensor:
    """``Σ_i ‖A_i A_tᵀ‖_F²`` for ``A_i`` ``(r_i, in)`` and ``A_t`` ``(r_t, in)``, in float32."""
    a_t = current.float()
    total = a_t.new_zeros(())
    for a_i in earlier:
        total = total + (a_i.detach().float() @ a_t.T).pow(2).sum()  # (r_i, r_t); A_i is frozen anyway
    return total


class OLoRA(ContinualMethod):
    """O-LoRA with orthogonality strength ``lam`` (λ₁) and L2 strength ``lam2`` (λ₂).

    λ₁ = 0.5 in the paper's experiments; λ₂ = 0 in its Standard CL Benchmark scripts (0.1-0.3 on some
    tasks of its long sequence).

    Needs ``task_adapters: per_task``. The method tracks which tasks finished (``trained``) and which
    one trains now (``current``); both are in :meth:`state_dict`.
    """

    name = "olora"
    required_task_adapters = "per_task"

    def __init__(self, lam: float = 0.5, lam2: float = 0.0) -> None:
        check_number("olora lam", lam, 0.0)
        check_number("olora lam2", lam2, 0.0)
        self.lam = float(lam)
        self.lam2 = float(lam2)
        self.trained: list[str] = []  # tasks whose stage has ended, in order
        self.current: str | None = None

    def config(self) -> dict[str, Any]:
        """``lam``, and ``lam2`` only when it is not 0.

        Checkpoints written before λ₂ existed record ``{"lam": ...}`` alone, and a run with the default
        λ₂ = 0 must still resume them (its identity and config compare equal to theirs).
        """
        return {"lam": self.lam} if self.lam2 == 0 else {"lam": self.lam, "lam2": self.lam2}

    def setup(self, module: nn.Module) -> None:
        self.check_task_adapters(getattr(module, "task_adapters", "per_task"))
        if not any(True for _ in lora_layers(inner_model(module))):
            raise ValueError("method olora needs LoRA layers; the model has none")

    def _stack(self, module: nn.Module, include_current: bool) -> list[str]:
        tasks = list(self.trained)
        if include_current and self.current is not None and self.current not in tasks:
            tasks.append(self.current)
        return [adapter_name(module, t) for t in tasks]

    def on_task_start(self, module: nn.Module, task: str, index: int) -> None:
        """Activate earlier adapters + ``task``'s; only ``task``'s trains. Idempotent (also run on resume)."""
        self.current = task
        model = inner_model(module)
        names = self._stack(module, include_current=True)
        new = adapter_name(module, task)
        for name in lora_adapter_names(model):
            set_adapter_trainable(model, name, name == new)
        set_active_adapters(model, names)

    def active_adapters(self, module: nn.Module, task: str | None) -> list[str] | None:
        """Every domain, during training and evaluation: the stack of trained adapters (+ the training one)."""
        return self._stack(module, include_current=True)

    def penalty(self, module: nn.Module) -> torch.Tensor | None:
        """``λ₁ Σ_layers Σ_{i<t} ‖A_i A_tᵀ‖_F² + λ₂ Σ_layers (‖A_t‖_F + ‖B_t‖_F)``; ``None`` when both are absent.

        The orthogonality term needs an earlier adapter (none in the first stage); the L2 term is there
        from the first stage on when ``lam2 > 0``.
        """
        if self.current is None:
            return None
        new = adapter_name(module, self.current)
        earlier = [n for n in self._stack(module, include_current=False) if n != new]
        orth: torch.Tensor | None = None
        l2: torch.Tensor | None = None
        for _, layer in lora_layers(inner_model(module)):
            # Under FSDP2 the weights are DTensor shards: gather them whole (a collective every rank makes;
            # differentiable, so each rank gets its shard's gradient back) - ``A_i A_tᵀ`` needs whole rows,
            # and an un-squared norm of shards does not add up to the whole tensor's norm.
            a_new = full_tensor(layer.lora_A[new].weight)
            if earlier:
                term = orthogonality_penalty([full_tensor(layer.lora_A[n].weight) for n in earlier], a_new)
                orth = term if orth is None else orth + term
            if self.lam2 > 0:
                term = l2_penalty([a_new, full_tensor(layer.lora_B[new].weight)])
                l2 = term if l2 is None else l2 + term
        parts = [w * t for w, t in ((self.lam, orth), (self.lam2, l2)) if t is not None]
        return None if not parts else parts[0] if len(parts) == 1 else parts[0] + parts[1]

    def on_task_end(
        self,
        module: nn.Module,
        task: str,
        index: int,
        train_batches: Iterable[Batch],
        train_rows: Sequence[Mapping[str, Any]] | None = None,
    ) -> None:
        """Freeze ``task``'s adapter; it stays in the active stack for every later stage and evaluation."""
        if task not in self.trained:
            self.trained.append(task)
        set_adapter_trainable(inner_model(module), adapter_name(module, task), False)

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config(), "trained": list(self.trained), "current": self.current}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # A config without lam2 was written with λ₂ = 0 (it is left out at 0, and older versions had
        # no λ₂): both sides are compared with it filled in, so lam2 > 0 against such a checkpoint (and
        # lam2 = 0 against one written with λ₂ > 0) is refused, not silently accepted.
        saved = {"lam2": 0.0, **state.get("config", {})}
        for key, value in {"lam": self.lam, "lam2": self.lam2}.items():
            if key in saved and saved[key] != value:
                raise ValueError(
                    f"{self.name}: checkpoint was written with {key}={saved[key]!r}, this run has {key}={value!r}"
                )
        self.trained = list(state["trained"])
        self.current = state["current"]

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "stacked_adapters": list(self.trained)}
