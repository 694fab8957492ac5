"""Sinkhorn normalisation for CRMA's mixing matrix ``M = Sinkhorn(Λ)`` (docs/method.md, "Sinkhorn").

Log-space iterations without a graph, Newton steps on the potentials, the implicit gradient of the
Sinkhorn limit as backward, and the Altschuler-Weed-Rigollet rounding step that makes the result exactly
doubly stochastic for any finite logits. Pure PyTorch, batched over leading dimensions.
"""

from __future__ import annotations

import torch


def _log_potentials(lam: torch.Tensor, n_iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Potentials ``(f, g)``, ``(..., n, 1)`` and ``(..., 1, n)``, after ``n_iters`` log-space Sinkhorn rounds.

    ``exp(lam - f - g)`` is the matrix after ``n_iters`` rounds of (column, row) normalisation of
    ``exp(lam)``: the same rounds as normalising the full matrix, with two ops per half-round instead of three.
    """
    f = lam.new_zeros((*lam.shape[:-1], 1))  # (..., n, 1)
    g = lam.new_zeros((*lam.shape[:-2], 1, lam.shape[-1]))  # (..., 1, n)
    for _ in range(n_iters):
        g = torch.logsumexp(lam - f, dim=-2, keepdim=True)  # columns
        f = torch.logsumexp(lam - g, dim=-1, keepdim=True)  # rows
    return f, g


def _marginal_error(p: torch.Tensor) -> torch.Tensor:
    """``max |row sum - 1|, |column sum - 1|`` per matrix, ``(...)``."""
    return torch.maximum((p.sum(-1) - 1).abs().amax(-1), (p.sum(-2) - 1).abs().amax(-1))


def _newton_polish(lam: torch.Tensor, f: torch.Tensor, g: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` Newton steps on the potentials (float64), kept per matrix only where they reduce the error.

    Sinkhorn converges linearly, slowest near a permutation matrix (where CRMA starts: ``Λ = λ0 I``); Newton's
    method on the marginal equations ``rowsum(P) = 1``, ``colsum(P) = 1`` converges quadratically from the
    Sinkhorn warm start. Its Jacobian ``[[diag(rowsum), P], [Pᵀ, diag(colsum)]]`` is singular along
    ``(1, -1)`` (the potentials' gauge); the residual has no component there and a tiny ridge fixes the gauge.
    Logits without a doubly-stochastic scaling (zeros forced by ±50 patterns) make Newton diverge: the
    per-matrix check then keeps the Sinkhorn result, and the rounding step still makes it exact.
    """
    n = lam.shape[-1]
    lam64, f64, g64 = lam.double(), f.double(), g.double()
    start = (lam64 - f64 - g64).exp()
    ridge = 1e-12 * torch.eye(2 * n, dtype=torch.float64, device=lam.device)
    p = start
    for _ in range(steps):
        rs, cs = p.sum(-1), p.sum(-2)  # (..., n)
        top = torch.cat([torch.diag_embed(rs), p], dim=-1)  # (..., n, 2n)
        bottom = torch.cat([p.mT, torch.diag_embed(cs)], dim=-1)
        jac = torch.cat([top, bottom], dim=-2) + ridge  # (..., 2n, 2n)
        step = torch.linalg.solve_ex(jac, torch.cat([rs - 1, cs - 1], dim=-1).unsqueeze(-1))[0]  # no sync
        f64 = f64 + step[..., :n, :]
        g64 = g64 + step[..., n:, :].mT
        p = (lam64 - f64 - g64).exp()
    better = (_marginal_error(p) < _marginal_error(start))[..., None, None]  # False on NaN: keep Sinkhorn's
    return torch.where(better, p, start).float()


def _sinkhorn_plain(logits: torch.Tensor, n_iters: int, newton_steps: int = 0) -> torch.Tensor:
    """``exp(logits)`` scaled towards unit marginals: ``n_iters`` log-space Sinkhorn rounds, then Newton steps."""
    lam = logits.float()
    f, g = _log_potentials(lam, n_iters)
    if newton_steps > 0:
        return _newton_polish(lam, f, g, newton_steps)
    return (lam - f - g).exp()


class _ImplicitSinkhorn(torch.autograd.Function):
    """Plain Sinkhorn forward without a graph; backward: the implicit gradient of the Sinkhorn limit.

    For the limit ``P = diag(e^f) exp(Λ) diag(e^g)`` with unit row and column sums, a change ``dΛ``
    gives ``dP = P ⊙ (dΛ + df 1ᵀ + 1 dgᵀ)`` with ``df, dg`` restoring the sums. Its adjoint is
    ``dL/dΛ = P ⊙ (G - α 1ᵀ - 1 βᵀ)`` with ``G = dL/dP`` and ``(α, β)`` solving
    ``α + P β = rowsum(P ⊙ G)``, ``Pᵀ α + β = colsum(P ⊙ G)``. Eliminating ``α``:
    ``(I - PᵀP) β = colsum(P ⊙ G) - Pᵀ rowsum(P ⊙ G)``. ``I - PᵀP`` is singular along ``1`` (and along
    more directions when ``P`` saturates to a permutation); the right-hand side has no component there, and
    a tiny ridge in float64 picks a bounded solution. Only ``α_i + β_j`` enters the gradient, which does not
    depend on that choice.
    """

    @staticmethod
    def forward(logits: torch.Tensor, n_iters: int, newton_steps: int) -> torch.Tensor:
        return _sinkhorn_plain(logits, n_iters, newton_steps)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # separate from forward: torch.func transforms need it
        ctx.save_for_backward(output)
        ctx.logits_dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (p,) = ctx.saved_tensors
        p64, g64 = p.double(), grad.double()
        pg = p64 * g64
        r, c = pg.sum(-1), pg.sum(-2)  # (..., n)
        eye = torch.eye(p.shape[-1], dtype=torch.float64, device=p.device)
        lhs = eye - p64.mT @ p64 + 1e-10 * eye  # (..., n, n)
        rhs = c - (p64.mT @ r.unsqueeze(-1)).squeeze(-1)
        beta = torch.linalg.solve_ex(lhs, rhs.unsqueeze(-1))[0].squeeze(-1)  # _ex: no error check, no sync
        alpha = r - (p64 @ beta.unsqueeze(-1)).squeeze(-1)
        grad_logits = p64 * (g64 - alpha.unsqueeze(-1) - beta.unsqueeze(-2))
        return grad_logits.to(ctx.logits_dtype), None, None


def _round_to_doubly_stochastic(m: torch.Tensor) -> torch.Tensor:
    """Altschuler, Weed & Rigollet (2017), Alg. 2, with unit marginals: exact row/column sums for any ``m >= 0``."""
    m = m / m.sum(dim=-1, keepdim=True).clamp_min(1.0)  # shrink rows summing above 1
    m = m / m.sum(dim=-2, keepdim=True).clamp_min(1.0)  # shrink columns summing above 1
    # err_r, err_c are >= 0 in exact arithmetic, but float rounding of the sums can leave them at -1 ulp;
    # unclamped, a total <= 0 next to a non-zero error made the correction ~1e23 (and entries negative).
    err_r = (1.0 - m.sum(dim=-1, keepdim=True)).clamp_min(0.0)  # (..., n, 1)
    err_c = (1.0 - m.sum(dim=-2, keepdim=True)).clamp_min(0.0)  # (..., 1, n), same total as err_r
    # total >= every err_r entry, so err_r / total is in [0, 1]. Where total is 0, so is err_r; dividing by 1
    # there (not by a clamped tiny total) also keeps the gradient w.r.t. err_r (= err_c / total) finite.
    total = err_r.sum(dim=-2, keepdim=True)
    return m + err_r * err_c / torch.where(total > 0, total, torch.ones_like(total))


def sinkhorn(
    logits: torch.Tensor, n_iters: int = 20, exact: bool = True, implicit: bool = True, newton_steps: int = 0
) -> torch.Tensor:
    """Doubly-stochastic matrix from ``exp(logits)`` by log-space Sinkhorn normalisation.

    Columns then rows are normalised ``n_iters`` times, in float32 whatever the input dtype, optionally
    followed by ``newton_steps`` Newton steps on the potentials; ``exact`` then applies the
    Altschuler-Weed-Rigollet rounding step so that every row and column sums to 1 and every entry is >= 0
    for any finite logits.

    Args:
        logits: ``(..., n, n)`` real matrix ``Λ``.
        n_iters: Number of (column, row) normalisation rounds.
        exact: Apply the rounding step after the iterations.
        implicit: Differentiate the scaling implicitly (gradient of the Sinkhorn limit, one small solve)
            instead of back-propagating through each iteration (``False``, the v1 scheme). The implicit
            gradient is only as good as the forward's convergence: pair it with Newton steps (CRMA does).
        newton_steps: Newton steps after the iterations (see :func:`_newton_polish`); 0: plain Sinkhorn.

    Returns:
        ``(..., n, n)`` float32 matrix ``M`` with unit row and column sums.
    """
    if implicit and torch.is_grad_enabled() and logits.requires_grad:
        m = _ImplicitSinkhorn.apply(logits, n_iters, newton_steps)
    elif implicit:
        with torch.no_grad():
            m = _sinkhorn_plain(logits, n_iters, newton_steps)
    else:
        m = _sinkhorn_plain(logits, n_iters, newton_steps)
    return _round_to_doubly_stochastic(m) if exact else m
