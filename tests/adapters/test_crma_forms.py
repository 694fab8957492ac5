"""CRMA's normalisations and forms (DESIGN §3.2): spectral norm, the mix form, the implicit Sinkhorn, adapter files."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_gpt2, tiny_llama

from crma_lightning.adapters import CRMAAdapter, CRMAConfig, LoRAConfig, attach_adapters, crma_adapters, sinkhorn
from crma_lightning.adapters.crma import V1_SETTINGS, orthonormal_rows, sigma_max, spectral_normalize
from crma_lightning.adapters.inject import output_projection_weight
from crma_lightning.adapters.serialization import (
    CRMA_METADATA_KEY,
    METADATA_KEY,
    adapter_state_dict,
    load_adapters,
    read_adapter_metadata,
    read_crma_settings,
    save_adapters,
)

TOL = 1e-5
LORA = LoRAConfig(r=2, target_modules=["q_proj", "v_proj"])


def _sigma(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(x.detach().double(), ord=2)


def _randomize(adapter: CRMAAdapter, gen: torch.Generator, std: float = 1.0, gate: float = 3.0) -> None:
    n = adapter.config.n_streams
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
        adapter.mix_logits.copy_(torch.randn(n, n, generator=gen) * 3)
        adapter.gate_logit.fill_(gate)


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"norm": "l2"}, r"norm='l2' is invalid: expected one of \['spectral', 'frobenius'\]"),
        ({"form": "mixing"}, r"form='mixing' is invalid: expected one of \['write', 'mix'\]"),
        ({"init": "svd"}, r"init='svd' is invalid: expected one of \['random', 'pissa'\]"),
        ({"form": "mix", "g_max": 1.5}, r"g_max=1\.5 is invalid for form='mix': expected 0 < g_max <= 1"),
        ({"gate_init": float("nan")}, r"gate_init=nan is invalid"),
        ({"mix_init_diag": "4"}, r"mix_init_diag='4' is invalid"),
        ({"newton_steps": -1}, r"newton_steps=-1 is invalid: expected an integer >= 0"),
        (
            {"sinkhorn_backward": "exact"},
            r"sinkhorn_backward='exact' is invalid: expected one of \['implicit', 'unrolled'\]",
        ),
    ],
)
def test_config_validation_v2(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CRMAAdapter(32, CRMAConfig(**kwargs))


def test_config_defaults_and_saved_settings():
    config = CRMAConfig()
    assert (config.norm, config.form, config.init, config.g_max) == ("spectral", "write", "random", 0.1)
    CRMAAdapter(32, CRMAConfig(form="mix", g_max=1.0))  # g_max = 1 is allowed for the mix form
    # v1 hyper-parameters (no norm/form) mean what v1 computed, not today's defaults
    v1 = {k: v for k, v in dataclasses.asdict(CRMAConfig()).items() if k not in ("norm", "form", "init")}
    assert CRMAConfig.from_saved(v1) == CRMAConfig(norm="frobenius", form="write")
    assert CRMAConfig.from_saved({**v1, "norm": "spectral", "version": 2}) == CRMAConfig()


# ----------------------------------------------------------------------------- spectral normalisation
def _adversarial_matrices(gen: torch.Generator) -> dict[str, torch.Tensor]:
    u, v = torch.randn(16, 1, generator=gen), torch.randn(1, 64, generator=gen)
    return {
        "random": torch.randn(16, 64, generator=gen),
        "huge": torch.randn(16, 64, generator=gen) * 1e6,
        "tiny": torch.randn(16, 64, generator=gen) * 1e-20,
        "rank1_large": u @ v * 100,
        "rank1_small": u @ v * 1e-3,
        "one_entry": torch.zeros(16, 64).index_put_((torch.tensor([2]), torch.tensor([5])), torch.tensor(1e8)),
        "repeated_top": torch.cat([torch.eye(16) * 7, torch.zeros(16, 48)], dim=1),
        "zeros": torch.zeros(16, 64),
    }


@pytest.mark.parametrize("case", list(_adversarial_matrices(torch.Generator().manual_seed(0))))
@pytest.mark.parametrize("transpose", [False, True], ids=["wide", "tall"])
def test_spectral_normalize_bound_and_exactness(case, transpose):
    x = _adversarial_matrices(torch.Generator().manual_seed(0))[case]
    x = x.mT if transpose else x
    y = spectral_normalize(x)
    s_in, s_out = _sigma(x).item(), _sigma(y).item()
    assert s_out <= 1 + TOL
    if s_in >= 1:
        assert s_out == pytest.approx(1.0, abs=1e-5)  # large raw weights: σ_max(R) reaches 1
    else:
        torch.testing.assert_close(y, x.float(), rtol=0, atol=0)  # inside the unit ball: untouched
    assert sigma_max(x).item() == pytest.approx(s_in, rel=1e-5, abs=1e-30)


def test_spectral_bound_under_gradient_ascent():
    """Pushing σ_max(R~) and σ_max(W~) up as hard as possible never pushes the normalised factors past 1."""
    gen = torch.Generator().manual_seed(1)
    adapter = CRMAAdapter(32, CRMAConfig())
    _randomize(adapter, gen, std=0.01)
    opt = torch.optim.Adam([adapter.read_weight, adapter.write_weight], lr=1.0)
    for _ in range(30):
        r, w = adapter.factors()
        assert _sigma(r) <= 1 + TOL and _sigma(w) <= 1 + TOL
        # ascend on a rank-one alignment: the fastest way to grow σ_max
        loss = -(r[0] @ r[1:].sum(0)) - (w[:, 0] @ w[:, 1:].sum(1)) - r.norm() - w.norm()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert _sigma(adapter.read_weight) > 10 and _sigma(adapter.write_weight) > 10
    r, w = adapter.factors()
    assert _sigma(r).item() == pytest.approx(1.0, abs=1e-5) and _sigma(w).item() == pytest.approx(1.0, abs=1e-5)


def test_spectral_gradient_matches_exact_svd_gradient():
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(8, 40, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    probe = torch.randn(8, 40, generator=gen, dtype=torch.float64)
    (spectral_normalize(x) * probe).sum().backward()
    ours = x.grad.clone()
    x.grad = None
    reference = x / torch.linalg.matrix_norm(x, ord=2).clamp_min(1.0)
    (reference * probe).sum().backward()
    torch.testing.assert_close(ours, x.grad, rtol=1e-4, atol=1e-5)


def test_spectral_vs_frobenius_capacity():
    """Frobenius (v1) keeps σ_max well below 1 for random weights; spectral uses the full unit ball."""
    gen = torch.Generator().manual_seed(3)
    spectral = CRMAAdapter(256, CRMAConfig(norm="spectral"))
    frob = CRMAAdapter(256, CRMAConfig(norm="frobenius"))
    for adapter in (spectral, frob):
        _randomize(adapter, gen, std=1.0)
    assert _sigma(spectral.read()) == pytest.approx(1.0, abs=1e-5)
    assert _sigma(frob.read()) < 0.5  # the unit Frobenius norm is spread over n·k = 16 singular values


def test_non_finite_parameters_never_raise():
    for form in ("write", "mix"):
        adapter = CRMAAdapter(32, CRMAConfig(form=form, g_max=0.5))
        with torch.no_grad():
            adapter.read_weight[0, 0] = float("nan")
            if form == "write":
                adapter.write_weight[1, 1] = float("inf")
            adapter.mix_logits[0, 1] = float("nan")
        h = torch.randn(3, 32)
        out = adapter(h)  # must not raise (eigh/QR/solve on NaN)
        assert not torch.isfinite(out).all()  # ... and the NaN reaches the output
        health = adapter.health()
        assert math.isnan(health["spectral_norm"].item()) and math.isnan(health["row_sum_error"].item())
        out.sum().backward()  # the backward does not raise either
    assert math.isnan(sigma_max(torch.tensor([[1.0, float("nan")], [0.0, 1.0]])).item())


# ----------------------------------------------------------------------------- mix form
def _mix_adapter(d: int, n: int, k: int, g_max: float, gen: torch.Generator) -> CRMAAdapter:
    adapter = CRMAAdapter(d, CRMAConfig(n_streams=n, stream_rank=k, g_max=g_max, form="mix"))
    _randomize(adapter, gen, std=1.0, gate=float(torch.randn((), generator=gen) * 4))
    return adapter


def test_mix_form_parameters_and_orthonormal_rows():
    adapter = CRMAAdapter(32, CRMAConfig(form="mix"))
    assert {n for n, _ in adapter.named_parameters()} == {"read_weight", "mix_logits", "gate_logit"}
    r = adapter.read()
    torch.testing.assert_close(r @ r.mT, torch.eye(16), atol=1e-5, rtol=0)
    q = orthonormal_rows(r)  # already orthonormal: unchanged (sign-fixed QR)
    torch.testing.assert_close(q, r, atol=1e-5, rtol=0)


@pytest.mark.parametrize("g_max", [0.1, 0.5, 1.0])
def test_mix_form_is_non_expansive(g_max):
    gen = torch.Generator().manual_seed(int(g_max * 10))
    for n, k in [(4, 4), (4, 8), (2, 3), (8, 2)]:
        adapter = _mix_adapter(32, n, k, g_max, gen)
        scales = 10 ** (torch.rand(64, 1, generator=gen) * 6 - 3)
        h = torch.randn(64, 32, generator=gen) * scales
        out = adapter(h)
        assert (out.norm(dim=-1) <= h.norm(dim=-1) * (1 + TOL)).all()
        assert ((out - h).norm(dim=-1) > 1e-4 * h.norm(dim=-1)).any()  # it does move h


def _jacobian_spectral_norm(f, h: torch.Tensor, iters: int = 60) -> float:
    """Power iteration on JᵀJ with autograd JVP/VJP (torch.func): the Jacobian is never formed."""
    v = torch.randn_like(h)
    v = v / v.norm()
    sigma = 0.0
    for _ in range(iters):
        _, jv = torch.func.jvp(f, (h,), (v,))
        _, vjp = torch.func.vjp(f, h)
        (jtjv,) = vjp(jv)
        sigma = jv.norm().item()
        v = jtjv / jtjv.norm()
    return sigma


@pytest.mark.parametrize("seed", range(4))
def test_mix_form_jacobian_spectral_norm_at_most_one(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    adapter = _mix_adapter(24, 4, 4, 1.0, gen)
    with torch.no_grad():
        adapter.gate_logit.fill_(10.0)  # g ≈ 1: the most the mix form can move
    h = torch.randn(24, generator=gen)
    sigma = _jacobian_spectral_norm(adapter, h)
    assert sigma <= 1 + TOL
    # the write form with g_max > 1 is not non-expansive: the check can fail, so it is not vacuous
    write = CRMAAdapter(24, CRMAConfig(g_max=4.0))
    _randomize(write, gen, std=3.0, gate=10.0)
    assert _jacobian_spectral_norm(write, h) > 1.5


def test_mix_form_matches_definition():
    d, n, k = 24, 3, 4
    gen = torch.Generator().manual_seed(5)
    adapter = _mix_adapter(d, n, k, 0.8, gen)
    h = torch.randn(2, 5, d, generator=gen)
    with torch.no_grad():
        q, r = torch.linalg.qr(adapter.read_weight.T)
        read = (q * torch.sign(torch.diagonal(r))).T  # R = Qᵀ, signs fixed
        m = adapter.mixing()
        g = 0.8 * torch.sigmoid(adapter.gate_logit)
        expected = torch.empty_like(h)
        for b in range(2):
            for t in range(5):
                s = (read @ h[b, t]).reshape(n, k)
                expected[b, t] = h[b, t] + g * (read.T @ ((m - torch.eye(n)) @ s).reshape(n * k))
    torch.testing.assert_close(adapter(h), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("diag,gate_init,g_max", [(4.0, 0.0, 0.1), (2.0, 1.0, 1.0), (6.0, -2.0, 0.5)])
def test_near_identity_at_init(diag, gate_init, g_max):
    d, n = 64, 4
    h = torch.randn(32, d) * 3
    write = CRMAAdapter(d, CRMAConfig(g_max=g_max, mix_init_diag=diag, gate_init=gate_init))
    assert torch.equal(write(h), h)  # write form: W~ = 0, exactly the identity
    mix = CRMAAdapter(d, CRMAConfig(form="mix", g_max=g_max, mix_init_diag=diag, gate_init=gate_init))
    # mix form: ||h' - h|| <= g_max sigmoid(γ0) n / (exp(λ0) + n - 1) ||h|| (module docstring)
    bound = g_max / (1 + math.exp(-gate_init)) * n / (math.exp(diag) + n - 1)
    ratio = (mix(h) - h).norm(dim=-1) / h.norm(dim=-1)
    assert (ratio <= bound * (1 + 1e-4)).all()
    assert ratio.max() > 0.05 * bound  # and it is not exactly the identity: every parameter gets a gradient
    mix(h).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mix.parameters())


# ----------------------------------------------------------------------------- Sinkhorn
@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_implicit_gradient_matches_unrolled_at_convergence(scale):
    gen = torch.Generator().manual_seed(int(scale * 10))
    logits = (torch.randn(16, 4, 4, generator=gen, dtype=torch.float64) * scale).requires_grad_(True)
    probe = torch.randn(16, 4, 4, generator=gen)
    (sinkhorn(logits, n_iters=300, exact=False) * probe).sum().backward()
    implicit = logits.grad.clone()
    logits.grad = None
    (sinkhorn(logits, n_iters=300, exact=False, implicit=False) * probe).sum().backward()
    torch.testing.assert_close(implicit, logits.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", ["near_init", "randn", "randn_x3"])
def test_crma_sinkhorn_scheme_converges_and_has_the_limit_gradient(case):
    """CRMA's default (5 iterations + 3 Newton steps, implicit backward) vs the Sinkhorn limit (3000 iterations).

    Near the init (Λ ≈ 4 I) 20 plain iterations leave marginal errors ~1e-2 and a gradient 5 % off the limit's;
    the Newton steps bring both to float precision.
    """
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(64, 4, 4, generator=gen, dtype=torch.float64)
    logits = {"near_init": torch.eye(4) * 4 + 0.5 * noise, "randn": noise, "randn_x3": 3 * noise}[case]
    config = CRMAConfig()
    probe = torch.randn(64, 4, 4, generator=gen, dtype=torch.float64)
    ours = logits.clone().requires_grad_(True)
    m = sinkhorn(ours, config.sinkhorn_iters, exact=False, newton_steps=config.newton_steps)
    error = torch.maximum((m.sum(-1) - 1).abs().amax(-1), (m.sum(-2) - 1).abs().amax(-1))
    assert error.median() < 1e-6
    (m * probe).sum().backward()
    limit = logits.clone().requires_grad_(True)
    (sinkhorn(limit, 3000, exact=False, implicit=False) * probe).sum().backward()
    gap = (ours.grad - limit.grad).flatten(1).norm(dim=1) / limit.grad.flatten(1).norm(dim=1)
    assert gap.median() < 1e-4


def test_unrolled_backward_option_matches_implicit():
    config = CRMAConfig(sinkhorn_backward="unrolled")
    adapter = CRMAAdapter(32, config)
    implicit = CRMAAdapter(32, CRMAConfig())
    with torch.no_grad():
        adapter.mix_logits.add_(torch.randn(4, 4) * 0.5)
        implicit.mix_logits.copy_(adapter.mix_logits)
    probe = torch.randn(4, 4)
    (adapter.mixing() * probe).sum().backward()
    (implicit.mixing() * probe).sum().backward()
    torch.testing.assert_close(adapter.mix_logits.grad, implicit.mix_logits.grad, atol=1e-4, rtol=1e-3)


def test_implicit_forward_equals_unrolled_forward():
    logits = torch.randn(8, 4, 4) * 3
    for exact in (True, False):
        torch.testing.assert_close(
            sinkhorn(logits.clone().requires_grad_(True), exact=exact),
            sinkhorn(logits, exact=exact, implicit=False),
            atol=1e-6,
            rtol=0,
        )


def test_sinkhorn_gradient_at_saturation_and_nan():
    n = 4
    for logits in (torch.eye(n) * 100 - 50, torch.triu(torch.full((n, n), 100.0)) - 50):
        logits.requires_grad_(True)
        (sinkhorn(logits) * torch.randn(n, n)).sum().backward()
        assert torch.isfinite(logits.grad).all()
    bad = torch.randn(n, n)
    bad[1, 2] = float("nan")
    bad.requires_grad_(True)
    (sinkhorn(bad) * torch.randn(n, n)).sum().backward()  # no exception; NaN propagates
    assert torch.isnan(bad.grad).any()


def test_health_from_proxy_with_three_attributes():
    """The FSDP health proxies reuse CRMAAdapter.mixing/gate/health as unbound methods."""

    class Proxy(SimpleNamespace):
        mixing = CRMAAdapter.mixing
        gate = CRMAAdapter.gate
        health = CRMAAdapter.health

    adapter = CRMAAdapter(32, CRMAConfig(form="mix", g_max=0.5))
    proxy = Proxy(config=adapter.config, mix_logits=adapter.mix_logits.detach(), gate_logit=adapter.gate_logit)
    ours, theirs = adapter.health(), proxy.health()
    assert set(theirs) == {"spectral_norm", "gate", "row_sum_error", "col_sum_error", "sinkhorn_residual"}
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key])
    assert theirs["spectral_norm"].item() == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------- PiSSA init
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("form", ["write", "mix"])
def test_pissa_init_reads_top_output_directions(factory, form):
    model = factory()
    hidden = model.config.hidden_size
    lora = LoRAConfig(r=2, target_modules="all-linear")  # LoRA-wrapped output projections count with their base
    attach_adapters(model, "crma", lora, CRMAConfig(n_streams=2, stream_rank=2, init="pissa", form=form))
    for _, adapter in crma_adapters(model):
        block = next(m for m in model.modules() if getattr(m, "crma", None) is adapter).base_layer
        weight = output_projection_weight(block, hidden)
        u = torch.linalg.svd(weight.float(), full_matrices=False)[0][:, :4]  # (d, n·k)
        r = adapter.read()
        torch.testing.assert_close(r @ r.mT, torch.eye(4), atol=1e-4, rtol=0)
        # the read rows span the top left singular subspace of the output projection
        overlap = torch.linalg.matrix_norm(r @ u, ord="fro").item() ** 2
        assert overlap == pytest.approx(4.0, abs=1e-3)


# ----------------------------------------------------------------------------- adapter files
def _trained(form: str, norm: str = "spectral", g_max: float = 0.3):
    model = tiny_llama()
    attach_adapters(model, "crma", LORA, CRMAConfig(form=form, norm=norm, g_max=g_max))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("form,norm", [("write", "spectral"), ("write", "frobenius"), ("mix", "spectral")])
def test_adapter_file_carries_and_checks_crma_settings(tmp_path, form, norm):
    src = _trained(form, norm)
    ids = torch.randint(0, 128, (2, 8))
    expected = src(ids).logits
    path = save_adapters(src, tmp_path / "a.safetensors", metadata={"stage": 1})
    assert read_adapter_metadata(path) == {"stage": 1}  # the user metadata is untouched
    settings = read_crma_settings(path)
    assert settings["version"] == 2 and settings["form"] == form and settings["norm"] == norm
    assert settings["g_max"] == 0.3

    dst = tiny_llama()
    attach_adapters(dst, "crma", LORA, CRMAConfig(form=form, norm=norm, g_max=0.3))
    load_adapters(dst, path)
    torch.testing.assert_close(dst(ids).logits, expected)

    other_norm = "frobenius" if norm == "spectral" else "spectral"
    wrong = tiny_llama()
    attach_adapters(wrong, "crma", LORA, CRMAConfig(form="write", norm=other_norm, g_max=0.3))
    before = {k: v.clone() for k, v in adapter_state_dict(wrong).items()}
    with pytest.raises(ValueError, match=r"CRMA settings of .*a\.safetensors differ from the model's: .*norm|form"):
        load_adapters(wrong, path)  # form and/or norm differ (the mix file also lacks write_weight)
    assert all(torch.equal(before[k], v) for k, v in adapter_state_dict(wrong).items())  # nothing copied


def test_g_max_mismatch_is_rejected(tmp_path):
    path = save_adapters(_trained("write", g_max=0.3), tmp_path / "a.safetensors")
    dst = tiny_llama()
    attach_adapters(dst, "crma", LORA, CRMAConfig(g_max=0.5))
    with pytest.raises(ValueError, match=r"g_max: file 0\.3 vs model 0\.5"):
        load_adapters(dst, path)


@pytest.mark.parametrize("with_hparams", [True, False], ids=["v1_run_metadata", "v1_no_metadata"])
def test_v1_files_still_load(tmp_path, with_hparams):
    """A v1 file: tensors + user metadata whose "crma" has no norm/form (or no metadata at all)."""
    src = _trained("write", "frobenius", g_max=0.1)
    v1_fields = {k: v for k, v in dataclasses.asdict(CRMAConfig(g_max=0.1)).items() if k not in ("norm", "form")}
    v1_hparams = {k: v for k, v in v1_fields.items() if k != "init"}
    user = {"stage": 1, "adapter": "crma", "crma": v1_hparams} if with_hparams else {}
    tensors = {k: v.contiguous() for k, v in adapter_state_dict(src).items()}
    path = tmp_path / "v1.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", METADATA_KEY: json.dumps(user)})
    settings = read_crma_settings(path)
    assert CRMA_METADATA_KEY not in settings and {k: settings[k] for k in V1_SETTINGS} == V1_SETTINGS

    ids = torch.randint(0, 128, (2, 8))
    dst = tiny_llama()
    attach_adapters(dst, "crma", LORA, CRMAConfig.from_saved(v1_hparams))  # norm frobenius, form write
    load_adapters(dst, path)
    torch.testing.assert_close(dst(ids).logits, src(ids).logits)

    v2 = tiny_llama()
    attach_adapters(v2, "crma", LORA, CRMAConfig(g_max=0.1))  # spectral: a different function of the tensors
    with pytest.raises(ValueError, match=r"norm: file 'frobenius' vs model 'spectral'.*read as v1"):
        load_adapters(v2, path)
