"""Adapter files: safetensors round trips, adapter-only contents, load validation, PEFT export interop."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import tiny_gpt2, tiny_llama

from crma_lightning.adapters import (
    CRMAConfig,
    LoRAConfig,
    adapter_parameter_names,
    adapter_state_dict,
    add_lora_adapter,
    attach_adapters,
    crma_adapters,
    export_peft_adapter,
    load_adapters,
    lora_layers,
    read_adapter_metadata,
    save_adapters,
    set_active_adapter,
    set_crma_enabled,
)

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
CRMA = CRMAConfig(n_streams=4, stream_rank=4, g_max=0.1)


def _train(model, steps: int = 3, lr: float = 2e-2, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 16), generator=gen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _adapter_snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_state_equal(model, snapshot) -> None:
    state = model.state_dict()
    assert list(state) == list(snapshot)
    for k, v in snapshot.items():
        assert torch.equal(state[k], v), k


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("adapter", ["lora", "crma"])
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_save_load_round_trip(tmp_path, factory, adapter):
    lora_cfg = LoRAConfig(r=4, alpha=8, target_modules="all-linear")
    src = factory()
    attach_adapters(src, adapter, lora_cfg, CRMA)
    _train(src)
    expected = _logits(src)
    assert not torch.allclose(expected, _logits(factory()), atol=1e-4)  # training changed the output
    meta = {"stage": 2, "domains": ["news", "code"], "adapter": adapter, "path": Path("/x/y")}
    path = save_adapters(src, tmp_path / "nested" / "adapters.safetensors", metadata=meta)
    assert path == tmp_path / "nested" / "adapters.safetensors" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["adapters.safetensors"]  # no temporary file left

    keys = set(load_file(str(path)))
    assert keys == set(adapter_parameter_names(src))
    assert not any(k.endswith(".base_layer.weight") for k in keys)
    if adapter == "crma":
        assert sum(".crma." in k for k in keys) == 8
    assert read_adapter_metadata(path) == {**meta, "path": "/x/y"}  # non-JSON values stored as strings

    dst = factory()
    attach_adapters(dst, adapter, lora_cfg, CRMA)
    assert not torch.equal(_logits(dst), expected)
    loaded = load_adapters(dst, path)
    assert loaded == sorted(keys)
    assert torch.equal(_logits(dst), expected)


def test_file_holds_only_adapter_weights_and_is_small(tmp_path):
    model = tiny_llama(vocab_size=2048)  # embeddings dominate, as in real LMs (d=32 makes CRMA relatively big)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    attach_adapters(model, "crma", LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]), CRMA)
    path = save_adapters(model, tmp_path / "a.safetensors")
    keys = set(load_file(path))
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n in keys)
    assert path.stat().st_size < base_bytes / 10
    assert path.stat().st_size < adapter_bytes + 16_384  # tensors plus a small header, nothing else
    assert read_adapter_metadata(path) == {}


def test_save_selected_lora_adapters(tmp_path):
    model = tiny_llama()
    attach_adapters(model, "crma", LoRAConfig(r=2, target_modules=["q_proj"]), CRMA, adapter_name="a")
    add_lora_adapter(model, "b", LoRAConfig(r=3))
    state = adapter_state_dict(model, lora_adapters=["b"])
    assert state and not any(".lora_A.a." in k or ".lora_B.a." in k for k in state)
    assert sum(".lora_B.b." in k for k in state) == 2 and sum(".crma." in k for k in state) == 8  # CRMA always
    path = save_adapters(model, tmp_path / "b.safetensors", lora_adapters=["b"])
    assert set(load_file(path)) == set(state)
    with pytest.raises(ValueError, match=r"missing keys \[.*lora_A\.a\.weight"):
        load_adapters(model, path)  # strict: adapter "a" is not in the file
    assert load_adapters(model, path, strict=False) == sorted(state)


def _source_and_target():
    src, dst = tiny_llama(), tiny_llama()
    cfg = LoRAConfig(r=4, target_modules=["q_proj", "v_proj"])
    attach_adapters(src, "crma", cfg, CRMA)
    attach_adapters(dst, "crma", cfg, CRMA)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in src.parameters():
            if p.requires_grad:
                p.normal_()
    return src, dst


def test_load_rejects_missing_keys(tmp_path):
    src, dst = _source_and_target()
    state = adapter_state_dict(src)
    missing = "model.layers.1.crma.gate_logit"
    del state[missing]
    snapshot = _adapter_snapshot(dst)
    with pytest.raises(ValueError, match=rf"missing keys \['{missing}'\]"):
        load_adapters(dst, state)
    _assert_state_equal(dst, snapshot)  # nothing was copied, not even the valid keys
    assert len(load_adapters(dst, state, strict=False)) == len(state)
    assert not torch.equal(dst.model.layers[1].crma.gate_logit, src.model.layers[1].crma.gate_logit)
    assert torch.equal(dst.model.layers[0].crma.gate_logit, src.model.layers[0].crma.gate_logit)


def test_load_rejects_unexpected_keys_including_base_weights(tmp_path):
    src, dst = _source_and_target()
    state = dict(adapter_state_dict(src))
    base_key = "model.layers.0.base_layer.self_attn.q_proj.base_layer.weight"
    assert base_key in dst.state_dict()
    state[base_key] = torch.zeros_like(dst.state_dict()[base_key])  # an adapter file must not overwrite the base
    state["model.layers.0.crma.bogus"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    snapshot = _adapter_snapshot(dst)
    with pytest.raises(ValueError, match=r"unexpected keys \[.*base_layer\.weight.*crma\.bogus.*bad\.safetensors"):
        load_adapters(dst, path)
    _assert_state_equal(dst, snapshot)


def test_load_rejects_wrong_shapes(tmp_path):
    src = tiny_llama()
    attach_adapters(src, "lora", LoRAConfig(r=5, target_modules=["q_proj"]))
    path = save_adapters(src, tmp_path / "r5.safetensors")
    dst = tiny_llama()
    attach_adapters(dst, "lora", LoRAConfig(r=4, target_modules=["q_proj"]))
    snapshot = _adapter_snapshot(dst)
    with pytest.raises(
        ValueError, match=r"shape mismatches \[.*lora_A\.default\.weight: file \(5, 32\) vs model \(4, 32\)"
    ):
        load_adapters(dst, path)
    _assert_state_equal(dst, snapshot)


def test_load_rejects_other_adapter_name(tmp_path):
    src, dst = tiny_llama(), tiny_llama()
    attach_adapters(src, "lora", LoRAConfig(r=2, target_modules=["q_proj"]), adapter_name="task0")
    attach_adapters(dst, "lora", LoRAConfig(r=2, target_modules=["q_proj"]), adapter_name="task1")
    path = save_adapters(src, tmp_path / "t0.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys \[.*task0.*missing keys \[.*task1"):
        load_adapters(dst, path)


# ----------------------------------------------------------------------------- PEFT interop
def _peft_logits(factory, out_dir) -> torch.Tensor:
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(factory(), str(out_dir)).eval()
    return _logits(peft_model)


def _check_export_dir(out_dir: Path, model, n_lora: int) -> dict:
    assert sorted(p.name for p in out_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out_dir / "adapter_config.json").read_text())
    keys = set(load_file(str(out_dir / "adapter_model.safetensors")))
    assert len(keys) == 2 * n_lora
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert not any("base_layer" in k or "crma" in k for k in keys)
    return config


@pytest.mark.parametrize(
    "factory,lora_cfg,fan_in_fan_out",
    [
        (tiny_llama, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]), False),
        (tiny_llama, LoRAConfig(r=4, alpha=3, dropout=0.1, use_rslora=True), False),
        (tiny_gpt2, LoRAConfig(r=4, alpha=8, target_modules="all-linear"), True),  # Conv1D: fan_in_fan_out
    ],
    ids=["llama", "llama_rslora", "gpt2_conv1d"],
)
def test_export_peft_matches_logits(tmp_path, factory, lora_cfg, fan_in_fan_out):
    model = factory()
    attach_adapters(model, "lora", lora_cfg)
    _train(model)
    assert all(torch.count_nonzero(m.lora_B["default"].weight) > 0 for _, m in lora_layers(model))
    expected = _logits(model)
    assert not torch.allclose(expected, _logits(factory()), atol=1e-4)

    out = export_peft_adapter(model, "default", tmp_path / "peft")
    config = _check_export_dir(out, model, len(list(lora_layers(model))))
    assert config["peft_type"] == "LORA" and config["r"] == lora_cfg.r and config["lora_alpha"] == lora_cfg.alpha
    assert config["fan_in_fan_out"] is fan_in_fan_out and config["use_rslora"] is lora_cfg.use_rslora
    torch.testing.assert_close(_peft_logits(factory, out), expected, atol=1e-5, rtol=0)


def test_export_peft_crma_model_lora_part(tmp_path):
    model = tiny_llama()
    attach_adapters(model, "crma", LoRAConfig(r=4, target_modules="all-linear"), CRMA)
    _train(model)
    assert all(torch.count_nonzero(a.write_weight) > 0 for _, a in crma_adapters(model))
    with_crma = _logits(model)
    set_crma_enabled(model, False)
    expected = _logits(model)
    assert not torch.allclose(expected, with_crma, atol=1e-5)  # CRMA was doing something; it is not exported
    out = export_peft_adapter(model, "default", tmp_path / "peft")
    config = _check_export_dir(out, model, 14)
    pattern = re.compile(config["target_modules"])  # PEFT full-matches it against the plain model's names
    assert pattern.fullmatch("model.layers.0.self_attn.q_proj") and pattern.fullmatch("model.layers.1.mlp.down_proj")
    assert "base_layer" not in config["target_modules"]  # the CRMABlock hop is not part of the plain model
    torch.testing.assert_close(_peft_logits(tiny_llama, out), expected, atol=1e-5, rtol=0)


def test_export_peft_selects_adapter_from_bank(tmp_path):
    model = tiny_llama()
    attach_adapters(model, "lora", LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter_name="a")
    _train(model, seed=1)
    add_lora_adapter(model, "b", LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]))
    set_active_adapter(model, "b")
    _train(model, seed=2)  # "a" is trainable too but inactive: its grads are None, AdamW skips it
    logits_b = _logits(model)
    set_active_adapter(model, "a")
    logits_a = _logits(model)
    out_a = export_peft_adapter(model, "a", tmp_path / "a")
    out_b = export_peft_adapter(model, "b", tmp_path / "b")
    assert json.loads((out_b / "adapter_config.json").read_text())["r"] == 2
    torch.testing.assert_close(_peft_logits(tiny_llama, out_a), logits_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(_peft_logits(tiny_llama, out_b), logits_b, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"unknown LoRA adapter 'c'.*\['a', 'b'\]"):
        export_peft_adapter(model, "c", tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_safetensors_metadata_format(tmp_path):
    model = tiny_llama()
    attach_adapters(model, "lora", LoRAConfig(r=2, target_modules=["q_proj"]))
    path = save_adapters(model, tmp_path / "m.safetensors", metadata={"a": 1})
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and json.loads(meta["crma_lightning"]) == {"a": 1}
