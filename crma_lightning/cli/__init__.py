"""The ``crma-lightning`` command: one entry point, one subcommand per file of this package.

``crma-lightning fit --config configs/demo.yaml`` trains a continual sequence (:mod:`.fit`). To add a
subcommand, write ``cli/<name>.py`` with a ``run_<name>(args)`` function and register it in
:data:`COMMANDS`; errors are turned into exit codes here, the same way for every subcommand.

Quiet by default: Lightning's tips, its "Seed set to N" and "`Trainer.fit` stopped" lines and
transformers' loading/writing progress bars are left out, and the model summary is one line of
parameter counts. ``CRMA_VERBOSE=1`` shows everything the libraries print.

Exit codes: 0 done, 1 the run failed, 2 bad configuration or input, or an environment problem (full
disk, unwritable directory, missing model, offline hub): one line naming the key or path, no traceback
(set ``CRMA_DEBUG=1`` for the traceback); 3 every stage ran but a held-out loss is NaN/inf; 128 +
signal when interrupted (resumable).
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from crma_lightning import __version__, _compat

COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("crma_lightning.cli.fit:run_fit", "train on every domain in turn, evaluating all domains after each stage"),
    "evaluate": ("crma_lightning.cli.evaluate:run_evaluate", "re-evaluate a run: loss matrix, forgetting metrics"),
    "generate": ("crma_lightning.cli.generate:run_generate", "text from a run: one task's adapter, or --routing"),
    "export": ("crma_lightning.cli.export:run_export", "a task's adapter as PEFT or a merged HF model"),
    "compare": ("crma_lightning.cli.compare:run_compare", "one table across runs, and their settings"),
}
"""Subcommand name -> (``module:function`` taking the remaining arguments, one-line description)."""

HELP = f"""usage: crma-lightning [--help] [--version] COMMAND [ARGS]

crma-lightning {__version__}: continual parameter-efficient fine-tuning of Hugging Face causal LMs
with LoRA or CRMA adapters on PyTorch Lightning. Trains one stage per domain, evaluates every domain
after every stage, and reports forgetting (drift, BWT), gradient stability and CRMA health.

commands:
{{commands}}

Run `crma-lightning COMMAND --help` for a command's options, e.g.
  crma-lightning fit --config configs/demo.yaml
  crma-lightning fit --config configs/demo.yaml --print_config
"""


def main(args: list[str] | None = None) -> None:
    """Console entry point: dispatch to a subcommand and turn its errors into exit codes."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        width = max(len(n) for n in COMMANDS)
        listing = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
        print(HELP.format(commands=listing))
        sys.exit(0 if argv else 2)
    if argv[0] in ("-V", "--version"):
        print(f"crma-lightning {__version__}")
        sys.exit(0)
    if argv[0] not in COMMANDS:
        _fail(f"unknown command {argv[0]!r}: expected one of {sorted(COMMANDS)} (see crma-lightning --help)")
    run_with_exit_codes(_command(argv[0]), argv[1:])


def _command(name: str) -> Callable[[list[str]], Any]:
    module, function = COMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), function)


def run_with_exit_codes(command: Callable[[list[str]], Any], args: list[str]) -> None:
    """Run ``command(args)``; map interrupts, non-finite stops and bad input to exit codes and one line."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from crma_lightning.evaluation.report import NonFiniteResults
    from crma_lightning.model.nonfinite import NonFiniteError
    from crma_lightning.run.interrupts import RunInterrupted

    _compat.silence_known_library_warnings()
    _log_to_stdout()
    from crma_lightning.run.stage_trainers import verbose

    _library_verbosity(verbose())
    try:
        command(args)
    except RunInterrupted as err:
        print(f"\n[crma_lightning] {err}. Run the same command again to resume.", file=sys.stderr)
        sys.exit(128 + int(err.signum))
    except NonFiniteError as err:
        print(f"\n[crma_lightning] stopped: {err}", file=sys.stderr)
        sys.exit(1)
    except NonFiniteResults as err:
        print(f"\n[crma_lightning] finished with non-finite results: {err}", file=sys.stderr)
        sys.exit(3)
    except (ValueError, MisconfigurationException) as err:  # bad configuration or data, caught before training
        if os.environ.get("CRMA_DEBUG"):
            raise
        _fail(root_message(err))
    except OSError as err:  # the environment: a full disk, a read-only or missing directory
        if os.environ.get("CRMA_DEBUG") or err.errno not in ENVIRONMENT_ERRNOS:
            raise
        _fail(f"{err.strerror or err}: {err.filename}" if err.filename else str(err))


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is now (a later ``main`` in the same process may have replaced it)."""

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _log_to_stdout() -> None:
    """Show the library's own messages (``logging.getLogger("crma_lightning")``, INFO) on stdout, once."""
    log = logging.getLogger("crma_lightning")
    if not log.handlers:
        handler = _StdoutHandler()
        handler.setFormatter(logging.Formatter("[crma_lightning] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


class _DropNoise(logging.Filter):
    """Drops info lines of Lightning's that say nothing about this run (the same on every command)."""

    NOISE = ("Seed set to ", "💡 Tip", "litlogger", "`Trainer.fit` stopped: `max_steps=")

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not any(n in record.getMessage() for n in self.NOISE)


def _library_verbosity(verbose: bool) -> None:
    """Quiet (the default): filter Lightning's noise lines, no transformers progress bars. Verbose: all of it."""
    from transformers.utils import logging as transformers_logging

    names = (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.fabric.utilities.seed",
    )
    for name in names:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, _DropNoise)]:
            logger.removeFilter(old)
        if not verbose:
            logger.addFilter(_DropNoise())
    if verbose:
        transformers_logging.enable_progress_bar()
    else:
        transformers_logging.disable_progress_bar()


ENVIRONMENT_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EIO}
)
"""``OSError`` numbers that the user fixes outside the program: one line naming the path, exit 2."""


def _fail(message: str) -> None:
    print(f"\n[crma_lightning] error: {message}", file=sys.stderr)
    sys.exit(2)


def root_message(err: BaseException) -> str:
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


__all__ = ["COMMANDS", "main", "root_message", "run_with_exit_codes"]
