"""Skipping optimizer steps whose gradients are not finite, and giving up after too many in a row."""

from __future__ import annotations

import torch

from crma_lightning.parallel.dist import distributed_ready
from crma_lightning.parallel.grad_norms import group_grad_square_sums

MAX_PENDING = 1000
"""Device-side decisions kept before a flush at the latest (a logging interval longer than this syncs sooner)."""


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` skips a step itself when given ``found_inf`` (torch's fused Adam, AdamW, SGD)."""
    fused = any(group.get("fused") for group in optimizer.param_groups)
    return fused and bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class NonFiniteError(RuntimeError):
    """Raised after ``max_consecutive`` optimizer steps in a row had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Drop the gradients of a step with a NaN/inf gradient so that the optimizer skips it.

    PyTorch optimizers leave parameters whose ``.grad`` is ``None`` untouched (no update, no moment
    update), so setting every gradient to ``None`` skips the step exactly - under DDP too, since all
    ranks see the same all-reduced gradients and take the same decision. A NaN loss propagates into
    the gradients, so one check covers both.

    With a fused optimizer (Adam/AdamW are built fused by default,
    :func:`~crma_lightning.model.optim.prefer_fused`) the decision stays on the device: the guard hands
    the optimizer a ``found_inf`` flag, as ``torch.amp.GradScaler`` does, and the fused kernel skips the
    update and the step count when it is set. The flags are read back in one transfer at each logging
    interval (:meth:`flush`), so the counts, and :class:`NonFiniteError`, arrive up to one interval
    late. Other optimizers pay one scalar device-to-host copy per step. ``max_consecutive=0`` turns the
    check off.

    Attributes:
        max_consecutive: Raise :class:`NonFiniteError` after this many bad steps in a row.
        skipped: Total skipped steps.
        consecutive: Current run of skipped steps.
        skipped_steps: ``trainer.global_step`` of each skipped step (the first 100); it restarts at 0 in
            every stage of a driven run, see ``per_stage``.
        per_stage: Skipped steps per stage label (the stage driver labels each stage with its domain).
        stage: Label of the stage now training; the driver sets it, ``None`` outside a driven run.
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        if max_consecutive < 0:
            raise ValueError(f"max_nonfinite_steps={max_consecutive!r} is invalid: expected an integer >= 0")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self.skipped_steps: list[int] = []
        self.per_stage: dict[str, int] = {}
        self.stage: str | None = None
        self._last_bad: tuple[int, str | None] = (0, None)
        self._pending: list[tuple[torch.Tensor, int, str | None]] = []  # (bad flag on device, step, stage)

    @property
    def enabled(self) -> bool:
        """``False`` with ``max_consecutive=0``: the check is off."""
        return self.max_consecutive > 0

    def check(
        self,
        optimizer: torch.optim.Optimizer,
        step: int,
        square_norm: torch.Tensor | None = None,
        on_device: bool = False,
    ) -> bool | None:
        """Decide whether this step's gradients are all finite; skip the step if not.

        Args:
            optimizer: The optimizer about to step.
            step: The step number for messages (``trainer.global_step``).
            square_norm: The step's squared global gradient norm, exact across ranks
                (:func:`~crma_lightning.parallel.grad_norms.group_grad_square_sums`); computed here when ``None``.
                A NaN/inf in any gradient makes it non-finite.
            on_device: Let a fused optimizer skip the step on the device (no sync now; the caller must
                not have a grad scaler of its own on ``optimizer``). Ignored for other optimizers.

        Returns:
            ``True`` if the step is skipped (its gradients cleared), ``False`` if not, ``None`` when the
            decision stays on the device until :meth:`flush`.
        """
        if not self.enabled:
            return False
        if square_norm is None:
            _, squares = group_grad_square_sums(optimizer)
            square_norm = squares.sum()
            if distributed_ready():  # plain local shards (FSDP1): a sum keeps any rank's NaN/inf
                torch.distributed.all_reduce(square_norm)
        bad = ~torch.isfinite(square_norm.detach())
        if on_device and skips_on_device(optimizer):
            optimizer.found_inf = bad.to(torch.float32)  # read by the fused kernel: no update, step unchanged
            self._pending.append((bad, int(step), self.stage))
            if len(self._pending) >= MAX_PENDING:
                self.flush()
            return None
        self.flush()  # keep the order of the counts
        if not bool(bad.item()):
            self._record(False, step, self.stage)
            return False
        optimizer.zero_grad(set_to_none=True)
        self._record(True, step, self.stage)
        return True

    def flush(self, raise_error: bool = True) -> None:
        """Count the steps decided on the device since the last flush (one transfer for all of them).

        Args:
            raise_error: Raise :class:`NonFiniteError` when the bad steps in a row reached
                ``max_consecutive``; ``False`` only counts (what a checkpoint save needs).
        """
        if self._pending:
            pending, self._pending = self._pending, []
            flags = torch.stack([bad for bad, _, _ in pending]).tolist()
            for flag, (_, step, stage) in zip(flags, pending, strict=True):
                self._record(bool(flag), step, stage, raise_error)
        if raise_error and self.consecutive >= self.max_consecutive > 0:
            self._raise(self._last_bad)

    def _record(self, bad: bool, step: int, stage: str | None, raise_error: bool = True) -> None:
        if not bad:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        self._last_bad = (int(step), stage)
        if len(self.skipped_steps) < 100:
            self.skipped_steps.append(int(step))
        if stage is not None:
            self.per_stage[stage] = self.per_stage.get(stage, 0) + 1
        if raise_error and self.consecutive >= self.max_consecutive:
            self._raise(self._last_bad)

    def _raise(self, last: tuple[int, str | None]) -> None:
        step, stage = last
        # Steps restart at 0 in every stage, so name the stage too.
        where = f"step {step} of stage {stage!r}" if stage is not None else f"global step {step}"
        raise NonFiniteError(
            f"{self.consecutive} consecutive optimizer steps had a non-finite loss or gradient "
            f"(last at {where}; {self.skipped} skipped in all). Lower the learning rate, "
            "check the data, or raise max_nonfinite_steps. Finished stages are kept on disk."
        )

    def state_dict(self) -> dict:
        self.flush(raise_error=False)
        return {
            "skipped": self.skipped,
            "consecutive": self.consecutive,
            "skipped_steps": list(self.skipped_steps),
            "per_stage": dict(self.per_stage),
        }

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))
        self.skipped_steps = list(state.get("skipped_steps", []))
        self.per_stage = {str(k): int(v) for k, v in state.get("per_stage", {}).items()}
