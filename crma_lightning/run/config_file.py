"""The ``config.yaml`` of a run started from Python, in the layout ``crma-lightning fit`` writes.

``crma-lightning evaluate``/``generate``/``export`` rebuild a run's model and data from its
``config.yaml`` with the ``fit`` parser. A :class:`~crma_lightning.run.runner.ContinualRunner` given no
configuration text (a run made from Python) writes one built here from the objects themselves: the
model's class path and recorded init arguments (its hyper-parameters, a subclass's own included), the
method and optimizer as ``class_path``/``init_args``, the data module's init arguments, the plain
trainer settings and the routing settings. What cannot be written as plain values (a strategy or
logger object, a lambda optimizer) is left out and the ``fit`` defaults apply when the run is read.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import yaml

from crma_lightning.model.hparams import class_path, plain


def _callable_spec(factory: Any) -> dict[str, Any] | None:
    """An optimizer/scheduler factory as ``{"class_path", "init_args"}``: a class or a ``functools.partial`` of one."""
    if inspect.isclass(factory):
        return {"class_path": class_path(factory)}
    if isinstance(factory, functools.partial) and inspect.isclass(factory.func) and not factory.args:
        return {"class_path": class_path(factory.func), "init_args": plain(dict(factory.keywords))}
    return None


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def model_section(model: Any) -> dict[str, Any]:
    """``model:`` - the module's class path and init arguments (``ContinualLM`` records them as hyper-parameters)."""
    init_args = dict(plain(dict(model.hparams)))
    method = getattr(model, "method", None)
    init_args["method"] = None if method is None else {"class_path": class_path(method), "init_args": method.config()}
    for key, factory in (("optimizer", model.optimizer_factory), ("lr_scheduler", model.lr_scheduler_factory)):
        spec = _callable_spec(factory)
        if spec is not None:
            init_args[key] = spec
    return {"class_path": class_path(model), "init_args": init_args}


def python_run_config(
    model: Any,
    datamodule: Any,
    run: dict[str, Any],
    trainer_kwargs: dict[str, Any],
    seed: int,
    routing: Any = None,
) -> str:
    """The ``config.yaml`` text of a run made from Python (see the module docstring)."""
    config: dict[str, Any] = {
        "seed_everything": seed,
        "run": run,
        "trainer": {k: v for k, v in trainer_kwargs.items() if _is_plain(v)},
        "model": model_section(model),
        "data": datamodule.config(),
    }
    if routing is not None:
        config["routing"] = routing.config.as_dict()
    return "# written by ContinualRunner (a run made from Python)\n" + yaml.safe_dump(config, sort_keys=False)
