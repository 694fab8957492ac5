"""Skipping optimizer steps whose gradients are not finite, and giving up after too many in a row."""

from __future__ import annotations

import torch


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

    def check(self, optimizer: torch.optim.Optimizer, step: int) -> bool:
        """Return ``True`` (and clear the gradients) if this step's gradients are not all finite."""
        if self.max_consecutive == 0:
            return False
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return False
        # Sharded gradients (FSDP) are checked shard by shard, then the verdict is reduced over ranks.
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        norms = torch._foreach_norm(local)  # one fused kernel; a NaN/inf anywhere makes its norm non-finite
        bad = (~torch.isfinite(torch.stack([n.float() for n in norms]))).any().float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        finite = not bool(bad.item())
        if finite:
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
