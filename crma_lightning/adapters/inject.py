"""Attach LoRA / CRMA adapters to a Hugging Face causal LM, and find them once attached.

Everything is validated before the model is touched: a bad adapter type, rank, target pattern
or stream size raises ``ValueError`` naming the bad value and the valid choices, and the model
is left exactly as it was. After attaching, the base model is frozen and exactly the adapter
parameters are trainable. Switching, freezing and merging named adapters: :mod:`.switching`.
Pure PyTorch: no Lightning import here.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import nn

from crma_lightning.adapters.crma import CRMAAdapter, CRMABlock, CRMAConfig
from crma_lightning.adapters.crma_batch import clear_step_factors, precompute_step_factors
from crma_lightning.adapters.lora import LINEAR_TYPES, LoRAConfig, LoRALinear, check_adapter_name

AdapterType = Literal["lora", "crma"]
"""What is attached: LoRA on the target linears, or LoRA plus CRMA after every decoder block."""
ADAPTER_TYPES: tuple[str, ...] = get_args(AdapterType)


def check_adapter_type(adapter: str) -> None:
    """``ValueError`` naming ``adapter`` and the choices unless it is one of :data:`ADAPTER_TYPES`."""
    if adapter not in ADAPTER_TYPES:
        raise ValueError(f"adapter={adapter!r} is not supported: expected one of {list(ADAPTER_TYPES)}")


@dataclass
class AttachedAdapters:
    """What :func:`attach_adapters` did, for logging and for :func:`detach_adapters`.

    Attributes:
        adapter: ``"lora"`` or ``"crma"``.
        lora_modules: Full names of the linear layers now wrapped by :class:`LoRALinear`.
        crma_blocks: Full names of the decoder layers now wrapped by :class:`CRMABlock`.
        layers_path: Name of the ``nn.ModuleList`` holding the decoder layers.
    """

    adapter: str
    lora_modules: list[str] = field(default_factory=list)
    crma_blocks: list[str] = field(default_factory=list)
    layers_path: str = ""


# ---------------------------------------------------------------------- discovery
def linear_module_names(model: nn.Module) -> list[str]:
    """Names of all linear layers (``nn.Linear``/``Conv1D``) except the LM head, in model order.

    Layers already wrapped by :class:`LoRALinear` are listed under the wrapper's name; the wrapper's
    own internals (``base_layer``, ``lora_A``, ``lora_B``) are not.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names: list[str] = []

    def visit(module: nn.Module, prefix: str) -> None:
        for child_name, child in module.named_children():
            name = f"{prefix}{child_name}"
            if isinstance(child, LoRALinear) or (isinstance(child, LINEAR_TYPES) and child is not head):
                names.append(name)
            else:
                visit(child, name + ".")

    visit(model, "")
    return names


def resolve_lora_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[str]:
    """Full names of the linear layers selected by ``target_modules`` (see :class:`LoRAConfig`).

    Raises:
        ValueError: If nothing matches; the message lists some of the model's linear layer names.
    """
    candidates = linear_module_names(model)
    if isinstance(target_modules, str) and target_modules == "all-linear":
        matched = candidates
    elif isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"LoRA target_modules={target_modules!r} is not a valid regex: {err}") from err
        matched = [n for n in candidates if pattern.fullmatch(n)]
    else:
        suffixes = list(target_modules)
        matched = [n for n in candidates if any(n == s or n.endswith("." + s) for s in suffixes)]
    if not matched:
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        raise ValueError(
            f"LoRA target_modules={target_modules!r} matches no linear layer of {type(model).__name__}. "
            f"Linear layer names end in: {leaf_names[:20]}; full names look like {candidates[:3]}. "
            "Use 'all-linear', a list of such suffixes, or a regex over full names."
        )
    return matched


def check_lora_rank(model: nn.Module, targets: Sequence[str], r: int) -> None:
    """``ValueError`` when ``r`` exceeds a target layer's width: ``B A`` cannot have rank above ``min(in, out)``.

    A larger ``r`` adds parameters (and optimizer state) that can never raise the update's rank: with a
    rank above the layer's width LoRA is no longer low-rank, and usually a mistyped setting.
    """
    for name in targets:
        weight = model.get_submodule(name).weight
        width = min(weight.shape[0], weight.shape[1])
        if r > width:
            raise ValueError(
                f"LoRA r={r} is above the width of {name} ({tuple(weight.shape)} weight): expected r <= {width} "
                "(a rank-r update of that layer cannot exceed it); lower lora.r or choose other target_modules"
            )


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``nn.ModuleList`` of decoder layers, found without knowing the architecture.

    Preference order: a list whose layer class is named in the model's ``_no_split_modules`` (every
    transformers model declares its block class there), else the list of identical modules holding
    the most parameters (``model.layers``, ``transformer.h``, ``gpt_neox.layers``, ...).
    """
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        inner = [m.base_layer if isinstance(m, CRMABlock) else m for m in module]
        if len({type(m) for m in inner}) != 1:
            continue
        score = sum(p.numel() for p in module.parameters())
        if type(inner[0]).__name__ in no_split:
            score += 1 << 62  # declared block class wins over size
        if best is None or score > best[0]:
            best = (score, name, module)
    if best is None:
        raise ValueError(
            f"could not find the decoder layers of {type(model).__name__}: no nn.ModuleList of identical "
            "blocks; CRMA needs one to attach after every block"
        )
    return best[1], best[2]


def hidden_size_of(model: nn.Module) -> int:
    """Width of the residual stream that the decoder layers output.

    ``config.hidden_size`` first: some models project their embeddings to another width (OPT-350m has
    512-wide embeddings and 1024-wide blocks); the input embedding dimension is the fallback.
    """
    config = getattr(model, "config", None)
    if config is not None and isinstance(getattr(config, "hidden_size", None), int):
        return int(config.hidden_size)
    if hasattr(model, "get_input_embeddings") and model.get_input_embeddings() is not None:
        return int(model.get_input_embeddings().embedding_dim)
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__}: no config.hidden_size or embeddings")


def output_projection_weight(block: nn.Module, hidden_size: int) -> torch.Tensor:
    """The ``(hidden_size, d_in)`` weight of ``block``'s output projection, for CRMA's PiSSA-style init.

    The output projection is the last linear layer of the block (in module order) whose output is the
    residual stream: ``mlp.down_proj`` (Llama, Mistral, Qwen2), ``mlp.c_proj`` (GPT-2), ``mlp.dense_4h_to_h``
    (NeoX). A LoRA-wrapped layer counts with its base weight; LoRA factors never do.

    Raises:
        ValueError: No such layer, or its weight is not materialised (meta device).
    """
    found: nn.Module | None = None
    stack = [block]
    while stack:  # pre-order, so the last match is the last layer in module order
        module = stack.pop(0)
        if isinstance(module, LoRALinear):
            module = module.base_layer
        if isinstance(module, LINEAR_TYPES):
            out_features = module.weight.shape[0 if isinstance(module, nn.Linear) else 1]
            if out_features == hidden_size:
                found = module
            continue
        stack[:0] = list(module.children())
    if found is None:
        raise ValueError(
            f"CRMA init='pissa' needs an output projection in every block: {type(block).__name__} has no linear "
            f"layer with {hidden_size} outputs; use init='random'"
        )
    if found.weight.device.type == "meta":
        raise ValueError("CRMA init='pissa' needs materialised base weights (not on the meta device)")
    weight = found.weight.detach()
    return weight if isinstance(found, nn.Linear) else weight.mT  # Conv1D stores (in, out)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """``(name, module)`` for every :class:`LoRALinear` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def crma_adapters(model: nn.Module) -> Iterator[tuple[str, CRMAAdapter]]:
    """``(name, module)`` for every :class:`CRMAAdapter` in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, CRMAAdapter):
            yield name, module


def lora_adapter_names(model: nn.Module) -> list[str]:
    """Names of the LoRA adapters in the bank (taken from the first LoRA layer; all layers agree)."""
    for _, layer in lora_layers(model):
        return list(layer.lora_A)
    return []


# ---------------------------------------------------------------------- attach / detach
def attach_adapters(
    model: nn.Module,
    adapter: str = "lora",
    lora: LoRAConfig | None = None,
    crma: CRMAConfig | None = None,
    adapter_name: str | None = "default",
) -> AttachedAdapters:
    """Wrap the target linears with LoRA (and, for ``adapter="crma"``, every decoder layer with CRMA).

    The base model is frozen; the new LoRA adapter ``adapter_name`` is active and trainable, and so
    are the CRMA adapters. All inputs are validated before any module is replaced.

    Args:
        model: A transformers causal LM (or any module with linear layers and a list of blocks).
        adapter: ``"lora"`` (LoRA only) or ``"crma"`` (LoRA on the targets plus CRMA on every block).
        lora: LoRA hyper-parameters (default :class:`LoRAConfig`).
        crma: CRMA hyper-parameters (default :class:`CRMAConfig`); used when ``adapter="crma"``.
        adapter_name: Name of the first LoRA adapter in the bank; ``None`` wraps the targets with an
            empty bank (add adapters later with :func:`add_lora_adapter`).

    Returns:
        What was attached.

    Raises:
        ValueError: Bad adapter type, name, LoRA/CRMA hyper-parameter or target pattern; or the model
            already has adapters. The model is unchanged.
    """
    check_adapter_type(adapter)
    if adapter_name is not None:
        check_adapter_name(adapter_name)
    lora = lora or LoRAConfig()
    lora.validate()
    if any(True for _ in lora_layers(model)) or any(True for _ in crma_adapters(model)):
        raise ValueError(f"{type(model).__name__} already has adapters attached; detach_adapters() first")
    targets = resolve_lora_targets(model, lora.target_modules)
    check_lora_rank(model, targets, lora.r)
    result = AttachedAdapters(adapter=adapter, lora_modules=targets)
    blocks: list[tuple[int, nn.Module]] = []
    layers: nn.ModuleList | None = None
    if adapter == "crma":
        crma = crma or CRMAConfig()
        crma.validate(hidden_size_of(model))
        result.layers_path, layers = find_decoder_layers(model)
        blocks = list(enumerate(layers))
        result.crma_blocks = [f"{result.layers_path}.{i}" for i, _ in blocks]
        # A model built on the meta device (ranks other than 0 under ContinualLM(init_on_rank0=True)) gets
        # meta adapters without values; the strategy copies rank 0's (PiSSA-initialised) values into them.
        pissa = crma.init == "pissa" and not all(p.is_meta for p in model.parameters())
        if pissa:
            pissa_weights = [output_projection_weight(layer, hidden_size_of(model)) for _, layer in blocks]

    # Everything is validated; from here on only construction, which cannot fail on user input.
    originals = {name: model.get_submodule(name) for name in targets}
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.requires_grad_(False)
        for name, module in originals.items():
            wrapper = LoRALinear(module)
            if adapter_name is not None:
                wrapper.add_adapter(adapter_name, lora)
                wrapper.set_adapter(adapter_name)
            _set_submodule(model, name, wrapper)
        if layers is not None:
            hidden = hidden_size_of(model)
            for i, layer in blocks:
                device = next(layer.parameters()).device
                crma_adapter = CRMAAdapter(hidden, crma, device=device)
                if pissa:
                    crma_adapter.init_read_from(pissa_weights[i])
                layers[i] = CRMABlock(layer, crma_adapter)
            if model not in _STEP_HOOKS:
                _STEP_HOOKS[model] = model.register_forward_pre_hook(crma_step_pre_hook)
    except BaseException:
        for name, module in originals.items():
            _set_submodule(model, name, module)
        if layers is not None:
            for i, layer in blocks:
                layers[i] = layer
        for param, flag in requires_grad:  # undo model.requires_grad_(False) as well
            param.requires_grad_(flag)
        raise
    return result


# model -> handle of its CRMA pre-forward hook (weak: a model is never kept alive by it)
_STEP_HOOKS: weakref.WeakKeyDictionary[nn.Module, torch.utils.hooks.RemovableHandle] = weakref.WeakKeyDictionary()


def crma_step_pre_hook(model: nn.Module, args: object) -> None:
    """Forward pre-hook: all enabled CRMA blocks' factors for this forward, batched (:mod:`.crma_batch`).

    A plain module-level function (not a closure over the adapters), so a ``deepcopy`` of the model
    computes its own adapters' factors. Adapters sharded otherwise than FSDP2's 1-D ``Shard(0)`` (FSDP1's flat
    parameters, HSDP) keep computing their own.
    """
    adapters = [m.crma for m in model.modules() if isinstance(m, CRMABlock) and m.enabled]
    precompute_step_factors(a for a in adapters if isinstance(a, CRMAAdapter))


def detach_adapters(model: nn.Module) -> None:
    """Remove every adapter and put the original layers back (merged weights are unmerged first)."""
    handle = _STEP_HOOKS.pop(model, None)
    if handle is not None:
        handle.remove()
    clear_step_factors(module for _, module in crma_adapters(model))
    for name, layer in list(lora_layers(model)):
        layer.unmerge()
        _set_submodule(model, name, layer.base_layer)
    for name, module in list(model.named_modules()):
        if isinstance(module, CRMABlock):
            _set_submodule(model, name, module.base_layer)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def adapter_parameter_names(model: nn.Module) -> list[str]:
    """Full names of every adapter parameter (all LoRA banks and all CRMA adapters), in model order."""
    adapter_params = set()
    for _, layer in lora_layers(model):
        adapter_params.update(id(p) for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters()))
    for _, module in crma_adapters(model):
        adapter_params.update(id(p) for p in module.parameters())
    return [name for name, p in model.named_parameters() if id(p) in adapter_params]
