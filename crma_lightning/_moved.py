"""Import paths of modules that moved when the package was laid out by concept (0.1 -> 0.2).

A run directory's ``config.yaml`` records class paths (``crma_lightning.module.ContinualLM``), and user
code imports modules by path (``crma_lightning.prototype.load_router``). Both keep working: an old path
resolves to the module that now holds its code - the same module object, so ``isinstance`` checks and
monkeypatches see one module. New code uses the new paths (docs/architecture.md lists them).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

PACKAGE = "crma_lightning"

# Old module (relative to the package) -> the module that holds its code now.
MOVED = {
    "merging": "adapters.merging",
    "grad_norms": "parallel.grad_norms",
    "task_metrics": "metrics.task",
    "domains": "data.domains",
    "builtin_domains": "data.builtin_domains",
    "builtin_tasks": "data.builtin_tasks",
    "rows": "data.row_formats",
    "tokenization": "data.packing",
    "tokenizer": "data.tokenizer",
    "prepared": "data.prepare",
    "sampling": "data.sampling",
    "method_hooks": "methods.hooks",
    "prototype": "routing.prototype",
    "module": "model.continual_lm",
    "adapter_state": "model.checkpoint_state",
    "compatibility": "model.identity",
    "base_model": "model.base_model",
    "task_adapters": "model.task_adapters",
    "hparams": "model.hparams",
    "optim": "model.optim",
    "nonfinite": "model.nonfinite",
    "compiling": "model.compile",
    "rng": "model.rng",
    "scoring": "evaluation.scoring",
    "report": "evaluation.report",
    "plotting": "evaluation.plotting",
    "runner": "run.runner",
    "stage_trainers": "run.stage_trainers",
    "checkpoints": "run.checkpoints",
    "resume_settings": "run.resume_settings",
    "interrupts": "run.interrupts",
    "run_lock": "run.lock",
    "manifest": "run.manifest",
    "run_config": "run.config_file",
    "run_dir": "cli.run_dir",
    "callbacks.evaluation": "callbacks.domain_evaluation",
    "callbacks.gradient": "callbacks.gradient_stability",
    "callbacks.routing": "callbacks.routed_evaluation",
}
# `crma_lightning.data`, `.routing`, `.metrics` and `.generation` were modules and are packages now:
# their `__init__` exports what the old module did, so they need no entry here.


class _MovedLoader(importlib.abc.Loader):
    """Hands out the already-imported new module under the old name."""

    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return importlib.import_module(self.target)

    def exec_module(self, module: ModuleType) -> None:
        """Nothing to run: the new module is imported already."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Resolves ``crma_lightning.<old path>`` to the module of :data:`MOVED`."""

    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        old = fullname.removeprefix(PACKAGE + ".")
        if old == fullname or old not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MovedLoader(f"{PACKAGE}.{MOVED[old]}"))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
