"""CRMA: Constrained Residual Mixing Adapter (DESIGN §3.2).

One ``CRMAAdapter`` sits on the residual stream after each decoder layer::

    R  = R~ / max(1, ||R~||_F)        read projection   (n·k, d)
    W  = W~ / max(1, ||W~||_F)        write projection  (d, n·k), W~ = 0 at init
    M  = Sinkhorn(Λ)                  (n, n) doubly stochastic, Λ with a dominant diagonal at init
    g  = g_max · sigmoid(γ)           scalar gate
    s  = reshape(R h, (n, k))         n streams of rank k
    h' = h + g · W vec(M s)

Since ``||M||_2 <= 1`` (Birkhoff), ``||R||_2 <= 1`` and ``||W||_2 <= 1``, every input satisfies
``||h' - h|| <= g_max · ||h||`` - by construction, with no penalty term.

Sinkhorn note. Twenty log-space iterations (mHC's default) do *not* reach double stochasticity
for every logit matrix: with random ±50 logits most 4x4 draws miss 1e-5 even after 2,000 iterations,
and N(0, 1) logits miss it in a few tenths of a percent of draws (benchmarks/sinkhorn_convergence.py). The bound
above relies on exact double stochasticity, so after the iterations we apply the rounding step of
Altschuler, Weed & Rigollet (NeurIPS 2017, Alg. 2): shrink over-full rows/columns, then add the
rank-one correction ``err_r err_c^T / ||err_r||_1``. It keeps every entry non-negative, makes all
row and column sums exactly 1 (to float rounding) for any logits, and changes nothing measurable
when the iterations have converged. ``exact=False`` turns it off for ablations.

Pure PyTorch: no Lightning import here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CRMAConfig:
    """Hyper-parameters of the CRMA block adapter.

    Attributes:
        n_streams: Number of streams ``n`` mixed by the doubly-stochastic matrix.
        stream_rank: Rank ``k`` of each stream; ``n · k`` must not exceed the hidden size.
        g_max: Upper bound of the gate, hence of ``||h' - h|| / ||h||``.
        sinkhorn_iters: Log-space Sinkhorn iterations per forward (on an ``n × n`` matrix, not per token).
        exact_sinkhorn: Apply the exact rounding step after the iterations (see module docstring).
        mix_init_diag: Initial value of the diagonal of ``Λ`` (off-diagonal 0): ``M`` starts close to ``I``.
        gate_init: Initial gate logit ``γ``; 0 gives ``g = g_max / 2``.
    """

    n_streams: int = 4
    stream_rank: int = 4
    g_max: float = 0.1
    sinkhorn_iters: int = 20
    exact_sinkhorn: bool = True
    mix_init_diag: float = 4.0
    gate_init: float = 0.0

    def validate(self, hidden_size: int | None = None) -> None:
        """Raise ``ValueError`` naming the first bad field (``hidden_size``: the model's, if known)."""
        for field in ("n_streams", "stream_rank", "sinkhorn_iters"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CRMA {field}={value!r} is invalid: expected an integer >= 1")
        if not self.g_max > 0:
            raise ValueError(f"CRMA g_max={self.g_max!r} is invalid: expected a number > 0")
        if hidden_size is not None and self.n_streams * self.stream_rank > hidden_size:
            raise ValueError(
                f"CRMA n_streams * stream_rank = {self.n_streams} * {self.stream_rank} = "
                f"{self.n_streams * self.stream_rank} does not fit the hidden size {hidden_size}: "
                f"expected n_streams * stream_rank <= {hidden_size}"
            )


def sinkhorn(logits: torch.Tensor, n_iters: int = 20, exact: bool = True) -> torch.Tensor:
    """Doubly-stochastic matrix from ``exp(logits)`` by log-space Sinkhorn normalisation.

    Columns then rows are normalised with ``logsumexp`` ``n_iters`` times, in float32 whatever the
    input dtype; ``exact`` then applies the Altschuler-Weed-Rigollet rounding step so that every row
    and column sums to 1 and every entry is >= 0 for any finite logits.

    Args:
        logits: ``(..., n, n)`` real matrix ``Λ``.
        n_iters: Number of (column, row) normalisation rounds.
        exact: Apply the rounding step after the iterations.

    Returns:
        ``(..., n, n)`` float32 matrix ``M`` with unit row and column sums.
    """
    log_p = logits.float()
    for _ in range(n_iters):
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)  # columns
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)  # rows
    m = log_p.exp()
    if not exact:
        return m
    # Altschuler, Weed & Rigollet (2017), Alg. 2, with unit marginals.
    m = m * torch.clamp(1.0 / m.sum(dim=-1, keepdim=True), max=1.0)  # shrink rows summing above 1
    m = m * torch.clamp(1.0 / m.sum(dim=-2, keepdim=True), max=1.0)  # shrink columns summing above 1
    # err_r, err_c are >= 0 in exact arithmetic, but float rounding of the sums can leave them at -1 ulp;
    # unclamped, a total <= 0 next to a non-zero error made the correction ~1e23 (and entries negative).
    err_r = (1.0 - m.sum(dim=-1, keepdim=True)).clamp_min(0.0)  # (..., n, 1)
    err_c = (1.0 - m.sum(dim=-2, keepdim=True)).clamp_min(0.0)  # (..., 1, n), same total as err_r
    total = err_r.sum(dim=-2, keepdim=True)  # >= every err_r entry, so err_r / total is in [0, 1]
    return m + err_r * err_c / torch.where(total > 0, total, torch.ones_like(total))


class CRMAAdapter(nn.Module):
    """The CRMA residual adapter for one block: ``h -> h + g · W vec(M s)``.

    Attributes:
        read_weight: ``R~``, ``(n·k, d)``, Gaussian init then used Frobenius-normalised.
        write_weight: ``W~``, ``(d, n·k)``, zero init: the adapter is the identity at step 0.
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
        self.write_weight = nn.Parameter(torch.zeros(hidden_size, n * k, **kw))
        self.mix_logits = nn.Parameter(torch.empty(n, n, **kw))
        self.gate_logit = nn.Parameter(torch.empty(1, **kw))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Identity start: ``W~ = 0``, ``Λ = mix_init_diag · I``, ``γ = gate_init``."""
        if self.read_weight.device.type == "meta":
            return
        nn.init.normal_(self.read_weight, std=self.hidden_size**-0.5)
        self.write_weight.zero_()
        self.mix_logits.copy_(torch.eye(self.config.n_streams) * self.config.mix_init_diag)
        self.gate_logit.fill_(self.config.gate_init)

    # ------------------------------------------------------------------ constrained factors
    def read(self) -> torch.Tensor:
        """``R = R~ / max(1, ||R~||_F)``, ``(n·k, d)``."""
        return self.read_weight / self.read_weight.norm().clamp_min(1.0)

    def write(self) -> torch.Tensor:
        """``W = W~ / max(1, ||W~||_F)``, ``(d, n·k)``."""
        return self.write_weight / self.write_weight.norm().clamp_min(1.0)

    def mixing(self) -> torch.Tensor:
        """``M = Sinkhorn(Λ)``, ``(n, n)``."""
        return sinkhorn(self.mix_logits, self.config.sinkhorn_iters, self.config.exact_sinkhorn)

    def gate(self) -> torch.Tensor:
        """``g = g_max · sigmoid(γ)``, a 0-d tensor."""
        return self.config.g_max * torch.sigmoid(self.gate_logit[0])

    def effective_write(self, m: torch.Tensor | None = None) -> torch.Tensor:
        """``g · W (M ⊗ I_k)``, ``(d, n·k)``: folds mixing and gate into the write so a forward is two thin matmuls.

        ``vec(M s)`` with ``s`` of shape ``(n, k)`` flattened row-major equals ``(M ⊗ I_k) vec(s)``, so
        ``W vec(M s) = W (M ⊗ I_k) vec(s)``; computing the ``(d, n·k)`` product once per forward costs
        ``O(d·n²·k)``, independent of the number of tokens.
        """
        n, k = self.config.n_streams, self.config.stream_rank
        m = self.mixing() if m is None else m
        # The small factors are combined in float32 whatever the parameters' dtype (bf16 under
        # `precision: bf16-true` or FSDP mixed precision); the forward casts the result to h's dtype.
        w = self.write().float().view(self.hidden_size, n, k)  # W[d, (i, c)]
        # (W (M ⊗ I))[d, (j, c)] = sum_i W[d, (i, c)] · M[i, j]
        return self.gate().float() * torch.einsum("dic,ij->djc", w, m.float()).reshape(self.hidden_size, n * k)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Apply the adapter to hidden states ``h`` of shape ``(..., d)``; returns the same shape and dtype."""
        read = self.read().to(h.dtype)  # (n·k, d)
        write = self.effective_write().to(h.dtype)  # (d, n·k)
        return h + F.linear(F.linear(h, read), write)  # (..., d)

    # ------------------------------------------------------------------ health
    @torch.no_grad()
    def health(self) -> dict[str, torch.Tensor]:
        """Device tensors (no host sync): spectral norm of ``M``, gate ``g``, max row/column-sum error.

        ``sinkhorn_residual`` is the column-sum error the plain iterations left before the rounding step:
        how far the logits are from what 20 iterations can handle on their own.
        """
        m = self.mixing()
        plain = sinkhorn(self.mix_logits, self.config.sinkhorn_iters, exact=False)
        return {
            "spectral_norm": torch.linalg.matrix_norm(m, ord=2),
            "gate": self.gate().detach(),
            "row_sum_error": (m.sum(-1) - 1).abs().max(),
            "col_sum_error": (m.sum(-2) - 1).abs().max(),
            "sinkhorn_residual": (plain.sum(-2) - 1).abs().max(),
        }

    def extra_repr(self) -> str:
        c = self.config
        return f"d={self.hidden_size}, n_streams={c.n_streams}, stream_rank={c.stream_rank}, g_max={c.g_max}"


class CRMABlock(nn.Module):
    """A decoder layer followed by its CRMA adapter on the hidden-state output.

    Wrapping (rather than a forward hook) keeps the adapter inside the block, so FSDP's per-block
    wrapping shards the adapter with its block and activation checkpointing covers it.

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
            return self.crma(out)
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):  # (hidden, attn, cache, ...)
            return (self.crma(out[0]), *out[1:])
        raise TypeError(
            f"CRMA expects a decoder layer to return a tensor or a tuple starting with the hidden states; "
            f"{type(self.base_layer).__name__} returned {type(out).__name__}"
        )

    def __getattr__(self, name: str):
        # Model code sometimes reads attributes of its layers (e.g. `attention_type`); forward them.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "crma"):
                raise
            return getattr(self.base_layer, name)
