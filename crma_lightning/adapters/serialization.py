"""Adapter-only weights on disk: safetensors files, and LoRA export in PEFT's format.

Only adapter tensors are written - never the frozen base weights - and files are read with
safetensors (no pickle), so loading an adapter file cannot execute code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from crma_lightning.adapters.crma import V1_SETTINGS, CRMABlock, CRMAConfig
from crma_lightning.adapters.inject import adapter_parameter_names, crma_adapters, lora_adapter_names, lora_layers

METADATA_KEY = "crma_lightning"
# The CRMA settings of the file (JSON of the CRMAConfig fields plus "version"), next to the user metadata.
CRMA_METADATA_KEY = "crma_lightning.crma"
CRMA_SETTINGS_VERSION = 2


def adapter_state_dict(model: nn.Module, lora_adapters: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Adapter tensors of ``model`` by parameter name (detached, same device).

    Args:
        model: A model with adapters attached.
        lora_adapters: Keep only these LoRA adapters (``None``: all). CRMA tensors are always included.
    """
    keep = None if lora_adapters is None else set(lora_adapters)
    params = dict(model.named_parameters())
    out = {}
    for name in adapter_parameter_names(model):
        match = re.search(r"\.lora_[AB]\.([^.]+)\.", name)
        if keep is not None and match and match.group(1) not in keep:
            continue
        out[name] = params[name].detach()
    return out


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a half-written file.

    The file gets the usual mode of a new file (``0o666`` minus the umask: ``0644`` with umask 022), like
    the checkpoints; some writers (safetensors) would otherwise leave ``0600``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        fsync_path(tmp)  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
        fsync_path(path.parent)  # and the rename itself survives a power loss
    finally:
        if tmp.exists():
            tmp.unlink()


def fsync_path(path: str | os.PathLike) -> None:
    """``fsync`` a file or a directory (a directory's entry list: a rename in it).

    Without it a power loss shortly after an ``os.replace`` can leave the new name pointing at an empty
    or partial file. Platforms that cannot open a directory (Windows) skip the directory sync.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        if Path(path).is_dir():
            return
        raise
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def save_adapters(
    model: nn.Module,
    path: str | os.PathLike,
    metadata: dict | None = None,
    lora_adapters: Iterable[str] | None = None,
) -> Path:
    """Write the adapter tensors to a ``.safetensors`` file (atomically); ``metadata`` is stored as JSON.

    The model's CRMA settings (form, norm, ...) are recorded as well, for :func:`load_adapters` to check.
    """
    return write_adapter_file(adapter_state_dict(model, lora_adapters), path, metadata, crma=crma_config_of(model))


def write_adapter_file(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict | None = None,
    *,
    crma: CRMAConfig | None,
) -> Path:
    """The one writer of adapter files: ``tensors`` (full, by parameter name) as safetensors, atomically.

    :func:`save_adapters` calls it with a model's adapters; sharded models gather first and call it too
    (:func:`crma_lightning.parallel.export.export_adapters`), so every adapter file has one layout.

    Args:
        tensors: Adapter tensors by parameter name.
        path: Destination ``.safetensors`` file.
        metadata: User metadata, stored as JSON under :data:`METADATA_KEY`.
        crma: The CRMA config the tensors were trained with (:func:`crma_config_of`), stored as JSON under
            :data:`CRMA_METADATA_KEY`; ``None`` only for a model without CRMA. Required, so that no writer
            leaves a CRMA file without the settings :func:`load_adapters` checks.
    """
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"format": "pt", METADATA_KEY: json.dumps(metadata or {}, default=str)}
    if crma is not None:
        meta[CRMA_METADATA_KEY] = json.dumps({"version": CRMA_SETTINGS_VERSION, **dataclasses.asdict(crma)})
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return Path(path)


def crma_config_of(model: nn.Module) -> CRMAConfig | None:
    """The CRMA config of ``model``'s adapters (all blocks share one), or ``None`` without CRMA."""
    for _, adapter in crma_adapters(model):
        return adapter.config
    return None


def read_crma_settings(path: str | os.PathLike) -> dict | None:
    """The CRMA settings a file was written with; v1 files (before ``norm``/``form`` existed) included.

    Looked up in order: the :data:`CRMA_METADATA_KEY` entry (v2 writers); the ``"crma"`` dict of the user
    metadata (what training runs store there: their CRMA hyper-parameters); else, for a file holding CRMA
    tensors, nothing is known but its era. Missing ``norm``/``form`` take their v1 values (frobenius, write):
    every writer since they exist records them. ``None`` for a file without CRMA tensors.
    """
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
        has_crma = any(".crma." in key for key in f.keys())  # noqa: SIM118 - safe_open is not a dict
    if CRMA_METADATA_KEY in raw:
        return json.loads(raw[CRMA_METADATA_KEY])
    if not has_crma:
        return None
    user = json.loads(raw.get(METADATA_KEY, "{}"))
    saved = user.get("crma") if isinstance(user.get("crma"), dict) else {}
    return {**V1_SETTINGS, **saved}


def crma_settings_mismatch(model: nn.Module, saved: dict | None, source: str = "adapter file") -> str | None:
    """What differs between the CRMA settings ``saved`` with a file and ``model``'s, or ``None``.

    Only the settings that define what the tensors compute are compared (``CRMAConfig.identity``: form,
    norm, n_streams, stream_rank, g_max), and only those that ``saved`` records.
    """
    config = crma_config_of(model)
    if saved is None or config is None:
        return None
    mine = config.identity()
    diffs = [f"{k}: file {saved[k]!r} vs model {v!r}" for k, v in mine.items() if k in saved and saved[k] != v]
    if not diffs:
        return None
    era = "" if "version" in saved else " (a file without CRMA settings is read as v1: norm frobenius, form write)"
    return (
        f"CRMA settings of {source} differ from the model's: {'; '.join(diffs)}{era}. Attach CRMA with the "
        "file's settings to load it."
    )


def read_adapter_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata stored by :func:`save_adapters`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))


@torch.no_grad()
def load_adapters(model: nn.Module, path_or_state: str | os.PathLike | dict, strict: bool = True) -> list[str]:
    """Copy adapter tensors from a file (or a state dict) into ``model``'s adapters.

    Args:
        model: A model with the same adapters attached (same targets, ranks, adapter names).
        path_or_state: A file written by :func:`save_adapters`, or a ``{name: tensor}`` dict.
        strict: Every adapter parameter of ``model`` must be present in the file.

    Returns:
        The names that were loaded.

    Raises:
        ValueError: Unknown keys, missing keys (when ``strict``), mismatched shapes, or (files only) CRMA
            settings that differ from the model's (see :func:`read_crma_settings`; v1 files are read as
            ``norm="frobenius"``, ``form="write"``) - all reported before anything is copied.
    """
    state = load_file(str(path_or_state)) if not isinstance(path_or_state, dict) else path_or_state
    params = dict(model.named_parameters())
    expected = set(adapter_parameter_names(model))
    unexpected = sorted(set(state) - expected)
    missing = sorted(expected - set(state)) if strict else []
    bad_shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(params[k].shape)}"
        for k in state
        if k in expected and tuple(state[k].shape) != tuple(params[k].shape)
    ]
    settings_error = None
    if not isinstance(path_or_state, dict) and any(".crma." in k for k in state):
        settings_error = crma_settings_mismatch(model, read_crma_settings(path_or_state), str(path_or_state))
    if unexpected or missing or bad_shapes:
        raise ValueError(
            f"adapter weights do not match the model: unexpected keys {unexpected[:5]}, missing keys "
            f"{missing[:5]}, shape mismatches {bad_shapes[:5]} (source: {_describe(path_or_state)})"
            + (f". Also: {settings_error}" if settings_error else "")
        )
    if settings_error:
        raise ValueError(settings_error)
    for key, value in state.items():
        params[key].copy_(value.to(params[key].dtype))
    return sorted(state)


def _describe(source) -> str:
    return str(source) if not isinstance(source, dict) else f"state dict with {len(source)} tensors"


def _unwrapped_name(model: nn.Module, name: str) -> str:
    """``name`` without the ``base_layer`` hops that CRMA blocks add: the path in the plain HF model."""
    parts, module = [], model
    for part in name.split("."):
        child = getattr(module, part) if not part.isdigit() else module[int(part)]
        if not (part == "base_layer" and isinstance(module, CRMABlock)):
            parts.append(part)
        module = child
    return ".".join(parts)


def export_peft_adapter(
    model: nn.Module,
    adapter_name: str,
    out_dir: str | os.PathLike,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write LoRA adapter ``adapter_name`` as a PEFT adapter directory.

    The directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` and loads with
    ``peft.PeftModel.from_pretrained(base_model, out_dir)``. CRMA has no PEFT equivalent and is not
    exported; a CRMA model exported this way is its LoRA part only.
    """
    layers = list(lora_layers(model))
    if adapter_name not in lora_adapter_names(model):
        raise ValueError(f"unknown LoRA adapter {adapter_name!r}; existing adapters: {lora_adapter_names(model)}")
    config = layers[0][1].configs[adapter_name]
    names = [_unwrapped_name(model, name) for name, _ in layers]
    tensors = {}
    for name, (_, layer) in zip(names, layers):
        # PEFT's saved keys drop the adapter name: base_model.model.<module>.lora_A.weight
        tensors[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight.detach().cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight.detach().cpu()
    fan_in_fan_out = {layer.fan_in_fan_out for _, layer in layers}
    if len(fan_in_fan_out) > 1:
        raise ValueError("cannot export to PEFT: the targets mix nn.Linear and Conv1D layers")
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "use_rslora": config.use_rslora,
        # An exact alternation of the wrapped modules: PEFT full-matches a string against module names.
        "target_modules": "^(?:" + "|".join(re.escape(n) for n in names) + ")$",
        "fan_in_fan_out": fan_in_fan_out.pop(),
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    atomic_write(out / "adapter_model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(out / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(peft_config, indent=2)))
    return out
