"""CRMA: Constrained Residual Mixing Adapter (v2; docs/method.md, "CRMA").

One ``CRMAAdapter`` sits on the residual stream after each decoder layer::

    R  = R~ / max(1, σ_max(R~))       read projection   (n·k, d)          norm "spectral" (default)
    W  = W~ / max(1, σ_max(W~))       write projection  (d, n·k), W~ = 0 at init
    M  = Sinkhorn(Λ)                  (n, n) doubly stochastic, Λ with a dominant diagonal at init
    g  = g_max · sigmoid(γ)           scalar gate
    s  = reshape(R h, (n, k))         n streams of rank k

    form "write":  h' = h + g · W vec(M s)               ||h' - h|| <= g_max ||h||
    form "mix":    h' = h + g · Rᵀ vec((M - I) s)         R with orthonormal rows, g_max <= 1: ||h'|| <= ||h||

``norm="frobenius"`` (v1) divides by ``max(1, ||·||_F)`` instead: the same bound, but the unit norm is
spread over the n·k singular values, so ``||R||_2, ||W||_2`` stay well below 1 (kept for ablations).

Write form. ``||M||_2 <= 1`` (Birkhoff), ``||R||_2 <= 1`` and ``||W||_2 <= 1`` give
``||h' - h|| <= g_max · ||h||`` for every input - by construction, with no penalty term.

Mix form. ``R = Qᵀ`` from a reduced QR of ``R~ᵀ`` (signs fixed so that the map is continuous), so
``R Rᵀ = I`` and ``P = RᵀR`` projects onto an n·k-dimensional subspace. On that subspace the map is
``(1 - g) I + g (M ⊗ I_k)``, a convex combination of doubly-stochastic matrices (spectral norm <= 1 for
``g <= 1``); off it, the identity. Hence ``||h'|| <= ||h||`` and the Jacobian ``I + g Rᵀ((M - I) ⊗ I_k) R``
has spectral norm <= 1. Near-identity start: with ``Λ = λ0 I`` the map moves ``h`` by at most
``g_max · sigmoid(γ0) · n / (exp(λ0) + n - 1) · ||h||`` (0.35 % for the defaults g_max 0.1, λ0 4, n 4).

Sinkhorn. The iterations run without autograd (log-space potentials, no graph) and the backward is the
implicit gradient of the Sinkhorn limit (one tiny ``n × n`` linear solve) instead of back-propagating
through every iteration: ~1.5x cheaper per block and step on CPU, and converged where v1's 20 iterations
were not (benchmarks/sinkhorn_convergence.py --backward). Twenty log-space iterations do *not* reach
double stochasticity for every logit matrix (benchmarks/sinkhorn_convergence.py), and the bounds above rely
on exact double stochasticity, so the rounding step of Altschuler, Weed & Rigollet (NeurIPS 2017, Alg. 2)
follows (with autograd): shrink over-full rows/columns, then add ``err_r err_c^T / ||err_r||_1``. Every
entry stays >= 0 and every row and column sums to 1 (to float rounding) for any finite logits.
``exact=False`` turns the rounding off for ablations.

Batched per step. Inside a model (:func:`~crma_lightning.adapters.attach_adapters`), the factors ``R``,
``E = g W (M ⊗ I_k)`` of all blocks are computed together once per forward, with the same functions on a
leading batch dimension (:mod:`crma_lightning.adapters.crma_batch`); a block called on its own, or whose
parameters changed since, computes its own as described above.

Pure PyTorch: no Lightning import here. All parameters are plain ``nn.Parameter`` s (no parametrize
modules), so FSDP1/FSDP2 shard them like any other weight.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crma_lightning.adapters.crma_batch import apply_step_factors
from crma_lightning.adapters.matrices import (
    frobenius_normalize,
    gated_write,
    orthonormal_rows,
    sigma_max,
    spectral_normalize,
)
from crma_lightning.adapters.sinkhorn import sinkhorn

NORMS = ("spectral", "frobenius")
FORMS = ("write", "mix")
INITS = ("random", "pissa")
SINKHORN_BACKWARDS = ("implicit", "unrolled")
# What a file written before v2 (no `norm`/`form` in its metadata) was computed with.
V1_SETTINGS = {"norm": "frobenius", "form": "write"}
# The settings that define the function computed from the adapter tensors: loading checks these.
IDENTITY_FIELDS = ("form", "norm", "n_streams", "stream_rank", "g_max")


@dataclass
class CRMAConfig:
    """Hyper-parameters of the CRMA block adapter.

    Attributes:
        n_streams: Number of streams ``n`` mixed by the doubly-stochastic matrix.
        stream_rank: Rank ``k`` of each stream; ``n · k`` must not exceed the hidden size.
        g_max: Upper bound of the gate (write form: of ``||h' - h|| / ||h||``); at most 1 for ``form="mix"``.
        sinkhorn_iters: Log-space Sinkhorn iterations per forward (on an ``n × n`` matrix, not per token).
        exact_sinkhorn: Apply the exact rounding step after the iterations (see module docstring).
        newton_steps: Newton steps on the Sinkhorn potentials after the iterations (0: v1's plain Sinkhorn, which
            used 20 iterations). 5 iterations + 3 Newton steps reach ~1e-7 where 20 iterations leave ~1e-2 near
            the init (benchmarks/sinkhorn_convergence.py).
        sinkhorn_backward: ``"implicit"`` (gradient of the Sinkhorn limit, one small solve) or ``"unrolled"``
            (back-propagate through every iteration and Newton step, v1).
        mix_init_diag: Initial value of the diagonal of ``Λ`` (off-diagonal 0): ``M`` starts close to ``I``.
        gate_init: Initial gate logit ``γ``; 0 gives ``g = g_max / 2``.
        norm: How the write form bounds ``R`` and ``W``: ``"spectral"`` (divide by ``max(1, σ_max)``) or
            ``"frobenius"`` (v1: divide by ``max(1, ||·||_F)``). Unused by the mix form (``R`` is orthonormal).
        form: ``"write"`` (``h + g W vec(M s)``) or ``"mix"`` (``h + g Rᵀ vec((M - I) s)``).
        init: ``"random"`` (Gaussian ``R~``) or ``"pissa"`` (rows of ``R~``: the top singular directions of the
            block's output projection; set by :func:`~crma_lightning.adapters.attach_adapters`).
    """

    n_streams: int = 4
    stream_rank: int = 4
    g_max: float = 0.1
    sinkhorn_iters: int = 5
    exact_sinkhorn: bool = True
    newton_steps: int = 3
    sinkhorn_backward: str = "implicit"
    mix_init_diag: float = 4.0
    gate_init: float = 0.0
    norm: str = "spectral"
    form: str = "write"
    init: str = "random"

    def __post_init__(self) -> None:
        self.validate()  # a bad field fails where the config is built (YAML parsing); sizes at injection

    def validate(self, hidden_size: int | None = None) -> None:
        """Raise ``ValueError`` naming the first bad field (``hidden_size``: the model's, if known)."""
        for field in ("n_streams", "stream_rank", "sinkhorn_iters"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CRMA {field}={value!r} is invalid: expected an integer >= 1")
        if isinstance(self.newton_steps, bool) or not isinstance(self.newton_steps, int) or self.newton_steps < 0:
            raise ValueError(f"CRMA newton_steps={self.newton_steps!r} is invalid: expected an integer >= 0")
        choices = (("norm", NORMS), ("form", FORMS), ("init", INITS), ("sinkhorn_backward", SINKHORN_BACKWARDS))
        for field, allowed in choices:
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"CRMA {field}={value!r} is invalid: expected one of {list(allowed)}")
        if not self.g_max > 0:
            raise ValueError(f"CRMA g_max={self.g_max!r} is invalid: expected a number > 0")
        if self.form == "mix" and not self.g_max <= 1:
            raise ValueError(
                f"CRMA g_max={self.g_max!r} is invalid for form='mix': expected 0 < g_max <= 1 "
                "(the mixed residual is non-expansive only for gates up to 1)"
            )
        for field in ("mix_init_diag", "gate_init"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"CRMA {field}={value!r} is invalid: expected a finite number")
        if hidden_size is not None and self.n_streams * self.stream_rank > hidden_size:
            raise ValueError(
                f"CRMA n_streams * stream_rank = {self.n_streams} * {self.stream_rank} = "
                f"{self.n_streams * self.stream_rank} does not fit the hidden size {hidden_size}: "
                f"expected n_streams * stream_rank <= {hidden_size}"
            )

    def identity(self) -> dict[str, Any]:
        """The settings an adapter file must agree on to be loaded (:data:`IDENTITY_FIELDS`)."""
        return {field: getattr(self, field) for field in IDENTITY_FIELDS}

    @classmethod
    def from_saved(cls, data: Mapping[str, Any]) -> CRMAConfig:
        """A config from saved settings (file metadata, checkpoint hyper-parameters), v1 included.

        Settings saved before v2 have no ``norm``/``form``: they take their v1 meaning
        (:data:`V1_SETTINGS`: Frobenius normalisation, write form), not today's defaults. Unknown keys
        (e.g. a format version) are ignored.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        values = {**V1_SETTINGS, **{k: v for k, v in data.items() if k in names}}
        return cls(**values)


# ---------------------------------------------------------------------- the adapter
class CRMAAdapter(nn.Module):
    """The CRMA residual adapter for one block (write or mix form, see the module docstring).

    Attributes:
        read_weight: ``R~``, ``(n·k, d)``, Gaussian init (or PiSSA, see :meth:`init_read_from`).
        write_weight: ``W~``, ``(d, n·k)``, zero init: the write form is the identity at step 0. Registered
            for ``form="write"`` only (the mix form writes back through ``Rᵀ``).
        mix_logits: ``Λ``, ``(n, n)``, dominant diagonal at init (``M ≈ I``). The "structural" parameter.
        gate_logit: ``γ``, shape ``(1,)`` (FSDP2 cannot shard 0-d parameters); ``g = g_max · sigmoid(γ)``.
    """

    def __init__(self, hidden_size: int, config: CRMAConfig | None = None, device: torch.device | None = None):
        super().__init__()
        config = config or CRMAConfig()
        config.validate(hidden_size)
        self.config = config
        self.hidden_size = hidden_size
        n, k = config.n_streams, config.stream_rank
        kw = {"device": device, "dtype": torch.float32}
        self.read_weight = nn.Parameter(torch.empty(n * k, hidden_size, **kw))
        if config.form == "write":
            self.write_weight = nn.Parameter(torch.zeros(hidden_size, n * k, **kw))
        self.mix_logits = nn.Parameter(torch.empty(n, n, **kw))
        self.gate_logit = nn.Parameter(torch.empty(1, **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Near-)identity start: ``W~ = 0``, ``Λ = mix_init_diag · I``, ``γ = gate_init``, Gaussian ``R~``."""
        if self.read_weight.device.type == "meta":
            return
        nn.init.normal_(self.read_weight, std=self.hidden_size**-0.5)
        if self.config.form == "write":
            self.write_weight.zero_()
        self.mix_logits.copy_(torch.eye(self.config.n_streams) * self.config.mix_init_diag)
        self.gate_logit.fill_(self.config.gate_init)

    @torch.no_grad()
    def init_read_from(self, weight: torch.Tensor) -> None:
        """PiSSA-style start: rows of ``R~`` = the top ``n·k`` left singular vectors of ``weight``.

        Args:
            weight: ``(d, d_in)`` matrix whose output space is the residual stream (e.g. the block's output
                projection, as ``nn.Linear.weight``). The directions it writes most strongly are read first.
                Exact SVD for small weights, a randomised SVD (``O(d · d_in · n·k)``) for large ones.
        """
        nk = self.read_weight.shape[0]
        if weight.ndim != 2 or weight.shape[0] != self.hidden_size:
            raise ValueError(f"CRMA PiSSA init needs a ({self.hidden_size}, d_in) weight, got {tuple(weight.shape)}")
        w = weight.detach().float()
        if w.numel() <= 1 << 22 or min(w.shape) <= 4 * nk:  # exact SVD while it is cheap (up to ~1024 x 4096)
            u = torch.linalg.svd(w, full_matrices=False)[0][:, :nk]
        else:  # randomised, with oversampling and power iterations: close to exact for the top directions
            u = torch.svd_lowrank(w, q=min(min(w.shape), 2 * nk + 8), niter=8)[0][:, :nk]
        if u.shape[1] < nk:  # d_in < n·k: the remaining rows start random, as with init="random"
            extra = torch.randn(self.hidden_size, nk - u.shape[1], device=u.device) * self.hidden_size**-0.5
            u = torch.cat([u, extra], dim=1)
        self.read_weight.copy_(u.mT.to(self.read_weight))  # orthonormal rows: σ_max(R~) = 1

    # ------------------------------------------------------------------ constrained factors
    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return spectral_normalize(x) if self.config.norm == "spectral" else frobenius_normalize(x)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R, W)``, ``(n·k, d)`` and ``(d, n·k)``, float32, computed together.

        Write form: ``R~`` and ``W~ᵀ`` have the same shape, so both are normalised in one batched call (one
        ``eigh`` on a pair of ``n·k × n·k`` Gram matrices). Mix form: ``R`` has orthonormal rows and ``W = Rᵀ``.
        """
        if self.config.form == "mix":
            read = orthonormal_rows(self.read_weight)
            return read, read.mT
        both = self._normalize(torch.stack([self.read_weight, self.write_weight.mT]))  # (2, n·k, d)
        return both[0], both[1].mT

    def read(self) -> torch.Tensor:
        """``R``, ``(n·k, d)`` float32: normalised ``R~`` (write form) or its orthonormal-row version (mix form)."""
        if self.config.form == "mix":
            return orthonormal_rows(self.read_weight)
        return self._normalize(self.read_weight)

    def write(self) -> torch.Tensor:
        """``W``, ``(d, n·k)`` float32: normalised ``W~`` (write form) or ``Rᵀ`` (mix form)."""
        if self.config.form == "mix":
            return self.read().mT
        return self._normalize(self.write_weight)

    def mixing(self) -> torch.Tensor:
        """``M = Sinkhorn(Λ)``, ``(n, n)``."""
        c = self.config
        return sinkhorn(
            self.mix_logits, c.sinkhorn_iters, c.exact_sinkhorn, c.sinkhorn_backward == "implicit", c.newton_steps
        )

    def gate(self) -> torch.Tensor:
        """``g = g_max · sigmoid(γ)``, a 0-d tensor."""
        return self.config.g_max * torch.sigmoid(self.gate_logit[0])

    def effective_write(self, m: torch.Tensor | None = None, write: torch.Tensor | None = None) -> torch.Tensor:
        """``g · W (M ⊗ I_k)`` (write form) or ``g · Rᵀ ((M - I) ⊗ I_k)`` (mix form), ``(d, n·k)`` float32.

        Folding mixing and gate into the write makes a forward two thin matmuls. ``vec(M s)`` with ``s`` of
        shape ``(n, k)`` flattened row-major equals ``(M ⊗ I_k) vec(s)``, so ``W vec(M s) = W (M ⊗ I_k) vec(s)``;
        the ``(d, n·k)`` product costs ``O(d·n²·k)`` once per forward, independent of the number of tokens.
        """
        m = self.mixing() if m is None else m
        write = self.write() if write is None else write
        return gated_write(write, m, self.gate_logit, self.config.g_max, self.config.form)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Apply the adapter to hidden states ``h`` of shape ``(..., d)``; returns the same shape and dtype."""
        flat = h.reshape(-1, self.hidden_size)  # (tokens, d), a view for contiguous h
        out = apply_step_factors(self, flat)  # with this step's factors, computed for all blocks at once
        if out is None:  # called outside the model's forward, FSDP1/HSDP-sharded, or parameters changed since
            read, write = self.factors()  # (n·k, d), (d, n·k)
            effective = self.effective_write(write=write).to(h.dtype)  # (d, n·k)
            # addmm folds the residual add into the write matmul: h + s Eᵀ in one pass over h.
            out = torch.addmm(flat, F.linear(flat, read.to(h.dtype)), effective.mT)
        return out.view(h.shape)

    # ------------------------------------------------------------------ health
    @torch.no_grad()
    def health(self) -> dict[str, torch.Tensor]:
        """Device tensors (no host sync): spectral norm of ``M``, gate ``g``, max row/column-sum error.

        Uses only ``mix_logits``, ``gate_logit`` and ``config`` (so the FSDP proxies in the gradient callback
        can reuse it), and never raises: non-finite parameters give NaN values. ``sinkhorn_residual`` is the
        column-sum error the plain iterations left before the rounding step: how far the logits are from what
        the configured iterations can handle on their own.
        """
        m = self.mixing()
        plain = sinkhorn(
            self.mix_logits, self.config.sinkhorn_iters, exact=False, newton_steps=self.config.newton_steps
        )
        return {
            "spectral_norm": sigma_max(m),
            "gate": self.gate().detach(),
            "row_sum_error": (m.sum(-1) - 1).abs().max(),
            "col_sum_error": (m.sum(-2) - 1).abs().max(),
            "sinkhorn_residual": (plain.sum(-2) - 1).abs().max(),
        }

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"d={self.hidden_size}, n_streams={c.n_streams}, stream_rank={c.stream_rank}, g_max={c.g_max}, "
            f"form={c.form}, norm={c.norm}"
        )


class CRMABlock(nn.Module):
    """A decoder layer followed by its CRMA adapter on the hidden-state output.

    Wrapping (rather than a forward hook) keeps the adapter inside the block, so FSDP's per-block
    wrapping shards the adapter with its block (as a unit of its own inside it) and activation
    checkpointing covers it. With this step's batched factors valid, the block applies them without
    calling the adapter module (so FSDP2 never gathers the adapter's unit; its hooks do not run).

    Attributes:
        base_layer: The original decoder layer.
        crma: The block's :class:`CRMAAdapter`.
        enabled: When ``False`` the block is exactly the original layer.
    """

    def __init__(self, base_layer: nn.Module, crma: CRMAAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.crma = crma
        self.enabled = True

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        if not self.enabled:
            return out
        if isinstance(out, torch.Tensor):  # transformers >= 4.54 Llama/Mistral/Qwen2/GPT-2/NeoX
            return self._adapt(out)
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):  # (hidden, attn, cache, ...)
            return (self._adapt(out[0]), *out[1:])
        raise TypeError(
            f"CRMA expects a decoder layer to return a tensor or a tuple starting with the hidden states; "
            f"{type(self.base_layer).__name__} returned {type(out).__name__}"
        )

    def _adapt(self, h: torch.Tensor) -> torch.Tensor:
        # With this step's batched factors the adapter module is not called: an FSDP2 unit around it (its
        # own, apply_fsdp2) is then never gathered - its shards were gathered with all blocks' for the batch.
        out = apply_step_factors(self.crma, h.reshape(-1, h.shape[-1]))
        return self.crma(h) if out is None else out.view(h.shape)

    def __getattr__(self, name: str):
        # Model code sometimes reads attributes of its layers (e.g. `attention_type`); forward them.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "crma"):
                raise
            return getattr(self.base_layer, name)
