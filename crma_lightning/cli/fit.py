"""``crma-lightning fit``: a LightningCLI that parses the YAML and hands one run plan to the runner.

The YAML is parsed by ``LightningCLI`` (omegaconf interpolation on), so ``--print_config``,
``--model.init_args.adapter=lora`` overrides and ``class_path`` subclasses work as in any
LightningCLI program, and an unknown or mistyped key fails before anything is built. The CLI builds
no ``Trainer``: it instantiates the model and the datamodule, collects the trainer settings,
callbacks and run settings into a :class:`~crma_lightning.run.runner.ContinualRunner`, and calls its
``run`` once. The runner does everything else exactly once (checks, config file, stages, report).
"""

from __future__ import annotations

import re
from argparse import ArgumentError
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from crma_lightning.callbacks.domain_evaluation import DomainEvaluation
from crma_lightning.callbacks.gradient_stability import GradientStability
from crma_lightning.callbacks.routed_evaluation import RoutedEvaluation
from crma_lightning.data.datamodule import SequentialDomainDataModule
from crma_lightning.evaluation.report import NonFiniteResults
from crma_lightning.model.continual_lm import ContinualLM
from crma_lightning.parallel.dist import is_global_zero
from crma_lightning.run.runner import ContinualRunner


class RunFailed(RuntimeError):
    """An error during training or evaluation (after every up-front check passed): exit code 1."""


@dataclass
class RunConfig:
    """Settings of the continual run itself (the ``run:`` section of the YAML).

    Attributes:
        dir: Run directory: checkpoints, adapters, TensorBoard logs, ``report.json``/``report.md``.
        resume: ``auto`` (continue from the newest valid checkpoint in ``dir``), ``never`` (refuse a
            ``dir`` that holds checkpoints) or the path of a checkpoint.
        checkpoint_every_n_steps: Also write a mid-stage checkpoint every n optimizer steps.
        save_stage_adapters: Write all adapters (safetensors) after every stage.
    """

    dir: str = "runs/crma"
    resume: str = "auto"
    checkpoint_every_n_steps: int | None = None
    save_stage_adapters: bool = True


class CRMALightningCLI(LightningCLI):
    """LightningCLI (without subcommands: ``crma-lightning fit`` dispatches here) that builds a run plan.

    After construction, :attr:`runner` holds the plan and :attr:`model` / :attr:`datamodule` the
    instantiated classes; :func:`run_fit` runs it.
    """

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        parser_kwargs = {
            "parser_mode": "omegaconf",
            "prog": "crma-lightning fit",
            "exit_on_error": False,  # a bad key raises: run_fit prints the error alone, not 60 lines of usage
            **kwargs.pop("parser_kwargs", {}),
        }
        self.runner: ContinualRunner | None = None
        super().__init__(
            ContinualLM,
            SequentialDomainDataModule,
            subclass_mode_model=True,
            save_config_callback=None,
            auto_configure_optimizers=False,
            parser_kwargs=parser_kwargs,
            args=args,
            run=False,
            **kwargs,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Lightning's parsing; a ``class_path`` that does not import becomes one line saying how to fix it."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            hint = import_hint(str(err))
            if hint is None:
                raise
            raise ValueError(hint) from err

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunConfig, "run")
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help="Resume from this checkpoint: the same as --run.resume PATH (same checks, same errors).",
        )
        parser.add_lightning_class_args(GradientStability, "gradient_stability")
        parser.add_lightning_class_args(DomainEvaluation, "evaluation")
        parser.add_lightning_class_args(RoutedEvaluation, "routing")
        parser.set_defaults({"model": {"class_path": "crma_lightning.model.continual_lm.ContinualLM"}})

    def instantiate_classes(self) -> None:
        """Build the model, the datamodule and the run plan; no ``Trainer`` (each stage makes its own)."""
        self.config_init = self.parser.instantiate_classes(self.config)
        self.model = self.config_init["model"]
        self.datamodule = self.config_init["data"]
        self.trainer = None
        trainer_kwargs = dict(self.config_init["trainer"])
        callbacks = [self.config_init[key] for key in self.parser.callback_keys]
        callbacks += list(trainer_kwargs.pop("callbacks", None) or [])
        text = self.parser.dump(self.config, skip_none=False, skip_check=True)
        run = self.config["run"]
        ckpt_path = self.config.get("ckpt_path")
        seed = self.config["seed_everything"]
        self.runner = ContinualRunner(
            run_dir=run["dir"],
            trainer_kwargs=trainer_kwargs,
            callbacks=callbacks,
            seed=int(seed) if not isinstance(seed, bool) else 0,
            resume=run["resume"] if ckpt_path in (None, "last") else ckpt_path,  # Lightning's flag, our resume
            checkpoint_every_n_steps=run["checkpoint_every_n_steps"],
            save_stage_adapters=run["save_stage_adapters"],
            config={"cli": yaml.safe_load(text)},
            config_text=text,
        )


def run_fit(args: list[str]) -> None:
    """Parse ``args`` (what follows ``fit``), run every stage, print the report (rank 0).

    Raises:
        ValueError: A bad key, value, data file or checkpoint (exit 2).
        NonFiniteResults: Every stage ran but a held-out loss is NaN/inf (exit 3, after the report).
    """
    check_config_files(args)
    try:
        cli = CRMALightningCLI(args=args)
    except ArgumentError as err:
        raise ValueError(parser_message(str(err))) from err
    runner = cli.runner
    assert runner is not None
    try:
        report = runner.run(cli.model, cli.datamodule)
    except (ValueError, MisconfigurationException) as err:
        if runner.state.completed == 0 and not runner.started:
            raise  # an up-front check: a bad setting, exit 2
        # Once training began, a ValueError is a failure of the run (a hook, a library), not a bad setting:
        # keep its traceback and exit 1 instead of being reported as a configuration error (exit 2).
        raise RunFailed(f"the run failed: {type(err).__name__}: {err}") from err
    except OSError as err:
        if err.filename is None:
            err.filename = str(runner.run_dir)  # name the path the message is about
        raise
    if not is_global_zero():
        return  # every process runs this; one report on the console is enough
    if runner.loggers and getattr(runner.loggers[0], "log_dir", None):
        print(f"\nTensorBoard: tensorboard --logdir {runner.loggers[0].log_dir}")
    print("\n" + (Path(runner.run_dir) / "report.md").read_text())
    if report.get("nonfinite_evaluations"):
        raise NonFiniteResults(f"{report['status']}; see {Path(runner.run_dir) / 'report.md'}")


def check_config_files(args: list[str]) -> None:
    """Each ``--config FILE`` must be YAML: the error names the file, line and column.

    The parser reads a config file as a string and so names it ``"<unicode string>"`` in its errors.
    """
    paths = [b for a, b in pairwise(args) if a == "--config"] + [
        a.split("=", 1)[1] for a in args if a.startswith("--config=")
    ]
    for path in paths:
        try:
            text = Path(path).read_text()
        except OSError:
            continue  # not a file (or unreadable): the parser says so itself
        try:
            yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"config file {path} is not valid YAML:{where}: {problem}") from None


_CLASS_PATH_PROBLEM = re.compile(r"Problem with given class_path '([^']+)':\s*([^\n]*)")


def import_hint(message: str) -> str | None:
    """For the parser's "Problem with given class_path" error: what is not importable and how to fix it, on one line.

    ``None`` for any other error. A subclass of ``ContinualLM`` (or a method, optimizer, ...) named by
    ``class_path`` must be importable by the process that reads the configuration - ``fit``, and later
    ``evaluate``/``generate``/``export`` on the run directory.
    """
    matches = list(_CLASS_PATH_PROBLEM.finditer(message))
    if not matches:
        return None
    match = matches[-1]  # the innermost: a method's class_path inside the model's reports through both
    path, problem = match.group(1), match.group(2).strip()
    module = path.rpartition(".")[0]
    missing = re.search(r"No module named '([^']+)'", problem)
    if not missing and "has no attribute" not in problem and "cannot import name" not in problem:
        return None  # the class imported; the problem is one of its arguments
    if module == "__main__":
        return (
            f"class_path {path!r} was defined in a script (__main__), which no other process can import: "
            "move the class into a module and set PYTHONPATH to its directory, or install your package"
        )
    if missing and (module == missing.group(1) or module.startswith(missing.group(1) + ".")):
        return (
            f"class_path {path!r} is not importable (no module named {missing.group(1)!r}): set PYTHONPATH to "
            "the directory that holds it, or install your package (pip install -e .)"
        )
    if missing:
        return f"class_path {path!r}: its module imports {missing.group(1)!r}, which is not installed ({problem})"
    return (
        f"class_path {path!r} is not importable ({problem}): check the name, and set PYTHONPATH to the directory "
        "that holds the module or install your package"
    )


def parser_message(message: str) -> str:
    """The parser's error on one line, without its dump: for a ``class_path`` key, the subtype's own complaint."""
    noise = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value")
    lines = [line.strip().lstrip("- ") for line in message.strip().splitlines()]
    lines = [
        line
        for line in lines
        if line and not line.startswith(noise) and not line.startswith("Expected a <class 'NoneType'>")
    ]
    return " ".join(lines) + " (see crma-lightning fit --help)"
