"""What happens to changed settings on resume: the per-stage configuration record and the optimizer.

A mid-stage checkpoint restores the optimizer and LR scheduler state - including their settings (the
learning rate, weight decay, betas, the scheduler's base rates). Left alone, a learning rate changed
before resuming would be silently ignored for the rest of that stage. :class:`OptimizerSettings`
applies the current configuration's settings to the restored optimizer instead: Adam's moments and
the scheduler's position are kept, the settings are the new ones, and the change is reported.
Changing the optimizer or scheduler *class* mid-stage is refused up front
(:func:`optimizer_class_changes`): the saved state of one optimizer cannot be given to another.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import lightning as L
import yaml

from crma_lightning.adapters.serialization import atomic_write

IGNORED_KEYS = ("ckpt_path", "run.resume")
"""How the run was resumed, not how it trains: left out of the configuration change log."""

OPTIMIZER_CLASS_KEYS = ("model.init_args.optimizer.class_path", "model.init_args.lr_scheduler.class_path")
_NOT_SETTINGS = ("params", "name", "initial_lr")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def config_diff(old_text: str | None, new_text: str) -> dict[str, list[Any]]:
    """``{"dotted.key": [old, new]}`` for every setting that differs between two resolved YAML configs."""
    if old_text is None:
        return {}
    old, new = _flatten(yaml.safe_load(old_text) or {}), _flatten(yaml.safe_load(new_text) or {})
    return {
        key: [old.get(key), new.get(key)]
        for key in sorted(set(old) | set(new))
        if key not in IGNORED_KEYS and old.get(key) != new.get(key)
    }


def optimizer_class_changes(changes: dict[str, list[Any]]) -> list[str]:
    """The optimizer/scheduler class changes among ``changes`` (a scheduler added or removed counts)."""
    out = []
    for key, (old, new) in changes.items():
        if key in OPTIMIZER_CLASS_KEYS or (key == "model.init_args.lr_scheduler" and (old is None) != (new is None)):
            out.append(f"{key}: checkpoint {old!r} vs now {new!r}")
    return out


def record_stage_configs(state: Any, text: str, mid_stage: bool, step: int) -> None:
    """Record ``text`` as the configuration of every stage from ``state.completed`` on; log what changed.

    ``state`` is the :class:`~crma_lightning.run.checkpoints.RunState`. The stages already finished keep the
    configuration they were trained with (restored from the checkpoint). The change is compared with
    the configuration of the stage being resumed (mid-stage) or of the previous stage.
    """
    first, domains = state.completed, state.domains
    if first >= len(domains):
        return
    before = domains[first] if mid_stage else (domains[first - 1] if first > 0 else None)
    changes = config_diff(state.stage_configs.get(before) if before else None, text)
    if changes:
        entry = {"stage": first + 1, "domain": domains[first], "mid_stage": mid_stage, "changes": changes}
        state.config_changes.append({**entry, "at_step": step} if mid_stage else entry)
    for domain in domains[first:]:
        state.stage_configs[domain] = text


def write_stage_configs(run_dir: Path, state: Any, domains: list[str]) -> None:
    """``configs/stage-NN-<domain>.yaml``: the configuration each finished stage ended with (rank 0)."""
    for stage, domain in enumerate(domains[: state.completed]):
        text = state.stage_configs.get(domain)
        path = Path(run_dir) / "configs" / f"stage-{stage + 1:02d}-{domain}.yaml"
        if text is not None and not (path.is_file() and path.read_text() == text):
            atomic_write(path, lambda tmp, text=text: Path(tmp).write_text(text))


def refuse_optimizer_class_change(path: Path, ckpt: dict[str, Any], text: str | None, domains: list[str]) -> None:
    """``ValueError`` when a mid-stage checkpoint's optimizer or scheduler class differs from ``text``'s."""
    state = ckpt.get("callbacks", {}).get("_RunState", {})
    completed = int(state.get("completed", 0))
    saved = state.get("stage_configs", {}).get(domains[completed]) if completed < len(domains) else None
    if text is None or saved is None:
        return
    problems = optimizer_class_changes(config_diff(saved, text))
    if problems:
        raise ValueError(
            f"cannot resume mid-stage from {path}: the optimizer changed ({'; '.join(problems)}), and its saved "
            "state cannot be given to another optimizer or scheduler. Resume with the original class, or "
            f"from the stage checkpoint before it (run.resume: <run_dir>/checkpoints/stage-{completed:02d}-...ckpt) "
            "to restart the stage with the new one"
        )


def name_the_domain(message: str, specs: list[Any]) -> str:
    """Prefix ``domain '<name>': `` to a data error that names a domain's file but not the domain."""
    if message.startswith("domain ") or "domain '" in message:
        return message
    for spec in specs:
        paths = [spec.path, spec.holdout_path]
        for p in [q for item in paths if item for q in ([item] if isinstance(item, str) else item)]:
            if re.search(re.escape(repr(p)) + r"|" + re.escape(str(p)), message):
                return f"domain {spec.name!r}: {message}"
    return message


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class OptimizerSettings:
    """Remembers the optimizers' settings before a checkpoint restores them, then puts them back.

    :meth:`remember` runs in ``on_fit_start`` (the optimizers are built from the current configuration,
    nothing restored yet); :meth:`apply` in ``on_train_start`` (the checkpoint's optimizer and
    scheduler states are loaded). Settings that are equal are left untouched, so an unchanged
    configuration resumes bit for bit.
    """

    def __init__(self) -> None:
        self._groups: list[list[dict[str, Any]]] = []

    def remember(self, trainer: L.Trainer) -> None:
        self._groups = [
            [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
            for optimizer in trainer.optimizers
        ]

    def apply(self, trainer: L.Trainer) -> list[str]:
        """Give the restored optimizers the remembered settings; returns ``"group.key: old -> new"`` lines."""
        applied: list[str] = []
        schedulers = {id(cfg.scheduler.optimizer): cfg.scheduler for cfg in trainer.lr_scheduler_configs}
        for o, (optimizer, wanted) in enumerate(zip(trainer.optimizers, self._groups)):
            scheduler = schedulers.get(id(optimizer))
            for g, (group, new) in enumerate(zip(optimizer.param_groups, wanted)):
                label = new.get("name", f"optimizer{o}.group{g}")
                for key, value in new.items():
                    if key in _NOT_SETTINGS or (key == "lr" and scheduler is not None):
                        continue
                    if _plain(group.get(key)) != _plain(value):
                        applied.append(f"{label}.{key}: {group.get(key)!r} -> {value!r}")
                        group[key] = value
                if scheduler is not None and "initial_lr" in new and group.get("initial_lr") != new["initial_lr"]:
                    # The scheduler scales its base rates: rescale the current rate, keep the schedule's position.
                    old_base, new_base = group.get("initial_lr") or 0.0, new["initial_lr"]
                    applied.append(f"{label}.lr (scheduler base): {old_base!r} -> {new_base!r}")
                    group["lr"] = group["lr"] * new_base / old_base if old_base else new_base
                    group["initial_lr"] = new_base
                    if hasattr(scheduler, "base_lrs") and g < len(scheduler.base_lrs):
                        scheduler.base_lrs[g] = new_base
        self._groups = []
        return applied


__all__ = [
    "OptimizerSettings",
    "config_diff",
    "name_the_domain",
    "optimizer_class_changes",
    "record_stage_configs",
    "refuse_optimizer_class_change",
    "write_stage_configs",
]
