"""CRMA (DESIGN §3.2): Sinkhorn mixing, the structural bound ||h' - h|| <= g_max ||h||, CRMABlock wrapping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from crma_lightning.adapters import CRMAAdapter, CRMABlock, CRMAConfig, sinkhorn

TOL = 1e-5


def _sums_error(m: torch.Tensor) -> float:
    return max((m.sum(-1) - 1).abs().max().item(), (m.sum(-2) - 1).abs().max().item())


def _check_doubly_stochastic(m: torch.Tensor) -> None:
    assert m.dtype == torch.float32
    assert torch.isfinite(m).all()
    assert _sums_error(m) <= TOL
    assert m.min().item() >= 0.0
    assert torch.linalg.matrix_norm(m, ord=2).max().item() <= 1 + TOL


def _sign_patterns(n: int, count: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (count, n, n), generator=g).float() * 100 - 50  # entries in {-50, +50}


def _extreme_logits(n: int) -> dict[str, torch.Tensor]:
    eye = torch.eye(n)
    return {
        "sign_patterns": _sign_patterns(n, 64, seed=n),
        "diag_plus50": eye * 50 - (1 - eye) * 50,
        "all_equal": torch.zeros(n, n),
        "all_equal_large": torch.full((n, n), 50.0),
        "upper_triangular_pm50": torch.triu(torch.full((n, n), 100.0)) - 50,
    }


# ----------------------------------------------------------------------------- Sinkhorn
@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("scale", [0.01, 0.3, 1.0, 3.0, 10.0])
def test_sinkhorn_random_logits_doubly_stochastic(n, scale):
    g = torch.Generator().manual_seed(int(scale * 100) + n)
    logits = torch.randn(512, n, n, generator=g) * scale
    m = sinkhorn(logits)
    assert m.shape == logits.shape
    _check_doubly_stochastic(m)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
@pytest.mark.parametrize(
    "case", ["sign_patterns", "diag_plus50", "all_equal", "all_equal_large", "upper_triangular_pm50"]
)
def test_sinkhorn_extreme_logits(n, case):
    logits = _extreme_logits(n)[case]
    m = sinkhorn(logits)
    _check_doubly_stochastic(m)
    if case == "diag_plus50":
        torch.testing.assert_close(m, torch.eye(n), atol=1e-6, rtol=0)
    if case.startswith("all_equal"):
        torch.testing.assert_close(m, torch.full((n, n), 1.0 / n), atol=1e-6, rtol=0)


def test_sinkhorn_rounding_never_blows_up_on_near_converged_input():
    """Regression: float rounding left a row error at -1 ulp, the clamped total ~1e-38 made entries ~1e23."""
    g = torch.Generator().manual_seed(1)
    for n in (4, 5, 8):
        logits = torch.randn(4000, n, n, generator=g) * 0.3
        m = sinkhorn(logits)
        assert m.abs().max().item() <= 1 + TOL
        _check_doubly_stochastic(m)


@pytest.mark.parametrize(
    "make",
    [
        lambda n, g: torch.randn(n, n, generator=g),
        lambda n, g: torch.randn(n, n, generator=g) * 3,
        lambda n, g: torch.randint(0, 2, (n, n), generator=g).float() * 100 - 50,
        lambda n, g: torch.zeros(n, n),
        lambda n, g: torch.triu(torch.full((n, n), 100.0)) - 50,
    ],
    ids=["randn", "randn_x3", "pm50_signs", "all_equal", "upper_triangular_pm50"],
)
def test_sinkhorn_gradients_finite_and_nonzero(make):
    g = torch.Generator().manual_seed(7)
    n = 4
    for _ in range(8):
        logits = make(n, g).requires_grad_(True)
        functional = torch.randn(n, n, generator=g)
        (sinkhorn(logits) * functional).sum().backward()
        assert torch.isfinite(logits.grad).all()
        assert logits.grad.abs().max().item() > 0


def test_sinkhorn_gradient_finite_when_saturated():
    """+50 diagonal / -50 off-diagonal: M is exactly I, the true gradient is ~exp(-100); it must not be NaN."""
    n = 4
    logits = (torch.eye(n) * 100 - 50).requires_grad_(True)
    (sinkhorn(logits) * torch.randn(n, n)).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_sinkhorn_plain_iterations_do_not_converge_on_pm50_pattern():
    """Why the rounding step exists: 20 plain iterations leave a ±50 pattern far from doubly stochastic."""
    n = 4
    logits = torch.triu(torch.full((n, n), 100.0)) - 50  # +50 on and above the diagonal, -50 below
    plain = sinkhorn(logits, n_iters=20, exact=False)
    assert _sums_error(plain) > 1e-3  # far beyond 1e-5
    assert _sums_error(sinkhorn(logits, n_iters=2000, exact=False)) > TOL  # not even with many more iterations
    exact = sinkhorn(logits, n_iters=20, exact=True)
    _check_doubly_stochastic(exact)


def test_sinkhorn_plain_iterations_fail_for_some_random_sign_patterns():
    logits = _sign_patterns(4, 64, seed=3)
    plain = sinkhorn(logits, exact=False)
    errors = torch.maximum((plain.sum(-1) - 1).abs().amax(-1), (plain.sum(-2) - 1).abs().amax(-1))
    assert (errors > TOL).any()  # plain Sinkhorn misses on at least one pattern ...
    exact_errors = sinkhorn(logits, exact=True)
    _check_doubly_stochastic(exact_errors)  # ... the rounding step fixes every one


@pytest.mark.parametrize(
    "logits",
    [torch.eye(4) * 4.0, torch.randn(4, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(3, 3)],
    ids=["init_4I", "randn", "zeros"],
)
def test_sinkhorn_rounding_does_not_change_converged_matrix(logits):
    plain = sinkhorn(logits, n_iters=200, exact=False)
    assert _sums_error(plain) < 1e-6  # converged
    exact = sinkhorn(logits, n_iters=200, exact=True)
    assert (exact - plain).abs().max().item() < 1e-6
    # The default 20 iterations on the init logits (4·I) are converged as well.
    if logits.shape == (4, 4) and torch.equal(logits, torch.eye(4) * 4.0):
        assert (sinkhorn(logits) - sinkhorn(logits, exact=False)).abs().max().item() < 1e-6


def test_sinkhorn_batched_and_low_precision_input():
    logits = torch.randn(3, 5, 4, 4)
    m = sinkhorn(logits)
    assert m.shape == (3, 5, 4, 4)
    for idx in [(0, 0), (2, 4)]:
        torch.testing.assert_close(m[idx], sinkhorn(logits[idx]), atol=1e-7, rtol=0)
    m16 = sinkhorn(logits.to(torch.bfloat16))
    assert m16.dtype == torch.float32  # computed in float32 whatever the input dtype
    _check_doubly_stochastic(m16)


# ----------------------------------------------------------------------------- CRMAAdapter
def _randomize(adapter: CRMAAdapter, gen: torch.Generator, read_std: float, write_std: float, mix: str, gate: float):
    n = adapter.config.n_streams
    with torch.no_grad():
        adapter.read_weight.copy_(torch.randn(adapter.read_weight.shape, generator=gen) * read_std)
        adapter.write_weight.copy_(torch.randn(adapter.write_weight.shape, generator=gen) * write_std)
        if mix == "randn":
            adapter.mix_logits.copy_(torch.randn(n, n, generator=gen) * 3)
        elif mix == "pm50":
            adapter.mix_logits.copy_(torch.randint(0, 2, (n, n), generator=gen).float() * 100 - 50)
        else:
            adapter.mix_logits.copy_(torch.triu(torch.full((n, n), 100.0)) - 50)
        adapter.gate_logit.fill_(gate)


def _per_token_ratio_excess(adapter: CRMAAdapter, h: torch.Tensor) -> torch.Tensor:
    """``||h' - h|| - g_max ||h|| (1 + TOL)`` per token (must be <= 0)."""
    out = adapter(h)
    delta = (out - h).norm(dim=-1)
    return delta - adapter.config.g_max * h.norm(dim=-1) * (1 + TOL)


@pytest.mark.parametrize("norm", ["spectral", "frobenius"])
@pytest.mark.parametrize("g_max", [0.01, 0.1, 0.5, 1.0, 4.0])
@pytest.mark.parametrize(
    "read_std,write_std,mix,gate",
    [
        (10.0, 10.0, "randn", 20.0),
        (1.0, 10.0, "pm50", 20.0),
        (0.01, 0.01, "randn", 3.0),  # norms < 1: no normalisation kicks in
        (10.0, 0.05, "triu", -2.0),
    ],
)
def test_crma_bound_random_parameters(norm, g_max, read_std, write_std, mix, gate):
    d = 32
    gen = torch.Generator().manual_seed(int(g_max * 100) + int(read_std))
    for n, k in [(4, 4), (4, 8), (2, 3)]:  # (4, 8): n·k == d, the largest allowed
        adapter = CRMAAdapter(d, CRMAConfig(n_streams=n, stream_rank=k, g_max=g_max, norm=norm))
        _randomize(adapter, gen, read_std, write_std, mix, gate)
        # Tokens of wildly different norms, including one exact zero token.
        scales = 10 ** (torch.rand(4, 16, 1, generator=gen) * 6 - 3)
        h = torch.randn(4, 16, d, generator=gen) * scales
        h[0, 0] = 0
        excess = _per_token_ratio_excess(adapter, h)
        assert (excess <= 0).all(), f"bound violated by {excess.max().item()} (n={n}, k={k})"


def test_crma_bound_is_tight_for_aligned_parameters():
    """The bound is attained (so the check above is not vacuous): rank-one R, W aligned with h, M = I, g ≈ g_max."""
    d, g_max = 16, 0.3
    adapter = CRMAAdapter(d, CRMAConfig(n_streams=2, stream_rank=2, g_max=g_max))
    with torch.no_grad():
        adapter.read_weight.zero_()
        adapter.read_weight[0, 0] = 5.0  # ||R~||_F = σ_max(R~) = 5 -> R = e0 e0^T
        adapter.write_weight.zero_()
        adapter.write_weight[0, 0] = 1.0
        adapter.mix_logits.copy_(torch.eye(2) * 100 - 50)
        adapter.gate_logit.fill_(30.0)
    h = torch.zeros(3, d)
    h[:, 0] = torch.tensor([1.0, -2.0, 7.0])
    ratio = (adapter(h) - h).norm(dim=-1) / h.norm(dim=-1)
    torch.testing.assert_close(ratio, torch.full((3,), g_max), atol=1e-6, rtol=0)


def test_crma_bound_holds_while_optimising_against_it():
    """Gradient ascent on ||h' - h|| / ||h|| cannot push past g_max: the bound is structural, not a penalty."""
    torch.manual_seed(0)
    d, g_max = 32, 0.2
    adapter = CRMAAdapter(d, CRMAConfig(g_max=g_max))  # spectral normalisation (the default)
    with torch.no_grad():
        adapter.write_weight.normal_()
    opt = torch.optim.Adam(adapter.parameters(), lr=0.5)
    h = torch.randn(64, d)
    best = 0.0
    for _ in range(40):
        ratio = (adapter(h) - h).norm(dim=-1) / h.norm(dim=-1)
        assert (ratio <= g_max * (1 + TOL)).all()
        best = max(best, ratio.max().item())
        opt.zero_grad()
        (-ratio.mean()).backward()
        opt.step()
    assert best > 0.3 * g_max  # the optimiser did make progress towards the bound


def _sigma(x: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(x.double(), ord=2).item()


@pytest.mark.parametrize("norm", ["frobenius", "spectral"])
def test_crma_forward_matches_definition(norm):
    """The folded two-matmul forward equals h + g · W vec(M s), s = reshape(R h, (n, k)), token by token."""
    d, n, k = 24, 3, 4
    gen = torch.Generator().manual_seed(3)
    adapter = CRMAAdapter(d, CRMAConfig(n_streams=n, stream_rank=k, g_max=0.7, norm=norm))
    _randomize(adapter, gen, read_std=1.0, write_std=1.0, mix="randn", gate=0.5)
    h = torch.randn(2, 5, d, generator=gen)
    size = (lambda x: x.norm().item()) if norm == "frobenius" else _sigma
    with torch.no_grad():
        r = adapter.read_weight / max(1.0, size(adapter.read_weight))
        w = adapter.write_weight / max(1.0, size(adapter.write_weight))
        m = adapter.mixing()
        g = 0.7 * torch.sigmoid(adapter.gate_logit)
        expected = torch.empty_like(h)
        for idx in [(b, t) for b in range(2) for t in range(5)]:
            s = (r @ h[idx]).reshape(n, k)
            expected[idx] = h[idx] + g * (w @ (m @ s).reshape(n * k))
        torch.testing.assert_close(adapter(h), expected, atol=1e-5, rtol=1e-5)


def test_crma_identity_at_init_and_near_identity_mixing():
    d = 32
    adapter = CRMAAdapter(d, CRMAConfig(g_max=0.1))
    h = torch.randn(3, 7, d) * 5
    assert torch.equal(adapter(h), h)
    assert torch.count_nonzero(adapter.write_weight) == 0
    m = adapter.mixing()
    assert (torch.diagonal(m) > 0.9).all()  # streams start (nearly) unmixed
    torch.testing.assert_close(adapter.gate(), torch.tensor(0.05))  # g_max · sigmoid(0)
    # Identity holds in other dtypes too (returns the input dtype).
    h16 = h.to(torch.bfloat16)
    out16 = adapter(h16)
    assert out16.dtype == torch.bfloat16 and torch.equal(out16, h16)


@pytest.mark.parametrize("g_max", [0.05, 1.0])
def test_crma_health_values(g_max):
    gen = torch.Generator().manual_seed(11)
    adapter = CRMAAdapter(32, CRMAConfig(g_max=g_max))
    for mix in ["randn", "pm50", "triu"]:
        _randomize(adapter, gen, 10.0, 10.0, mix, gate=1.3)
        health = adapter.health()
        assert set(health) == {"spectral_norm", "gate", "row_sum_error", "col_sum_error", "sinkhorn_residual"}
        assert health["spectral_norm"].item() <= 1 + TOL
        assert health["spectral_norm"].item() >= 1 - TOL  # a doubly-stochastic matrix has eigenvalue 1
        torch.testing.assert_close(health["gate"], torch.tensor(g_max * 1 / (1 + math.exp(-1.3))))
        assert health["row_sum_error"].item() < TOL
        assert health["col_sum_error"].item() < TOL
        if mix == "triu":  # what plain iterations leave behind is reported
            assert health["sinkhorn_residual"].item() > 1e-3
        assert all(t.ndim == 0 for t in health.values())


def test_crma_gradients_reach_all_parameters_after_first_step():
    torch.manual_seed(0)
    adapter = CRMAAdapter(16, CRMAConfig(n_streams=2, stream_rank=2))
    h = torch.randn(8, 16)
    target = torch.randn(8, 16)
    adapter(h).sub(target).pow(2).sum().backward()
    assert adapter.write_weight.grad.abs().sum() > 0  # W~ = 0: only the write projection gets a gradient ...
    assert adapter.read_weight.grad.abs().sum() == 0
    with torch.no_grad():
        adapter.write_weight.normal_()
    adapter.zero_grad()
    adapter(h).sub(target).pow(2).sum().backward()
    for name, p in adapter.named_parameters():  # ... and once W~ != 0, every parameter does
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_streams": 0}, r"n_streams=0"),
        ({"stream_rank": -1}, r"stream_rank=-1"),
        ({"sinkhorn_iters": 0}, r"sinkhorn_iters=0"),
        ({"g_max": 0.0}, r"g_max=0\.0"),
        ({"g_max": -0.5}, r"g_max=-0\.5"),
        ({"n_streams": 8, "stream_rank": 8}, r"8 \* 8 = 64 does not fit the hidden size 32"),
    ],
)
def test_crma_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CRMAAdapter(32, CRMAConfig(**kwargs))


# ----------------------------------------------------------------------------- CRMABlock
class _TensorLayer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.attention_type = "full_attention"

    def forward(self, x, scale: float = 1.0):
        return self.proj(x) * scale


class _TupleLayer(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        y = self.proj(x)
        return y, y.mean(-1), "cache"


class _DictLayer(nn.Module):
    def forward(self, x):
        return {"hidden_states": x}


def _active_crma(d: int) -> CRMAAdapter:
    adapter = CRMAAdapter(d, CRMAConfig(n_streams=2, stream_rank=2, g_max=0.5))
    with torch.no_grad():
        adapter.write_weight.normal_()
    return adapter


def test_crma_block_tensor_output():
    torch.manual_seed(0)
    layer, crma = _TensorLayer(8), _active_crma(8)
    block = CRMABlock(layer, crma)
    x = torch.randn(2, 3, 8)
    out = block(x, scale=2.0)  # args and kwargs are passed through
    torch.testing.assert_close(out, crma(layer(x, scale=2.0)))
    assert not torch.equal(out, layer(x, scale=2.0))
    assert block.attention_type == "full_attention"  # attribute reads reach the wrapped layer
    block.enabled = False
    assert torch.equal(block(x, scale=2.0), layer(x, scale=2.0))


def test_crma_block_tuple_output():
    torch.manual_seed(0)
    layer, crma = _TupleLayer(8), _active_crma(8)
    block = CRMABlock(layer, crma)
    x = torch.randn(2, 3, 8)
    out = block(x)
    base = layer(x)
    assert isinstance(out, tuple) and len(out) == 3
    torch.testing.assert_close(out[0], crma(base[0]))
    assert torch.equal(out[1], base[1]) and out[2] == "cache"  # the rest passes through untouched


def test_crma_block_rejects_other_outputs():
    block = CRMABlock(_DictLayer(), _active_crma(8))
    with pytest.raises(TypeError, match=r"_DictLayer returned dict"):
        block(torch.randn(2, 8))
    with pytest.raises(AttributeError):
        block.no_such_attribute
