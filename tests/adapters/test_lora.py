"""LoRA (DESIGN §3.1): the LoRALinear wrapper, scaling, merge/unmerge and the named adapter bank."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

from crma_lightning.adapters import (
    LoRAConfig,
    LoRALinear,
    adapter_parameter_names,
    add_lora_adapter,
    attach_adapters,
    delete_lora_adapter,
    lora_adapter_names,
    lora_layers,
    merge_lora,
    set_active_adapter,
    set_adapter_trainable,
    unmerge_lora,
)


def _randomize_b(module: nn.Module, std: float = 0.5, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(module) if not isinstance(module, LoRALinear) else [("", module)]:
            for b in layer.lora_B.values():
                b.weight.copy_(torch.randn(b.weight.shape, generator=gen) * std)


def _conv1d(n_in: int, n_out: int) -> Conv1D:
    conv = Conv1D(n_out, n_in)  # Conv1D(nf=out, nx=in); weight is (in, out)
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    return conv


def _train(model: nn.Module, steps: int = 3, lr: float = 1e-2, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 16), generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(123))


# ----------------------------------------------------------------------------- config
def test_scaling_plain_and_rslora():
    assert LoRAConfig(r=8, alpha=16).scaling == 2.0
    assert LoRAConfig(r=16, alpha=8, use_rslora=True).scaling == 2.0  # alpha / sqrt(r)
    assert LoRAConfig(r=4, alpha=3, use_rslora=True).scaling == pytest.approx(3 / math.sqrt(4))


def test_rslora_scaling_used_in_forward():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base)
    layer.add_adapter("rs", LoRAConfig(r=9, alpha=6, use_rslora=True))
    layer.set_adapter("rs")
    _randomize_b(layer)
    assert layer.scaling["rs"] == pytest.approx(2.0)
    x = torch.randn(4, 6)
    a, b = layer.lora_A["rs"].weight, layer.lora_B["rs"].weight
    torch.testing.assert_close(layer(x), base(x) + 2.0 * x @ a.T @ b.T)


# ----------------------------------------------------------------------------- LoRALinear
def test_lora_linear_init_is_exact_identity_and_shapes():
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    layer = LoRALinear(base)
    layer.add_adapter("default", LoRAConfig(r=3))
    layer.set_adapter("default")
    assert layer.base_layer is base
    assert (layer.in_features, layer.out_features, layer.fan_in_fan_out) == (7, 5, False)
    assert layer.lora_A["default"].weight.shape == (3, 7)
    assert layer.lora_B["default"].weight.shape == (5, 3)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert torch.count_nonzero(layer.lora_A["default"].weight) > 0
    x = torch.randn(2, 4, 7)
    assert torch.equal(layer(x), base(x))


def test_lora_linear_forward_formula_linear_and_conv1d():
    torch.manual_seed(0)
    for base in (nn.Linear(6, 4), _conv1d(6, 4)):
        layer = LoRALinear(base)
        layer.add_adapter("x", LoRAConfig(r=2, alpha=5))
        layer.set_adapter("x")
        _randomize_b(layer)
        assert (layer.in_features, layer.out_features) == (6, 4)
        assert layer.fan_in_fan_out == isinstance(base, Conv1D)
        x = torch.randn(3, 6)
        w = base.weight.T if isinstance(base, Conv1D) else base.weight  # (out, in)
        a, b = layer.lora_A["x"].weight, layer.lora_B["x"].weight
        expected = x @ w.T + base.bias + 2.5 * (x @ a.T @ b.T)
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        layer.set_adapter(None)  # no active adapter: plain base layer
        assert torch.equal(layer(x), base(x))


def test_lora_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="Embedding"):
        LoRALinear(nn.Embedding(4, 4))


def test_lora_dropout_only_on_adapter_path():
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = LoRALinear(base)
    layer.add_adapter("d", LoRAConfig(r=4, dropout=0.5))
    layer.set_adapter("d")
    x = torch.randn(16, 8)
    assert torch.equal(layer.train()(x), base(x))  # B = 0: dropout cannot leak into the output
    _randomize_b(layer)
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # stochastic in training
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_lora_adapters_stay_float32_with_bf16_base():
    base = nn.Linear(8, 8).to(torch.bfloat16)
    layer = LoRALinear(base)
    layer.add_adapter("default", LoRAConfig(r=2))
    layer.set_adapter("default")
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, base(x))


def test_lora_linear_bank_errors():
    layer = LoRALinear(nn.Linear(4, 4))
    layer.add_adapter("a", LoRAConfig(r=2))
    with pytest.raises(ValueError, match=r"'a' already exists"):
        layer.add_adapter("a", LoRAConfig(r=2))
    with pytest.raises(ValueError, match=r"unknown LoRA adapter 'zz'.*\['a'\]"):
        layer.set_adapter("zz")
    with pytest.raises(ValueError, match=r"'a\.b' is invalid"):
        layer.add_adapter("a.b", LoRAConfig(r=2))
    with pytest.raises(ValueError, match=r"rank r=0"):
        layer.add_adapter("b", LoRAConfig(r=0))
    assert list(layer.lora_A) == ["a"]


# ----------------------------------------------------------------------------- merge
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_weight_and_unmerge(kind):
    torch.manual_seed(0)
    base = nn.Linear(6, 5) if kind == "linear" else _conv1d(6, 5)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base)
    layer.add_adapter("a", LoRAConfig(r=3, alpha=6))
    layer.add_adapter("b", LoRAConfig(r=3, alpha=6))
    layer.set_adapter("a")
    _randomize_b(layer)
    x = torch.randn(4, 6)
    unmerged = layer(x)
    a, b = layer.lora_A["a"].weight.detach(), layer.lora_B["a"].weight.detach()
    delta = 2.0 * b @ a  # (out, in)
    assert delta.abs().max() > 1e-2
    layer.merge()
    expected = w0 + (delta if kind == "linear" else delta.T)  # Conv1D stores (in, out)
    torch.testing.assert_close(base.weight, expected, atol=1e-6, rtol=0)
    assert layer.merged_adapter == "a"
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match=r"'a' is merged.*unmerge"):
        layer.set_adapter("b")
    with pytest.raises(RuntimeError, match=r"'a' is merged"):
        layer.delete_adapter("a")
    with pytest.raises(RuntimeError, match=r"already merged"):
        layer.merge("b")
    layer.unmerge()
    assert layer.merged_adapter is None
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-6, rtol=0)
    layer.set_adapter("b")  # allowed again after unmerge
    layer.unmerge()  # unmerging when nothing is merged is a no-op
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)


def test_merge_without_adapter_raises():
    layer = LoRALinear(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="adapter name or an active adapter"):
        layer.merge()


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_merge_model_logits(factory):
    model = factory()
    attach_adapters(model, "lora", LoRAConfig(r=4, alpha=8))
    _randomize_b(model, std=0.3)
    before = {n: m.base_layer.weight.detach().clone() for n, m in lora_layers(model)}
    with torch.no_grad():
        unmerged = model(IDS).logits
        base_logits = factory()(IDS).logits
        assert (unmerged - base_logits).abs().max() > 1e-3  # the adapter does something
        merge_lora(model)
        for name, layer in lora_layers(model):
            expected = before[name] + layer.delta_weight("default")
            torch.testing.assert_close(layer.base_layer.weight, expected, atol=1e-6, rtol=0)
        merged = model(IDS).logits
        torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="unknown LoRA adapter 'other'"):
            set_active_adapter(model, "other")
        add_lora_adapter(model, "other", LoRAConfig(r=2))
        with pytest.raises(RuntimeError, match="merged"):
            set_active_adapter(model, "other")
        unmerge_lora(model)
        for name, layer in lora_layers(model):
            torch.testing.assert_close(layer.base_layer.weight, before[name], atol=1e-6, rtol=0)
        torch.testing.assert_close(model(IDS).logits, unmerged, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- the bank on a model
def test_adapter_bank_train_switch_reproduce_delete():
    model = tiny_llama()
    base_logits = model(IDS).logits.detach()
    attach_adapters(model, "lora", LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="a")
    _train(model, steps=3, seed=1)
    with torch.no_grad():
        logits_a = model(IDS).logits
    assert not torch.allclose(logits_a, base_logits, atol=1e-4)
    a_state = {n: p.detach().clone() for n, p in model.named_parameters() if ".a." in n}

    add_lora_adapter(model, "b", LoRAConfig(r=2, alpha=4))
    set_adapter_trainable(model, "a", False)
    set_active_adapter(model, "b")
    assert lora_adapter_names(model) == ["a", "b"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in adapter_parameter_names(model) if ".b." in n}
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    with torch.no_grad():  # a fresh adapter "b" has B = 0: base logits exactly
        assert torch.equal(model(IDS).logits, base_logits)
    _train(model, steps=3, seed=2)
    with torch.no_grad():
        logits_b = model(IDS).logits
    assert not torch.allclose(logits_b, logits_a, atol=1e-4)
    for n, p in model.named_parameters():
        if n in a_state:
            assert torch.equal(p, a_state[n]), n

    set_active_adapter(model, "a")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, logits_a)
        set_active_adapter(model, None)
        assert torch.equal(model(IDS).logits, base_logits)
        set_active_adapter(model, "b")
        assert torch.equal(model(IDS).logits, logits_b)

    delete_lora_adapter(model, "b")
    assert lora_adapter_names(model) == ["a"]
    assert not any(".b." in n for n, _ in model.named_parameters())
    assert all(layer.active_adapter is None for _, layer in lora_layers(model))  # deleting the active one
    set_active_adapter(model, "a")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, logits_a)
    with pytest.raises(ValueError, match=r"unknown LoRA adapter 'b'.*\['a'\]"):
        delete_lora_adapter(model, "b")
    with pytest.raises(ValueError, match=r"unknown LoRA adapter 'b'"):
        set_adapter_trainable(model, "b", True)
    with pytest.raises(ValueError, match=r"'a' already exists"):
        add_lora_adapter(model, "a", LoRAConfig(r=2))
    with pytest.raises(ValueError, match=r"'x y' is invalid"):
        add_lora_adapter(model, "x y", LoRAConfig(r=2))
    assert lora_adapter_names(model) == ["a"]


def test_add_lora_adapter_frozen_and_without_lora_layers():
    model = tiny_llama()
    with pytest.raises(ValueError, match="no LoRA layers"):
        add_lora_adapter(model, "a", LoRAConfig(r=2))
    attach_adapters(model, "lora", LoRAConfig(r=2, target_modules=["q_proj"]))
    add_lora_adapter(model, "frozen", LoRAConfig(r=2), trainable=False)
    for n, p in model.named_parameters():
        if ".frozen." in n:
            assert not p.requires_grad
    set_adapter_trainable(model, "frozen", True)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".frozen." in n)
