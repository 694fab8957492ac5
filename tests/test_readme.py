"""Every command in README.md's fenced ``bash`` blocks runs as written (or is named here as too costly).

The after-training commands (``evaluate``, ``generate``, ``export``, ``compare``) run exactly as written,
in a directory laid out like the repository (``configs/``, ``examples/``), on the runs the README's
``fit`` commands produce. Those ``fit`` commands are parsed as written (``--print_config``); the two
whose runs later commands read (the demo, and NAIVE as the README says to run it) are trained with a
tiny model and budget appended, since the demo's 4 x 200 steps take minutes.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest
from tiny_models import TINY_LLAMA_CONFIG

from crma_lightning.cli import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
NOT_RUN = {
    "pip": "installs packages",
    "python": "the whole test suite (this file is part of it)",
    "tensorboard": "a server; the test checks that the directory it is given exists",
    "export": "sets environment variables for the commands after it (threads, kernel pins: no effect on what runs)",
}
"""First word of a command -> why the test does not run it."""
TINY = [
    "--trainer.max_steps=1",
    "--trainer.enable_progress_bar=false",
    "--data.max_length=32",
    "--data.batch_size=4",
    "--data.max_chars_per_domain=6000",
    "--data.max_eval_rows=4",
    "--model.init_args.model_config=" + json.dumps(TINY_LLAMA_CONFIG),
]
NAIVE_FIT = "crma-lightning fit --config configs/demo.yaml --config configs/naive.yaml"
"""The NAIVE run the README's prose tells the reader to make (its after-training commands read runs/naive)."""


def readme_commands() -> list[str]:
    """Each command of the fenced ``bash`` blocks, ``&&`` chains split, comments and continuations removed."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def run(command: str, *extra: str) -> str:
    """``command`` in this process (``PYTHONPATH=...`` prefixes honoured); its stdout. Fails on a non-zero exit."""
    words = shlex.split(command)
    env = {}
    while "=" in words[0]:
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[0] == "crma-lightning", command
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        if "PYTHONPATH" in env:
            mp.syspath_prepend(str(Path(env["PYTHONPATH"]).resolve()))
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            main([*words[1:], *extra])
            raise SystemExit(0)
    assert exit_info.value.code in (0, None), f"{command!r} exited with {exit_info.value.code}"
    return out.getvalue()


def test_every_readme_command_runs_as_written(tmp_path, monkeypatch):
    for name in ("configs", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    rows = [json.dumps({"text": f"def add_{i}(a, b):\n    return a + b + {i}\n"}) for i in range(40)]
    (tmp_path / "mine.jsonl").write_text("\n".join(rows) + "\n")  # the file the `evaluate --data` example names
    monkeypatch.chdir(tmp_path)

    commands = readme_commands()
    fits = [c for c in commands if shlex.split(c)[:2] == ["crma-lightning", "fit"] or " crma-lightning fit " in c]
    assert "crma-lightning fit --config configs/demo.yaml" in fits
    assert NAIVE_FIT in (ROOT / "README.md").read_text()
    for command in [*fits, NAIVE_FIT]:
        run(command, "--print_config")
    run("crma-lightning fit --config configs/demo.yaml", *TINY)
    run(NAIVE_FIT, *TINY)

    ran = []
    for command in commands:
        first = shlex.split(command)[0]
        if first in NOT_RUN:
            if first == "tensorboard":
                assert Path(shlex.split(command)[-1]).is_dir(), command
            continue
        if command in fits:
            continue
        run(command)
        ran.append(shlex.split(command)[1])
    assert {"evaluate", "generate", "export", "compare"} <= set(ran)
    assert (tmp_path / "out" / "code-peft" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "code-merged" / "config.json").is_file()
    assert (tmp_path / "runs" / "compare").is_dir()
