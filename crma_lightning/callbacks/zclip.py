"""``ZClip``: adaptive gradient clipping by z-score of the gradient norm (Kumar et al., arXiv 2504.02507).

Implemented on the device: no host synchronisation in the optimizer step.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from crma_lightning import _compat
from crma_lightning.callbacks.gradient_stability import GradientStability
from crma_lightning.callbacks.stages import StageTracker, log_interval, log_to_loggers, step_grad_norms
from crma_lightning.parallel.dist import to_local
from crma_lightning.parallel.fsdp1 import shard_group

MODES = ("threshold", "adaptive")
# Device-side state, in this order in checkpoints: warm-up Welford (n, mean, m2), the EMA (mean,
# var), whether the EMA has data, and the clip counts (this logging interval, since the last reset).
_STATE = ("warm_n", "warm_mean", "warm_m2", "mean", "var", "ready", "clipped_interval", "clipped_total")


class ZClip(L.Callback):
    """Clip gradient-norm spikes detected by a z-score on an EMA of the norm (ZClip).

    Algorithm, per optimizer step with total gradient norm ``g`` (the global L2 norm over the
    optimizer's parameters, exact under FSDP like :class:`GradientStability`'s):

    1. Warm-up (the first ``warmup_steps`` steps): ``g`` only feeds a running mean/variance; no
       clipping. At the end of warm-up the EMA starts from that mean ``μ`` and (population) variance ``σ²``.
    2. ``z = (g − μ) / (σ + eps)``. If ``z > z_thresh`` the gradients are scaled in place so that their
       norm becomes the threshold:

       * ``mode="threshold"`` (default): ``μ + z_thresh · σ`` - clip exactly to the detection bound
         (the paper's fixed-threshold "percentile" variant);
       * ``mode="adaptive"``: ``μ + z_thresh² · σ / z`` - the paper's ``adaptive_scaling`` option, which
         clips larger outliers harder.

    3. The EMA is updated with the norm after clipping (so a spike does not inflate the statistics):
       ``μ ← α μ + (1 − α) g'``, ``σ² ← α σ² + (1 − α) (g' − μ)²`` with the updated ``μ``.

    Non-finite norms are neither clipped nor fed to the statistics (``ContinualLM`` skips such steps).
    Everything runs on the device with ``torch.where`` and ``torch._foreach_mul_``; steps without a
    spike multiply the gradients by exactly 1.0, leaving them bit-for-bit unchanged.

    Order: put ``ZClip`` AFTER :class:`GradientStability` in the callback list, so that the logged
    ``grad/norm`` is the norm before clipping; :meth:`setup` raises ``ValueError`` otherwise. Lightning's
    own ``gradient_clip_val`` clipping, if set, runs after both.

    Logged per logging interval, with the interval's last optimizer step as ``step`` (rank 0 only):
    ``zclip/clipped`` (clip events in the interval), and once warmed up ``zclip/threshold``
    (``μ + z_thresh · σ``, the detection bound for the next step) and ``zclip/ema_mean``.

    Each ``fit`` is a stage; with ``reset_each_stage`` the statistics start over (with a new warm-up)
    when a new stage starts, since a new domain (and a fresh LoRA) changes the gradient scale. A fit
    resumed from a mid-stage checkpoint continues.

    Args:
        alpha: EMA smoothing factor for the mean and variance.
        z_thresh: z-score above which a step is clipped.
        warmup_steps: Steps that only collect statistics (>= 2: the variance needs two norms).
        mode: ``"threshold"`` or ``"adaptive"`` (see above).
        eps: Added to ``σ`` in the z-score.
        log_every_n_steps: Logging interval in optimizer steps (default: the trainer's).
        reset_each_stage: Restart warm-up and statistics at every new stage.
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        mode: str = "threshold",
        eps: float = 1e-6,
        log_every_n_steps: int | None = None,
        reset_each_stage: bool = True,
    ) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha={alpha!r} is invalid: expected 0 < alpha < 1")
        if not z_thresh > 0:
            raise ValueError(f"z_thresh={z_thresh!r} is invalid: expected a number > 0")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 2:
            raise ValueError(f"warmup_steps={warmup_steps!r} is invalid: expected an integer >= 2")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is invalid: expected one of {list(MODES)}")
        if log_every_n_steps is not None and (isinstance(log_every_n_steps, bool) or log_every_n_steps < 1):
            raise ValueError(f"log_every_n_steps={log_every_n_steps!r} is invalid: expected an integer >= 1 or None")
        self.alpha = float(alpha)
        self.z_thresh = float(z_thresh)
        self.warmup_steps = warmup_steps
        self.mode = mode
        self.eps = float(eps)
        self.log_every_n_steps = log_every_n_steps
        self.reset_each_stage = reset_each_stage
        self.seen = 0  # steps since the statistics (re)started; host-side, so warm-up needs no sync
        self._values: dict[str, float] = dict.fromkeys(_STATE, 0.0)  # host copy until the first step
        self._t: dict[str, torch.Tensor] | None = None  # device state
        self._tracker = StageTracker()
        self._trainer: L.Trainer | None = None
        self._shard_group: Any = None
        self._every = 50
        self._last_step: int | None = None
        self._unlogged = False

    # ------------------------------------------------------------------ stages
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        callbacks = list(trainer.callbacks)
        mine = callbacks.index(self) if self in callbacks else -1
        if any(isinstance(cb, GradientStability) for cb in callbacks[mine + 1 :]):
            raise ValueError(
                "ZClip must come after GradientStability in the callback list, otherwise the logged "
                "grad/norm is the norm after clipping; reorder the callbacks"
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer
        self._every = log_interval(trainer, self.log_every_n_steps)
        self._shard_group = shard_group(pl_module)
        if self._tracker.start(pl_module) and self.reset_each_stage:
            self.reset()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._unlogged:
            self._flush()
        self._tracker.end()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = None

    def reset(self) -> None:
        """Forget the statistics (and the clip counts): the next step starts a new warm-up."""
        self.seen = 0
        self._values = dict.fromkeys(_STATE, 0.0)
        self._t = None

    # ------------------------------------------------------------------ per step: device only
    def _state(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._t is None:
            # torch.full is a fill kernel, not a host-to-device copy.
            self._t = {k: torch.full((), v, dtype=torch.float32, device=device) for k, v in self._values.items()}
        return self._t

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        _, squares = step_grad_norms(trainer, optimizer, pl_module.device, self._shard_group)
        norm = squares.sum().sqrt()
        s = self._state(norm.device)
        finite = torch.isfinite(norm)
        x = torch.where(finite, norm, s["warm_mean"])  # a non-finite norm changes nothing below
        if self.seen < self.warmup_steps:
            s["warm_n"].add_(finite.float())
            delta = x - s["warm_mean"]
            s["warm_mean"].add_(delta / s["warm_n"].clamp_min(1.0))
            s["warm_m2"].add_(delta * (x - s["warm_mean"]))
            if self.seen + 1 == self.warmup_steps:
                s["mean"].copy_(s["warm_mean"])
                s["var"].copy_(s["warm_m2"] / s["warm_n"].clamp_min(1.0))
                s["ready"].copy_((s["warm_n"] > 0).float())
        else:
            std = s["var"].sqrt()
            z = (norm - s["mean"]) / (std + self.eps)
            if self.mode == "threshold":
                threshold = s["mean"] + self.z_thresh * std
            else:
                threshold = s["mean"] + self.z_thresh**2 * std / z.clamp_min(self.z_thresh)
            clip = finite & (s["ready"] > 0) & (z > self.z_thresh)
            # When clip is true, norm > threshold > 0, so the division is safe where it is used.
            scale = torch.where(clip, threshold / norm.clamp_min(torch.finfo(torch.float32).tiny), 1.0)
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            grads = [to_local(p.grad) for p in params]
            if grads:
                torch._foreach_mul_(grads, scale)
            clipped_norm = torch.where(clip, threshold, norm)
            update = finite & (s["ready"] > 0)
            new_mean = self.alpha * s["mean"] + (1 - self.alpha) * clipped_norm
            new_var = self.alpha * s["var"] + (1 - self.alpha) * (clipped_norm - new_mean) ** 2
            s["mean"].copy_(torch.where(update, new_mean, s["mean"]))
            s["var"].copy_(torch.where(update, new_var, s["var"]))
            s["clipped_interval"].add_(clip.float())
            s["clipped_total"].add_(clip.float())
        self.seen += 1
        self._last_step = _compat.logging_step(trainer)
        self._unlogged = True

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._unlogged and self._last_step is not None and (self._last_step + 1) % self._every == 0:
            self._flush()

    # ------------------------------------------------------------------ per interval: host
    def _flush(self) -> None:
        """One device-to-host copy: log the interval's clip count and the current threshold."""
        self._unlogged = False
        if self._t is None:
            return
        s = self._t
        threshold = s["mean"] + self.z_thresh * s["var"].sqrt()
        clipped, threshold, mean = torch.stack([s["clipped_interval"], threshold, s["mean"]]).tolist()
        s["clipped_interval"].zero_()
        metrics = {"zclip/clipped": clipped}
        if self.seen >= self.warmup_steps:
            metrics.update({"zclip/threshold": threshold, "zclip/ema_mean": mean})
        if self._last_step is not None:
            log_to_loggers(self._trainer, [(self._last_step, metrics)])

    # ------------------------------------------------------------------ results and state
    def stats(self) -> dict[str, float]:
        """Current statistics on the host (one transfer): EMA mean/std, threshold, clip counts, steps."""
        v = self._host_values()
        std = max(v["var"], 0.0) ** 0.5
        return {
            "steps": self.seen,
            "warmed_up": self.seen >= self.warmup_steps,
            "mean": v["mean"],
            "std": std,
            "threshold": v["mean"] + self.z_thresh * std,
            "clipped_total": int(v["clipped_total"]),
        }

    def _host_values(self) -> dict[str, float]:
        if self._t is None:
            return dict(self._values)
        return dict(zip(_STATE, torch.stack([self._t[k] for k in _STATE]).tolist()))

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "seen": self.seen,
            "values": self._host_values(),
            **self._tracker.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seen = int(state_dict.get("seen", 0))
        values = state_dict.get("values", {})
        self._values = {k: float(values.get(k, 0.0)) for k in _STATE}
        self._t = None  # rebuilt on the gradients' device at the next step
        self._tracker.load_state_dict(state_dict)
