"""LoRA: a linear wrapper holding a bank of named low-rank adapters (docs/method.md).

``y = W x + b + s · B A dropout(x)`` with ``s = alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA),
``A`` Kaiming-uniform and ``B`` zero, so a freshly added adapter leaves the output unchanged.

The wrapped layer is kept as ``base_layer`` (PEFT's convention), so module names and the
parameter names of the base model stay recognisable: ``...q_proj.base_layer.weight``,
``...q_proj.lora_A.<adapter>.weight``. Several adapters can live side by side (one per task);
usually exactly one - or none - is active at a time (:meth:`LoRALinear.set_adapter`). O-LoRA-style
methods activate several at once (:meth:`LoRALinear.set_active_adapters`): their updates are summed.
Pure PyTorch: no Lightning import here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

try:  # GPT-2 style models use a transposed linear ("Conv1D") for their projections.
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a hard dependency, this is belt and braces
    Conv1D = ()  # type: ignore[assignment,misc]

LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D) if Conv1D else (nn.Linear,)
_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_adapter_name(name: str) -> None:
    """Adapter names become ``nn.ModuleDict`` keys and file keys: letters, digits, ``_`` and ``-``."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"adapter name {name!r} is invalid: expected letters, digits, '_' or '-' (no dots or spaces)")


@dataclass
class LoRAConfig:
    """Hyper-parameters of one LoRA adapter.

    Attributes:
        r: Rank of the update ``B A``; must be ≥ 1.
        alpha: Scale numerator; the update is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: Dropout probability on the adapter's input, in ``[0, 1)``.
        target_modules: Which linear layers get LoRA: ``"all-linear"`` (every linear layer except the LM
            head), a list of module-name suffixes such as ``["q_proj", "v_proj"]`` (PEFT's rule: a name
            matches when it equals the suffix or ends with ``"." + suffix``), or a single string that is a
            regular expression matched against the full module name (``re.fullmatch``).
        use_rslora: Use rank-stabilised scaling ``alpha / sqrt(r)`` (Kalajdzievski, 2023).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    use_rslora: bool = False

    def __post_init__(self) -> None:
        self.validate()  # a bad field fails where the config is built (YAML parsing), not at injection

    @property
    def scaling(self) -> float:
        """The factor ``s`` that multiplies ``B A x``."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad field."""
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r={self.r!r} is invalid: expected an integer >= 1")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha={self.alpha!r} is invalid: expected a number > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout={self.dropout!r} is invalid: expected a probability in [0, 1)")
        targets = self.target_modules
        if isinstance(targets, str):
            if not targets:
                raise ValueError("LoRA target_modules='' is empty: expected 'all-linear', a regex or a list")
        elif not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(
                f"LoRA target_modules={targets!r} is invalid: expected 'all-linear', a regex string or a "
                "non-empty list of module-name suffixes such as ['q_proj', 'v_proj']"
            )


class LoRALinear(nn.Module):
    """A linear layer (``nn.Linear`` or transformers' ``Conv1D``) plus a bank of LoRA adapters.

    Attributes:
        base_layer: The wrapped layer. Its parameters are left as they are (the injector freezes them).
        lora_A: Adapter name -> ``nn.Linear(in_features, r, bias=False)``, Kaiming-uniform init.
        lora_B: Adapter name -> ``nn.Linear(r, out_features, bias=False)``, zero init.
        lora_dropout: Adapter name -> dropout (``nn.Identity`` when p = 0).
        scaling: Adapter name -> the scalar ``s``.
        active_adapter: Name of the adapter used in ``forward`` (``None``: base layer only). Reading it
            while several adapters are active raises ``RuntimeError``: single-adapter code must not
            silently see one of a stack; read :attr:`active_adapters` instead.
        active_adapters: Names of all active adapters, in the order their updates are added.
        merged_adapter: Name of the adapter currently folded into ``base_layer.weight``, if any.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not isinstance(base_layer, LINEAR_TYPES):
            raise TypeError(f"LoRALinear wraps nn.Linear or Conv1D, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        # Conv1D stores its weight as (in, out): "fan_in_fan_out" in PEFT's words.
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)
        weight = base_layer.weight
        self.in_features, self.out_features = (
            (weight.shape[0], weight.shape[1]) if self.fan_in_fan_out else (weight.shape[1], weight.shape[0])
        )
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.configs: dict[str, LoRAConfig] = {}
        self._active: tuple[str, ...] = ()
        self.merged_adapter: str | None = None

    # ------------------------------------------------------------------ active adapters
    @property
    def active_adapter(self) -> str | None:
        if len(self._active) > 1:
            raise RuntimeError(
                f"several LoRA adapters are active {list(self._active)}; read `active_adapters` instead of "
                "`active_adapter`, or activate one with set_adapter()"
            )
        return self._active[0] if self._active else None

    @active_adapter.setter
    def active_adapter(self, name: str | None) -> None:
        self._active = () if name is None else (name,)

    @property
    def active_adapters(self) -> list[str]:
        """Names of the active adapters (empty: base layer only), in summation order."""
        return list(self._active)

    def set_active_adapters(self, names: list[str] | tuple[str, ...]) -> None:
        """Activate every adapter in ``names`` at once: ``y = W x + b + Σ_i s_i B_i A_i x`` (O-LoRA).

        An empty list turns LoRA off; a single name is the same as :meth:`set_adapter`.
        """
        names = tuple(names)
        unknown = [n for n in names if n not in self.lora_A]
        if unknown:
            raise ValueError(f"unknown LoRA adapter(s) {unknown}; existing adapters: {list(self.lora_A)}")
        if len(set(names)) != len(names):
            raise ValueError(f"LoRA adapters {list(names)} are listed more than once; each may be active once")
        if self.merged_adapter is not None and names != (self.merged_adapter,):
            raise RuntimeError(
                f"adapter {self.merged_adapter!r} is merged into the base weight; unmerge() before activating "
                f"{list(names)}"
            )
        self._active = names

    # ------------------------------------------------------------------ bank management
    def add_adapter(self, name: str, config: LoRAConfig) -> None:
        """Create adapter ``name`` (A Kaiming-uniform, B zero) on the base layer's device, in float32."""
        check_adapter_name(name)
        config.validate()
        if name in self.lora_A:
            raise ValueError(f"LoRA adapter {name!r} already exists; existing adapters: {list(self.lora_A)}")
        device = self.base_layer.weight.device
        if device.type == "meta":  # FSDP/deferred init: materialised later by the strategy
            device = torch.device("meta")
        a = nn.Linear(self.in_features, config.r, bias=False, device=device, dtype=torch.float32)
        b = nn.Linear(config.r, self.out_features, bias=False, device=device, dtype=torch.float32)
        if device.type != "meta":
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # PEFT / Microsoft LoRA default
            nn.init.zeros_(b.weight)
        self.lora_A[name] = a
        self.lora_B[name] = b
        self.lora_dropout[name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling[name] = config.scaling
        self.configs[name] = config

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the active adapter (``None``: plain base layer)."""
        if name is not None and name not in self.lora_A:
            raise ValueError(f"unknown LoRA adapter {name!r}; existing adapters: {list(self.lora_A)}")
        if self.merged_adapter is not None and name != self.merged_adapter:
            raise RuntimeError(
                f"adapter {self.merged_adapter!r} is merged into the base weight; unmerge() before activating {name!r}"
            )
        self.active_adapter = name

    def set_trainable(self, name: str, trainable: bool) -> None:
        """Freeze (``False``) or unfreeze (``True``) the parameters of adapter ``name``."""
        if name not in self.lora_A:
            raise ValueError(f"unknown LoRA adapter {name!r}; existing adapters: {list(self.lora_A)}")
        self.lora_A[name].weight.requires_grad_(trainable)
        self.lora_B[name].weight.requires_grad_(trainable)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (it must not be merged)."""
        if name not in self.lora_A:
            raise ValueError(f"unknown LoRA adapter {name!r}; existing adapters: {list(self.lora_A)}")
        if self.merged_adapter == name:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge() before deleting it")
        for bank in (self.lora_A, self.lora_B, self.lora_dropout):
            del bank[name]
        del self.scaling[name]
        del self.configs[name]
        # Deleting an active adapter deactivates it; the rest of a stack stays active.
        self._active = tuple(n for n in self._active if n != name)

    # ------------------------------------------------------------------ merge
    def delta_weight(self, name: str) -> torch.Tensor:
        """``s · B A`` in the base weight's layout (``(out, in)``, transposed for Conv1D), float32."""
        delta = self.lora_B[name].weight.float() @ self.lora_A[name].weight.float() * self.scaling[name]
        return delta.T if self.fan_in_fan_out else delta

    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        """Fold adapter ``name`` (default: the active one) into the base weight for adapter-free inference."""
        name = name or self.active_adapter
        if name is None:
            raise ValueError("merge() needs an adapter name or an active adapter")
        if self.merged_adapter is not None:
            raise RuntimeError(f"adapter {self.merged_adapter!r} is already merged; unmerge() first")
        weight = self.base_layer.weight
        weight.copy_((weight.float() + self.delta_weight(name)).to(weight.dtype))
        self.merged_adapter = name
        self.active_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the merged adapter from the base weight again."""
        if self.merged_adapter is None:
            return
        weight = self.base_layer.weight
        weight.copy_((weight.float() - self.delta_weight(self.merged_adapter)).to(weight.dtype))
        self.merged_adapter = None

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self._active or self.merged_adapter is not None:
            return result
        # One adapter (the usual case) or a stack whose updates are summed in list order (O-LoRA).
        for name in self._active:
            lora_a = self.lora_A[name]
            # Adapters stay float32 when the base runs in bf16/fp16; compute in their dtype, add in the base's.
            h = lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype)))  # (..., r)
            result = result + (self.lora_B[name](h) * self.scaling[name]).to(result.dtype)
        return result

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"adapters={list(self.lora_A)}, "
            f"active={self.active_adapters if len(self._active) > 1 else self.active_adapter!r}"
        )
