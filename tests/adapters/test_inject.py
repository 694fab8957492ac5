"""Attaching adapters to transformers models: identity at init, frozen base, discovery, input validation."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_gpt2, tiny_llama, tiny_neox
from torch import nn

from crma_lightning.adapters import (
    CRMAAdapter,
    CRMABlock,
    CRMAConfig,
    LoRAConfig,
    LoRALinear,
    adapter_parameter_names,
    attach_adapters,
    crma_adapters,
    detach_adapters,
    find_decoder_layers,
    hidden_size_of,
    linear_module_names,
    lora_layers,
    resolve_lora_targets,
    set_crma_enabled,
    set_crma_trainable,
)

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
LAYERS_PATH = {"llama": "model.layers", "gpt2": "transformer.h", "neox": "gpt_neox.layers"}
FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "neox": tiny_neox}


def _arch(factory) -> str:
    return {f: k for k, f in FACTORIES.items()}[factory]


def _snapshot(model: nn.Module):
    return (
        [(n, type(m)) for n, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def _assert_same(model: nn.Module, snapshot) -> None:
    modules, state, grads = snapshot
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def _crma_config() -> CRMAConfig:
    return CRMAConfig(n_streams=4, stream_rank=4, g_max=0.1)


# ----------------------------------------------------------------------------- identity at init
@pytest.mark.parametrize("adapter", ["lora", "crma"])
def test_logits_equal_base_at_init(model_factory, adapter):
    base, model = model_factory(), model_factory()
    with torch.no_grad():
        expected = base(IDS).logits
    attached = attach_adapters(model, adapter, LoRAConfig(r=4, target_modules="all-linear"), _crma_config())
    assert attached.adapter == adapter and len(attached.lora_modules) > 0
    assert len(list(lora_layers(model))) == len(attached.lora_modules)
    if adapter == "crma":
        assert attached.layers_path == LAYERS_PATH[_arch(model_factory)]
        assert attached.crma_blocks == [f"{attached.layers_path}.{i}" for i in range(2)]
        assert len(list(crma_adapters(model))) == 2
    else:
        assert attached.crma_blocks == [] and not list(crma_adapters(model))
    with torch.no_grad():
        got = model(IDS).logits
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert torch.equal(got, expected)  # B = 0 and W~ = 0 make it exact


# ----------------------------------------------------------------------------- training touches only adapters
@pytest.mark.parametrize("adapter", ["lora", "crma"])
def test_training_changes_only_adapter_parameters(model_factory, adapter):
    model = model_factory()
    attach_adapters(model, adapter, LoRAConfig(r=4, target_modules="all-linear"), _crma_config())
    names = adapter_parameter_names(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(trainable) == set(names) and len(trainable) == len(names)
    assert all(".lora_" in n or ".crma." in n for n in names)
    if adapter == "crma":
        assert sum(".crma." in n for n in names) == 2 * 4  # 2 blocks x (read, write, mix, gate)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 16), generator=gen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(4):
        loss = model(ids, labels=ids).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]

    names_set = set(names)
    for n, p in model.named_parameters():
        if n in names_set:
            assert not torch.equal(p, before[n]), f"adapter parameter {n} did not train"
        else:
            assert torch.equal(p, before[n]), f"base parameter {n} changed"
            assert p.grad is None


def test_set_crma_trainable_and_enabled():
    model, lora_only = tiny_llama(), tiny_llama()
    lora_cfg = LoRAConfig(r=4, target_modules=["q_proj", "v_proj"])
    attach_adapters(model, "crma", lora_cfg, _crma_config())
    attach_adapters(lora_only, "lora", LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    # Give every adapter non-zero weights; copy the LoRA part into the LoRA-only model.
    torch.manual_seed(5)
    with torch.no_grad():
        for _, adapter in crma_adapters(model):
            adapter.write_weight.normal_()
        for (_, layer), (_, other) in zip(lora_layers(model), lora_layers(lora_only)):
            layer.lora_B["default"].weight.normal_(std=0.2)
            other.lora_A["default"].weight.copy_(layer.lora_A["default"].weight)
            other.lora_B["default"].weight.copy_(layer.lora_B["default"].weight)
        with_crma = model(IDS).logits
        set_crma_enabled(model, False)
        assert torch.equal(model(IDS).logits, lora_only(IDS).logits)
        set_crma_enabled(model, True)
        assert torch.equal(model(IDS).logits, with_crma)
        assert not torch.allclose(with_crma, lora_only(IDS).logits, atol=1e-5)

    set_crma_trainable(model, False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    set_crma_trainable(model, True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(adapter_parameter_names(model))


def test_detach_restores_original_model():
    model = tiny_llama()
    with torch.no_grad():
        expected = model(IDS).logits
    modules = [(n, type(m)) for n, m in model.named_modules()]
    attach_adapters(model, "crma", LoRAConfig(r=4), _crma_config())
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_()
        model(IDS)
    detach_adapters(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    assert not any(isinstance(m, (LoRALinear, CRMABlock, CRMAAdapter)) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, expected)


def test_detach_unmerges_merged_lora():
    model = tiny_gpt2()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    attach_adapters(model, "lora", LoRAConfig(r=2))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.normal_()
            layer.merge()
    detach_adapters(model)
    state = model.state_dict()
    assert list(state) == list(weights)
    for k in weights:
        torch.testing.assert_close(state[k], weights[k], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- discovery
@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_find_decoder_layers(arch):
    model = FACTORIES[arch]()
    path, layers = find_decoder_layers(model)
    assert path == LAYERS_PATH[arch]
    assert layers is model.get_submodule(path) and len(layers) == 2
    attach_adapters(model, "crma", LoRAConfig(r=2), _crma_config())
    path2, layers2 = find_decoder_layers(model)  # still found once the blocks are wrapped
    assert path2 == path and all(isinstance(b, CRMABlock) for b in layers2)
    assert hidden_size_of(model) == 32


def test_find_decoder_layers_prefers_largest_identical_list_without_no_split():
    class Toy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.small = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
            self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])
            self.mixed = nn.ModuleList([nn.Linear(64, 64), nn.ReLU()])

    assert find_decoder_layers(Toy())[0] == "blocks"
    with pytest.raises(ValueError, match="could not find the decoder layers of Sequential"):
        find_decoder_layers(nn.Sequential(nn.Linear(2, 2)))


def test_linear_module_names():
    llama = tiny_llama()
    names = linear_module_names(llama)
    per_layer = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert len(names) == 2 * len(per_layer)
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.1.mlp.down_proj" in names
    assert "lm_head" not in names
    assert {n.rsplit(".", 1)[-1] for n in names} == set(per_layer)

    gpt2 = tiny_gpt2()
    names = linear_module_names(gpt2)  # Conv1D layers count; the tied lm_head does not
    assert "transformer.h.0.attn.c_attn" in names and "lm_head" not in names
    assert {n.rsplit(".", 1)[-1] for n in names} == {"c_attn", "c_proj", "c_fc"}

    neox = tiny_neox()
    names = linear_module_names(neox)
    assert "gpt_neox.layers.0.attention.query_key_value" in names
    assert "embed_out" not in names  # NeoX's LM head

    attach_adapters(llama, "lora", LoRAConfig(r=2, target_modules=["q_proj"]))
    after = linear_module_names(llama)
    assert after == linear_module_names(tiny_llama())  # wrappers listed by their own name, not their internals
    assert not any("base_layer" in n or "lora_" in n for n in after)


def test_target_selection_suffix_list_and_regex():
    model = tiny_llama()
    qv = resolve_lora_targets(model, ["q_proj", "v_proj"])
    assert qv == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    layer0 = resolve_lora_targets(model, r".*\.0\..*q_proj")
    assert layer0 == ["model.layers.0.self_attn.q_proj"]
    attached = attach_adapters(model, "lora", LoRAConfig(r=2, target_modules=r".*\.0\..*q_proj"))
    assert attached.lora_modules == layer0
    assert [n for n, _ in lora_layers(model)] == layer0
    assert isinstance(model.model.layers[0].self_attn.q_proj, LoRALinear)
    assert isinstance(model.model.layers[1].self_attn.q_proj, nn.Linear)
    # Suffix matching is on whole name components: "proj" is not a suffix of "q_proj" in PEFT's sense.
    with pytest.raises(ValueError, match="matches no linear layer"):
        resolve_lora_targets(tiny_llama(), ["proj"])


# ----------------------------------------------------------------------------- bad input
# Configs as factories: a config checks itself when built, so the bad ones are built inside pytest.raises.
BAD_INPUTS = [
    ({"adapter": "foo"}, r"adapter='foo' is not supported.*'lora'.*'crma'"),
    (
        {"lora": lambda: LoRAConfig(target_modules=["nonexistent"])},
        r"\['nonexistent'\] matches no linear layer.*q_proj",
    ),
    (
        {"lora": lambda: LoRAConfig(target_modules=r"layers\.9\..*")},
        r"matches no linear layer.*model\.layers\.0\.self_attn",
    ),
    ({"lora": lambda: LoRAConfig(target_modules="(")}, r"target_modules='\(' is not a valid regex"),
    ({"lora": lambda: LoRAConfig(target_modules=[])}, r"target_modules=\[\] is invalid"),
    ({"lora": lambda: LoRAConfig(r=0)}, r"rank r=0 is invalid"),
    ({"lora": lambda: LoRAConfig(r=-3)}, r"rank r=-3 is invalid"),
    ({"lora": lambda: LoRAConfig(r=2.5)}, r"rank r=2\.5 is invalid"),
    ({"lora": lambda: LoRAConfig(dropout=1.0)}, r"dropout=1\.0 is invalid"),
    ({"lora": lambda: LoRAConfig(alpha=0)}, r"alpha=0 is invalid"),
    (
        {"adapter": "crma", "crma": lambda: CRMAConfig(n_streams=8, stream_rank=8)},
        r"8 \* 8 = 64 does not fit.*hidden size 32",
    ),
    ({"adapter": "crma", "crma": lambda: CRMAConfig(n_streams=0)}, r"n_streams=0 is invalid"),
    ({"adapter": "crma", "crma": lambda: CRMAConfig(g_max=0.0)}, r"g_max=0\.0 is invalid"),
    ({"adapter": "crma", "crma": lambda: CRMAConfig(g_max=-1.0)}, r"g_max=-1\.0 is invalid"),
    ({"adapter_name": "a.b"}, r"adapter name 'a\.b' is invalid"),
    ({"adapter_name": ""}, r"adapter name '' is invalid"),
]


@pytest.mark.parametrize("kwargs,match", BAD_INPUTS, ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_input_raises_and_leaves_model_untouched(kwargs, match):
    model = tiny_llama()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        attach_adapters(model, **{k: v() if callable(v) else v for k, v in kwargs.items()})
    _assert_same(model, snapshot)


def test_bad_crma_input_on_gpt2_leaves_model_untouched():
    model = tiny_gpt2()
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"does not fit the hidden size 32"):
        attach_adapters(model, "crma", LoRAConfig(r=2), CRMAConfig(n_streams=3, stream_rank=11))
    _assert_same(model, snapshot)


@pytest.mark.parametrize("first,second", [("lora", "lora"), ("lora", "crma"), ("crma", "lora"), ("crma", "crma")])
def test_attaching_twice_raises_and_leaves_model_untouched(first, second):
    model = tiny_llama()
    attach_adapters(model, first, LoRAConfig(r=2, target_modules=["q_proj"]), _crma_config())
    snapshot = _snapshot(model)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM already has adapters attached"):
        attach_adapters(model, second, LoRAConfig(r=2, target_modules=["k_proj"]), _crma_config())
    _assert_same(model, snapshot)


def test_failure_during_construction_rolls_back(monkeypatch):
    """If building a wrapper fails midway (e.g. out of memory), every replaced module is put back."""
    model = tiny_llama()
    snapshot = _snapshot(model)
    calls = {"n": 0}
    original = LoRALinear.add_adapter

    def flaky(self, name, config):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated allocation failure")
        original(self, name, config)

    monkeypatch.setattr(LoRALinear, "add_adapter", flaky)
    with pytest.raises(RuntimeError, match="simulated"):
        attach_adapters(model, "lora", LoRAConfig(r=2))
    _assert_same(model, snapshot)  # modules, weights and requires_grad flags all restored


def test_crma_uses_the_residual_width_not_the_embedding_width():
    """OPT-350m style: 32-wide embeddings projected to 64-wide blocks; CRMA must be 64 wide."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=100,
        hidden_size=64,
        word_embed_proj_dim=32,
        num_hidden_layers=2,
        ffn_dim=128,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    model = OPTForCausalLM(cfg).eval()
    x = torch.randint(0, 100, (2, 7))
    base = model(x).logits
    attach_adapters(model, "crma")
    assert {a.hidden_size for _, a in crma_adapters(model)} == {64}
    assert torch.allclose(model(x).logits, base, atol=1e-6)
