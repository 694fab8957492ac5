"""Hyper-parameters: what a module's checkpoint records, and what TensorBoard's HParams tab compares.

``ContinualLM`` records the init arguments of its whole class chain (a research subclass's own
arguments included), as plain values: a dataclass becomes a dict, a continual method its name and
settings, an optimizer factory is left out (``config.yaml`` holds it). Plain values keep checkpoints
loadable with ``torch.load(weights_only=True)`` and ``hparams.yaml`` readable.

At the end of a run, :func:`log_final_hparams` writes the flattened hyper-parameters with the run's
final numbers (``hp/drift_mean``, ``hp/plasticity_mean``, ...) to every TensorBoard logger, so the
HParams tab lines runs up by setting and outcome.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities.parsing import collect_init_args

NOT_RECORDED = ("self", "optimizer", "lr_scheduler")
"""Init arguments left out: callables whose settings ``config.yaml`` already records."""


def init_arguments(frame: types.FrameType | None, base: type) -> dict[str, Any]:
    """Init arguments of every ``__init__`` of ``base``'s chain on the stack above ``frame``, most specific last.

    Args:
        frame: The frame of ``base.__init__`` (``inspect.currentframe()`` there).
        base: The class whose subclasses' ``__init__`` frames count.
    """
    values: dict[str, Any] = {}
    if frame is None:  # an interpreter without frame support: the base's own arguments only
        return values
    for level in collect_init_args(frame, [], classes=(base,)):
        values.update(level)
    return {k: v for k, v in values.items() if k not in NOT_RECORDED and not k.startswith("_")}


def plain(value: Any) -> Any:
    """``value`` as plain data: dataclass -> dict, method -> ``{"name", ...settings}``, unknown object -> repr."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    config = getattr(value, "config", None)
    if callable(config) and hasattr(value, "name"):  # a ContinualMethod: its name and hyper-parameters
        return {"name": value.name, **plain(config())}
    if inspect.isclass(value) or callable(value):
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}".lstrip(".")
    return repr(value)


def class_path(obj: Any) -> str:
    """``module.QualName`` of a class, or of an object's class (what a ``class_path`` in YAML names)."""
    cls = obj if inspect.isclass(obj) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"lora": {"r": 8}}`` -> ``{"lora/r": 8}``; lists and ``None`` become strings (HParams takes scalars)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}/"))
        elif isinstance(value, bool | int | float | str):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def final_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """The run's outcome as HParams metrics (finite values only).

    Forgetting, plasticity, stability, routing, and the task scores (AP, BWT_score, mean forgetting) when
    domains have a metric.
    """
    metrics = report.get("metrics") or {}
    run = (report.get("gradients") or {}).get("run") or {}
    routed = ((report.get("routing") or {}).get("metrics_routed")) or {}
    scores = report.get("score_matrix") or {}
    candidates = {
        "hp/drift_mean": metrics.get("drift_mean"),
        "hp/base_relative_forgetting_mean": metrics.get("base_relative_forgetting_mean"),
        "hp/bwt": metrics.get("bwt"),
        "hp/plasticity_mean": metrics.get("plasticity_mean"),
        "hp/grad_norm_cv": run.get("cv"),
        "hp/grad_norm_peak_over_median": run.get("peak_over_median"),
        "hp/drift_mean_routed": routed.get("drift_mean"),
        "hp/ap": scores.get("ap"),
        "hp/bwt_score": scores.get("bwt_score"),
        "hp/forgetting_mean": scores.get("forgetting_mean"),
    }
    return {k: float(v) for k, v in candidates.items() if isinstance(v, int | float) and math.isfinite(v)}


def log_final_hparams(loggers: list[Logger], hparams: Mapping[str, Any], report: Mapping[str, Any]) -> None:
    """Write ``hparams`` with the report's final metrics to each TensorBoard logger (the HParams tab)."""
    metrics = final_metrics(report)
    if not metrics:
        return
    params = flatten(plain(dict(hparams)))
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params, metrics)
            logger.experiment.flush()
