"""Settings at other hyper-parameters: the dev sweep's grid points and the a-priori rows (protocol v3).

A *variant* is a copy of a setting of :data:`runs.SETTINGS` with ``params``: benchmark settings
(``ewc_lam``, ``replay_buffer``, ``replay_ratio``, ``olora_lam``, ``prefix_tokens``) that its runs use
instead of the benchmark-wide values (:func:`runs.mode_cfg`). It runs, is paired with a plain-LoRA
setting (:data:`results.LORA_PAIRS`) and is reported exactly like the setting it copies.

:func:`apply_chosen` (``continual.py --chosen FILE``) sets the benchmark-wide values to the dev-chosen
ones of ``benchmarks/sweep.py``'s ``chosen.json`` and adds, next to every setting whose chosen values
differ from the a-priori ones, the variant ``<SETTING>-apriori`` at the a-priori values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .results import LORA_PAIRS
from .runs import SETTINGS

PARAMS = ("ewc_lam", "replay_buffer", "replay_ratio", "olora_lam", "prefix_tokens")
"""The benchmark settings a variant may set (each one is also a ``continual.py`` option)."""


def variant_name(base: str, params: dict[str, Any]) -> str:
    """``EWC@ewc_lam=100``, ``REPLAY@replay_buffer=256+replay_ratio=0.5`` (no comma: --settings splits at commas)."""
    return base + "@" + "+".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def register(base: str, params: dict[str, Any], name: str | None = None) -> str:
    """Add the variant of ``base`` at ``params`` to the settings (and to ``base``'s LoRA pair); returns its name.

    Raises:
        ValueError: An unknown setting or parameter, or a name taken by a different setting.
    """
    if base not in SETTINGS or "params" in SETTINGS[base]:
        raise ValueError(f"variant of {base!r}: expected one of the benchmark's settings {list(SETTINGS)[:7]}, ...")
    unknown = [k for k in params if k not in PARAMS]
    if unknown:
        raise ValueError(f"variant of {base}: unknown parameter(s) {unknown}; expected some of {list(PARAMS)}")
    name = name or variant_name(base, params)
    spec = {**SETTINGS[base], "params": dict(params), "variant_of": base}
    if name in SETTINGS and SETTINGS[name] != spec:
        raise ValueError(f"setting {name!r} already exists with other parameters")
    SETTINGS[name] = spec
    if base in LORA_PAIRS:
        LORA_PAIRS[name] = LORA_PAIRS[base]
    return name


def apply_chosen(args: Any, path: Path) -> dict[str, Any]:
    """Use the dev-chosen values of ``path`` (``sweep.py``'s ``chosen.json``) in this benchmark run.

    Sets ``args.<param>`` to each chosen value and inserts ``<SETTING>-apriori`` (the a-priori values)
    after each setting of ``args.settings`` that a group with different chosen values applies to.

    Returns:
        What ``results.json`` records under ``setup.chosen``: the file, its values and the rows added.

    Raises:
        ValueError: The file is not a ``chosen.json`` or names an unknown parameter.
    """
    try:
        data = json.loads(Path(path).read_text())
        groups = data["groups"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--chosen {path}: not a chosen.json written by benchmarks/sweep.py ({err})") from err
    settings = list(args.settings)
    added: list[str] = []
    for group, entry in groups.items():
        chosen, prior = dict(entry["chosen"]), dict(entry["a_priori"])
        for key, value in chosen.items():
            if key not in PARAMS:
                raise ValueError(f"--chosen {path}: group {group!r} sets {key!r}; expected some of {list(PARAMS)}")
            setattr(args, key, value)
        if chosen == prior:
            continue
        for base in entry["settings"]:
            if base in settings:
                name = register(base, prior, name=f"{base}-apriori")
                settings.insert(settings.index(base) + 1, name)
                added.append(name)
    args.settings = settings
    return {"file": str(path), "groups": groups, "a_priori_rows": added, "selection": data.get("selection")}
