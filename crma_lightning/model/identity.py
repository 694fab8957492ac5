"""Whether a checkpoint may be resumed into this run: one comparison of identities, one error message.

An identity is a small dict of the settings that change what a checkpoint means: the model's
(``ContinualLM.identity``), the data's (``SequentialDomainDataModule.identity``) and the run's domains.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crma_lightning.adapters import CRMAConfig

RECORDED_LATER = ("base_seed", "dtype", "content.")
"""Identity keys (or key prefixes) that checkpoints written before they were recorded lack: not compared
when absent there."""


def identity_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """``"key: checkpoint X vs now Y"`` for every key of ``current`` whose saved value differs.

    The one comparison of identities: the model's (``ContinualLM.identity``), the data's
    (``SequentialDomainDataModule.identity``) and the run's domains all go through it.
    """
    return [
        f"{prefix}{key}: checkpoint {saved.get(key)!r} vs now {value!r}"
        for key, value in current.items()
        if saved.get(key) != value and not (key not in saved and key.startswith(RECORDED_LATER))
    ]


def model_identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """:func:`identity_differences` of two ``ContinualLM.identity()`` dicts.

    The CRMA entry is compared on ``CRMAConfig.identity()`` - the fields adapter files are checked on -
    also for checkpoints written when the identity recorded every CRMA field.
    """
    crma = saved.get("crma")
    if isinstance(crma, dict):
        saved = {**saved, "crma": CRMAConfig.from_saved(crma).identity()}
    return identity_differences(saved, current)


def check_compatible(saved: dict[str, Any], identity: dict[str, Any], path: Path) -> None:
    """Raise ``ValueError`` listing every setting where checkpoint ``path`` and this run differ.

    ``identity`` holds ``domains``, ``model`` and ``data`` (see :func:`identity_differences`);
    ``saved`` is the run state stored in the checkpoint.
    """
    saved_identity = saved.get("identity", {})
    saved_domains = saved_identity.get("domains", saved.get("domains"))
    problems = identity_differences({"domains": saved_domains}, {"domains": identity["domains"]})
    problems += model_identity_differences(saved_identity.get("model", {}), identity["model"])
    if saved_identity.get("data") is not None:  # absent from checkpoints written before it was recorded
        old, new = dict(saved_identity["data"]), dict(identity["data"])
        old_sources, new_sources = old.pop("sources", None), new.pop("sources", None)
        if problems and list(saved_domains or []) != list(identity["domains"]):
            # Other domains (or another order): the per-domain data follows from that, do not list it all.
            new = {k: v for k, v in new.items() if not k.startswith("content.")}
        else:
            problems += _source_differences(old_sources, new_sources)
        problems += identity_differences(old, new, prefix="data.")
    if problems:
        raise ValueError(
            f"cannot resume from {path}: the configuration changed in a way that matters ("
            + "; ".join(problems)
            + "). Use the original configuration, or a new run_dir."
        )


def _source_differences(saved: list[dict[str, Any]] | None, current: list[dict[str, Any]] | None) -> list[str]:
    """Per domain, the source fields that differ (``data.sources.<domain>.<field>: checkpoint X vs now Y``)."""
    if saved is None or current is None or saved == current:
        return []
    by_name = {str(s.get("name")): s for s in saved}
    out = []
    for source in current:
        name = str(source.get("name"))
        old = by_name.get(name, {})
        # Over both key sets: a field recorded only when set (not at its default) may be in one of them only.
        both = {**dict.fromkeys(old), **source}
        out += identity_differences(old, {k: source.get(k) for k in both}, prefix=f"data.sources.{name}.")
    return out or identity_differences({"sources": saved}, {"sources": current}, prefix="data.")
