"""Skipping optimizer steps whose gradients are not finite, and giving up after too many in a row."""

from __future__ import annotations

import torch

from crma_lightning.parallel.dist import distributed_ready
from crma_lightning.parallel.grad_norms import group_grad_square_sums


class NonFiniteError(RuntimeError):
    """Raised after ``max_consecutive`` optimizer steps in a row had a non-finite loss or gradient."""


class NonFiniteGuard:
    """Drop the gradients of a step with a NaN/inf gradient so that the optimizer skips it.

    PyTorch optimizers leave parameters whose ``.grad`` is ``None`` untouched (no update, no moment
    update), so setting every gradient to ``None`` skips the step exactly - under DDP too, since all
    ranks see the same all-reduced gradients and take the same decision. A NaN loss propagates into
    the gradients, so one check covers both.

    The check costs one scalar device-to-host copy per optimizer step (like a progress bar showing the
    loss); ``max_consecutive=0`` turns it off.

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

    @property
    def enabled(self) -> bool:
        """``False`` with ``max_consecutive=0``: the check is off."""
        return self.max_consecutive > 0

    def check(self, optimizer: torch.optim.Optimizer, step: int, square_norm: torch.Tensor | None = None) -> bool:
        """Return ``True`` (and clear the gradients) if this step's gradients are not all finite.

        Args:
            optimizer: The optimizer about to step.
            step: The step number for messages (``trainer.global_step``).
            square_norm: The step's squared global gradient norm, exact across ranks
                (:func:`~crma_lightning.parallel.grad_norms.group_grad_square_sums`); computed here when ``None``.
                A NaN/inf in any gradient makes it non-finite.
        """
        if not self.enabled:
            return False
        if square_norm is None:
            _, squares = group_grad_square_sums(optimizer)
            square_norm = squares.sum()
            if distributed_ready():  # plain local shards (FSDP1): a sum keeps any rank's NaN/inf
                torch.distributed.all_reduce(square_norm)
        if bool(torch.isfinite(square_norm).item()):
            self.consecutive = 0
            return False
        optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self.consecutive += 1
        if len(self.skipped_steps) < 100:
            self.skipped_steps.append(int(step))
        if self.stage is not None:
            self.per_stage[self.stage] = self.per_stage.get(self.stage, 0) + 1
        if self.consecutive >= self.max_consecutive:
            # Steps restart at 0 in every stage, so name the stage too.
            where = f"step {step} of stage {self.stage!r}" if self.stage is not None else f"global step {step}"
            raise NonFiniteError(
                f"{self.consecutive} consecutive optimizer steps had a non-finite loss or gradient "
                f"(last at {where}; {self.skipped} skipped in all). Lower the learning rate, "
                "check the data, or raise max_nonfinite_steps. Finished stages are kept on disk."
            )
        return True

    def state_dict(self) -> dict:
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
