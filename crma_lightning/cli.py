"""``crma-lightning``: the LightningCLI entry point that runs a whole continual sequence.

``crma-lightning fit --config configs/demo.yaml`` parses the YAML (omegaconf interpolation on),
builds the model, the datamodule and the per-stage trainer settings, then hands them to the
:class:`~crma_lightning.continual.ContinualRunner` - one ``fit`` per domain - and prints the report.
``--print_config``, ``--model.adapter=lora`` style overrides and ``class_path`` subclasses work as
in any LightningCLI program; an unknown or mistyped key fails before anything is built.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from crma_lightning.callbacks.evaluation import DomainEvaluation
from crma_lightning.callbacks.gradient import GradientStability
from crma_lightning.continual import ContinualRunner, RunInterrupted
from crma_lightning.data import SequentialDomainDataModule
from crma_lightning.module import ContinualLM
from crma_lightning.nonfinite import NonFiniteError
from crma_lightning.report import render_markdown
from crma_lightning.utils import is_global_zero


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
    """LightningCLI whose ``fit`` runs every stage of a :class:`SequentialDomainDataModule`."""

    def __init__(self, args: Any = None, run: bool = True, **kwargs: Any) -> None:
        parser_kwargs = kwargs.pop("parser_kwargs", {})
        parser_kwargs.setdefault("parser_mode", "omegaconf")
        super().__init__(
            ContinualLM,
            SequentialDomainDataModule,
            subclass_mode_model=True,
            save_config_callback=None,
            auto_configure_optimizers=False,
            parser_kwargs={"fit": parser_kwargs} if "fit" not in parser_kwargs else parser_kwargs,
            args=args,
            run=run,
            **kwargs,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # Only `fit`: it runs the whole sequence (evaluation after each stage is part of it).
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(RunConfig, "run")
        parser.add_lightning_class_args(GradientStability, "gradient_stability")
        parser.add_lightning_class_args(DomainEvaluation, "evaluation")
        parser.set_defaults({"model": {"class_path": "crma_lightning.module.ContinualLM"}})

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Any:
        # Keep what each stage's trainer needs: the shared callbacks/loggers and pristine copies of
        # stateful objects (a strategy instance belongs to one trainer).
        self.stage_trainer_kwargs = {
            k: (copy.deepcopy(v) if k in ("strategy", "plugins") and not isinstance(v, (str, type(None))) else v)
            for k, v in config.items()
        }
        self.stage_callbacks = list(callbacks) + list(config.get("callbacks") or [])
        self.stage_trainer_kwargs.pop("callbacks", None)
        config = dict(config, logger=False)  # the CLI's own trainer only validates the settings
        return super()._instantiate_trainer(config, callbacks)

    def fit(
        self, model: ContinualLM, datamodule: SequentialDomainDataModule, ckpt_path: str | None = None, **_: Any
    ) -> None:
        cfg = self.config[self.subcommand]
        run = cfg["run"]
        resume = run["resume"] if ckpt_path in (None, "last") else ckpt_path  # Lightning's flag, our resume
        runner = ContinualRunner(
            run_dir=run["dir"],
            trainer_kwargs=self.stage_trainer_kwargs,
            callbacks=self.stage_callbacks,
            seed=int(cfg["seed_everything"]) if not isinstance(cfg["seed_everything"], bool) else 0,
            resume=resume,
            checkpoint_every_n_steps=run["checkpoint_every_n_steps"],
            save_stage_adapters=run["save_stage_adapters"],
            config={"cli": self._config_dict()},
        )
        # Every check that needs no training - data, budgets, batch sizes, the checkpoint to resume - runs
        # before anything is written: a bad file or setting leaves no run directory behind, and a refused
        # resume leaves the run directory's config.yaml matching its checkpoints.
        runner.preflight(model, datamodule, world_size=self.trainer.world_size)
        self._save_config(Path(run["dir"]))
        try:
            report = runner.run(model, datamodule)
        except (ValueError, MisconfigurationException) as err:
            # After preflight, a ValueError is a failure of the run (a hook, a library), not a bad setting:
            # keep its traceback and exit 1 instead of being reported as a configuration error (exit 2).
            raise RunFailed(f"the run failed: {type(err).__name__}: {err}") from err
        if not is_global_zero():
            return  # every process runs this; one report on the console is enough
        if runner.loggers and getattr(runner.loggers[0], "log_dir", None):
            print(f"\nTensorBoard: tensorboard --logdir {runner.loggers[0].log_dir}")
        print("\n" + render_markdown(report))

    def _config_dict(self) -> dict[str, Any]:
        import yaml

        text = self.parser.dump(self.config, skip_none=False, skip_check=True)
        return yaml.safe_load(text).get(self.subcommand, {})

    def _save_config(self, run_dir: Path) -> None:
        if int(os.environ.get("LOCAL_RANK", 0)) != 0 or int(os.environ.get("NODE_RANK", 0)) != 0:
            return
        from crma_lightning.adapters.serialization import atomic_write

        parser = self._parser(self.subcommand)
        text = parser.dump(self.config[self.subcommand], skip_none=False, skip_check=True)
        atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))


def main(args: Any = None) -> None:
    """Console entry point; exit codes: 0 done, 1 failed, 2 bad configuration, 130/143 interrupted."""
    try:
        CRMALightningCLI(args=args)
    except RunInterrupted as err:
        print(f"\n[crma_lightning] {err}. Run the same command again to resume.", file=sys.stderr)
        sys.exit(128 + int(err.signum))
    except NonFiniteError as err:
        print(f"\n[crma_lightning] stopped: {err}", file=sys.stderr)
        sys.exit(1)
    except (ValueError, MisconfigurationException) as err:  # bad configuration or data, caught before training
        if os.environ.get("CRMA_DEBUG"):
            raise
        print(f"\n[crma_lightning] error: {_root_message(err)}", file=sys.stderr)
        sys.exit(2)


def _root_message(err: BaseException) -> str:
    """The message of the error our code raised, not jsonargparse's wrapper around it.

    A ``ValueError`` raised while a ``class_path`` class is built reaches us wrapped ("Does not validate
    against any of the Union subtypes ..." followed by a dump of every init argument), with the original
    as its cause; that original names the setting at fault.
    """
    while err.__cause__ is not None and _raised_in_jsonargparse(err):
        err = err.__cause__
    return str(err)


def _raised_in_jsonargparse(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "jsonargparse" in tb.tb_frame.f_code.co_filename


if __name__ == "__main__":  # pragma: no cover
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
