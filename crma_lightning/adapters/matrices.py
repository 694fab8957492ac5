"""Matrix helpers of CRMA: exact largest singular value, spectral/Frobenius normalisation, orthonormal rows.

Pure PyTorch, batched over leading dimensions, float32 results; none of them raises on NaN/inf input (a
non-finite matrix gives a non-finite result, which the health metrics report instead of crashing).
"""

from __future__ import annotations

import torch


def _top_eigenpair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest eigenvalue and its eigenvector of the small Gram matrix of ``x`` (no autograd, never raises).

    Args:
        x: ``(..., a, b)``; the Gram matrix is ``x xᵀ`` (``a × a``) if ``a <= b``, else ``xᵀ x`` (``b × b``).

    Returns:
        ``σ_max(x)²`` of shape ``(...)`` and the unit vector ``v`` of shape ``(..., min(a, b))`` with
        ``||vᵀ x|| = σ_max`` (``a <= b``) or ``||x v|| = σ_max`` (otherwise), both float32. The Gram matrix
        is formed in float64, where squares of float32 values can neither overflow nor underflow, and passed
        through ``nan_to_num`` because ``eigh`` raises on NaN; a non-finite ``x`` shows up through ``x`` itself.
    """
    with torch.no_grad():
        xd = x.detach().double()
        gram = xd @ xd.mT if x.shape[-2] <= x.shape[-1] else xd.mT @ xd  # (..., min(a, b), min(a, b))
        evals, evecs = torch.linalg.eigh(torch.nan_to_num(gram))  # ascending
        return evals[..., -1].float(), evecs[..., :, -1].float()


def sigma_max(x: torch.Tensor) -> torch.Tensor:
    """Exact largest singular value of ``(..., a, b)`` matrices, without autograd; NaN where ``x`` is not finite.

    Unlike ``torch.linalg.matrix_norm(x, ord=2)`` it cannot raise on NaN or inf.
    """
    sq, _ = _top_eigenpair(x)
    finite = torch.isfinite(x.detach()).flatten(-2).all(-1)
    return torch.where(finite, sq.clamp_min(0).sqrt(), torch.full_like(sq, float("nan")))


def spectral_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x / max(1, σ_max(x))`` for ``(..., a, b)`` matrices, in float32, differentiable.

    ``σ_max`` is exact: the top eigenpair ``(λ, v)`` of the small Gram matrix (``min(a, b)`` square) is
    found without autograd, and ``σ² = ||vᵀ x||²`` is recomputed with autograd. Since ``v`` maximises
    ``||vᵀ x||`` over unit vectors, the gradient of that expression at fixed ``v`` *is* the gradient of
    ``σ_max²`` (envelope theorem): one small matmul instead of differentiating through ``eigh``. The value
    is lifted to ``max(||vᵀ x||², λ)`` (no gradient through the lift) so float error in ``v`` can never
    under-estimate ``σ_max``. A non-finite ``x`` gives a non-finite result, never an exception.
    """
    xf = x.float()
    lam, v = _top_eigenpair(xf)
    y = v.unsqueeze(-2) @ xf if x.shape[-2] <= x.shape[-1] else xf @ v.unsqueeze(-1)  # (..., 1, b) or (..., a, 1)
    sq = y.square().sum((-2, -1))  # σ_max² (no sqrt: finite gradient at x = 0)
    sq = sq + (lam - sq).detach().clamp_min(0.0)
    return xf * sq.clamp_min(1.0).rsqrt()[..., None, None]


def frobenius_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x / max(1, ||x||_F)`` for ``(..., a, b)`` matrices, in float32 (the v1 normalisation)."""
    xf = x.float()
    return xf * xf.square().sum((-2, -1), keepdim=True).clamp_min(1.0).rsqrt()


def orthonormal_rows(x: torch.Tensor) -> torch.Tensor:
    """``(..., a, b)`` with ``a <= b`` -> the matrix with orthonormal rows spanning the same row space, float32.

    ``Qᵀ`` from a reduced QR of ``xᵀ``, with column signs fixed so that the triangular factor has a
    non-negative diagonal: this makes the map unique and continuous (it equals the Gram-Schmidt of the
    rows of ``x``), and the identity on matrices that already have orthonormal rows. QR does not raise on
    NaN; the NaN propagates.
    """
    q, r = torch.linalg.qr(x.float().mT)  # (..., b, a), (..., a, a)
    sign = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0)  # (..., a); a zero diagonal keeps +1
    return (q * sign.unsqueeze(-2)).mT


def gated_write(
    write: torch.Tensor, m: torch.Tensor, gate_logit: torch.Tensor, g_max: float, form: str
) -> torch.Tensor:
    """CRMA's effective write ``g · W (M ⊗ I_k)`` (``write`` form) or ``g · Rᵀ ((M - I) ⊗ I_k)`` (``mix``).

    The one formula of :meth:`~crma_lightning.adapters.CRMAAdapter.effective_write` and of the batched
    factors (:mod:`crma_lightning.adapters.crma_batch`), over any leading dimensions ``...`` (none: one block;
    ``L``: a stack of blocks). ``vec(M s)`` with ``s`` of shape ``(n, k)`` flattened row-major equals
    ``(M ⊗ I_k) vec(s)``, so ``(W (M ⊗ I))[d, (j, c)] = sum_i W[d, (i, c)] · M[i, j]``.

    Args:
        write: ``(..., d, n·k)``: ``W`` (write form) or ``Rᵀ`` (mix form).
        m: ``(..., n, n)``: the doubly-stochastic mixing matrix.
        gate_logit: ``(..., 1)``: ``γ``; the gate is ``g = g_max · sigmoid(γ)``.
        g_max: The gate's bound.
        form: ``write`` or ``mix``.

    Returns:
        ``(..., d, n·k)`` float32: the small factors are combined in float32 whatever the parameters' dtype
        (bf16 under ``precision: bf16-true`` or FSDP mixed precision); the forward casts to ``h``'s dtype.
    """
    n = m.shape[-1]
    m = m.float()
    if form == "mix":
        m = m - torch.eye(n, device=m.device)
    w = write.float().unflatten(-1, (n, -1))  # (..., d, n, k)
    gate = g_max * torch.sigmoid(gate_logit[..., 0].float())  # (...)
    return gate[..., None, None] * torch.einsum("...dic,...ij->...djc", w, m).flatten(-2)
