"""Continual-learning methods (DESIGN §3.4): replay, EWC, O-LoRA, the registry, multi-adapter LoRA."""

from __future__ import annotations

import io

import pytest
import torch
from tiny_models import TINY_LLAMA_CONFIG, tiny_llama
from torch import nn

from crma_lightning.adapters import LoRAConfig, LoRALinear, add_lora_adapter, attach_adapters, lora_layers
from crma_lightning.adapters.switching import active_adapter_names, set_active_adapters
from crma_lightning.data.datamodule import Collator
from crma_lightning.data.sampling import ResumableLoader
from crma_lightning.methods import EWC, METHODS, OLoRA, Replay, build_method, fisher_diagonal
from crma_lightning.methods.base import lm_loss


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ----------------------------------------------------------------------------- replay
def _rows(domain: int, n: int, length: int = 6) -> list[dict]:
    return [{"input_ids": [domain * 1000 + i] * length} for i in range(n)]  # the first id tells domain and row


def _batches(replay: Replay, stage: int, rows, batch_size=8, world=1, rank=0, epoch=0, skip=0):
    dataset, sampler = replay.train_data(stage, f"d{stage}", rows, batch_size, world, rank, seed=stage)
    sampler.set_epoch(epoch)
    sampler.skip_batches(skip)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=Collator(0, "x"))
    return [b["input_ids"][:, 0] for b in loader]


def test_replay_mixes_the_configured_ratio_and_never_holds_the_current_stage():
    replay = Replay(buffer_size=20, ratio=0.25, seed=3)
    assert replay.train_data(0, "d0", _rows(0, 40), 8) is None  # nothing to replay in the first stage
    replay.on_task_end(None, "d0", 0, train_batches=iter(()), train_rows=_rows(0, 40))
    stage1 = _rows(1, 40)
    dataset, _ = replay.train_data(1, "d1", stage1, 8)
    assert {row["input_ids"][0] // 1000 for row in dataset.buffer_rows} == {0}
    batches = _batches(replay, 1, stage1)
    assert len(batches) == 40 // 6  # an epoch is a pass over the stage's rows, 6 of them per batch
    for ids in batches:
        assert (ids // 1000 == 0).sum() == round(0.25 * 8)  # buffer rows
        assert (ids // 1000 == 1).sum() == 6
    stage_rows = torch.cat([ids[ids // 1000 == 1] for ids in batches])
    assert len(set(stage_rows.tolist())) == len(stage_rows)  # each stage row at most once per epoch
    # The stage's own rows join the buffer only when the stage ends; the running stage's snapshot is unchanged.
    replay.on_task_end(None, "d1", 1, train_batches=iter(()), train_rows=stage1)
    assert {row["input_ids"][0] // 1000 for row in dataset.buffer_rows} == {0}
    assert sum(replay.summary()["buffer_rows_per_domain"].values()) == 20
    assert set(replay.summary()["buffer_rows_per_domain"]) == {"d0", "d1"}


def test_replay_batches_are_seeded_and_match_one_process():
    def make(seed):
        r = Replay(buffer_size=16, ratio=0.25, seed=seed)
        r.add_domain("d0", _rows(0, 30), 0)
        return r

    stage1 = _rows(1, 50)
    first, again, other = _batches(make(0), 1, stage1), _batches(make(0), 1, stage1), _batches(make(1), 1, stage1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    # Two processes x batch 8 draw the same global batches as one process x batch 16 (ratio x 8 is whole).
    single = _batches(make(0), 1, stage1, batch_size=16)
    ranks = [_batches(make(0), 1, stage1, batch_size=8, world=2, rank=r) for r in range(2)]
    for j, glob in enumerate(single):
        both = torch.cat([ranks[0][j], ranks[1][j]])
        assert sorted(both.tolist()) == sorted(glob.tolist())


def test_replay_resumes_bit_identically():
    def fresh():
        r = Replay(buffer_size=12, selection="per_domain", ratio=0.5, seed=7)
        r.add_domain("d0", _rows(0, 30), 0)
        r.add_domain("d1", _rows(1, 30), 1)
        return r

    stage2 = _rows(2, 64)
    replay = fresh()
    full = _batches(replay, 2, stage2, epoch=1)
    # Interrupted after 3 batches: the checkpoint holds the method's state and the loader's position.
    dataset, sampler = replay.train_data(2, "d2", stage2, 8, seed=2)
    loader = ResumableLoader(
        dataset, batch_size=8, sampler=sampler, collate_fn=Collator(0, "x"), progress=lambda: (1, 3)
    )
    state = _roundtrip({"method": replay.state_dict(), "loader": loader.state_dict()})
    resumed = Replay(buffer_size=12, selection="per_domain", ratio=0.5, seed=7)
    resumed.load_state_dict(state["method"])
    assert resumed.summary() == replay.summary()
    dataset, sampler = resumed.train_data(2, "d2", stage2, 8, seed=2)
    loader = ResumableLoader(
        dataset, batch_size=8, sampler=sampler, collate_fn=Collator(0, "x"), progress=lambda: (0, 0)
    )
    loader.load_state_dict(state["loader"])
    rest = [b["input_ids"] for b in loader]
    assert len(rest) == len(full) - 3
    for a, b in zip(full[3:], rest, strict=True):
        assert torch.equal(a, b[:, 0])
    with pytest.raises(ValueError, match=r"ratio=0\.5, this run has ratio=0\.25"):
        Replay(buffer_size=12, selection="per_domain", ratio=0.25, seed=7).load_state_dict(state["method"])


def test_replay_selection_rules():
    per_domain = Replay(buffer_size=10, selection="per_domain")
    for i, n in enumerate((30, 30, 2)):
        per_domain.add_domain(f"d{i}", _rows(i, n), i)
    assert per_domain.summary()["buffer_rows_per_domain"] == {"d0": 4, "d1": 3, "d2": 2}  # 10 // 3, + 1 first
    by_fraction = Replay(fraction=0.1, selection="per_domain")
    by_fraction.add_domain("d0", _rows(0, 30), 0)
    by_fraction.add_domain("d1", _rows(1, 50), 1)
    by_fraction.add_domain("d1", _rows(1, 50), 1)  # a repeated stage end adds nothing
    assert by_fraction.summary()["buffer_rows_per_domain"] == {"d0": 3, "d1": 5}
    # Reservoir: a uniform sample of everything seen - two equal domains share the buffer about equally.
    share = []
    for seed in range(100):
        r = Replay(buffer_size=10, seed=seed)
        r.add_domain("d0", _rows(0, 40), 0)
        r.add_domain("d1", _rows(1, 40), 1)
        assert len(r.buffer) == 10
        share.append(r.summary()["buffer_rows_per_domain"]["d1"] / 10)
    assert 0.4 < sum(share) / len(share) < 0.6


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"buffer_size": 10, "fraction": 0.1}, "not both"),
        ({"buffer_size": 0}, "buffer_size=0"),
        ({"fraction": 1.5}, "fraction=1.5"),
        ({"selection": "fifo"}, r"selection='fifo'.*reservoir"),
        ({"ratio": 1.0}, "ratio=1.0"),
        ({"ratio": "0.2"}, "ratio='0.2'"),
    ],
)
def test_replay_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Replay(**kwargs)


def test_replay_ratio_must_leave_current_rows():
    replay = Replay(ratio=0.9)
    replay.add_domain("d0", _rows(0, 10), 0)
    with pytest.raises(ValueError, match="leaves no row of the current domain"):
        replay.train_data(1, "d1", _rows(1, 10), 2)


# ----------------------------------------------------------------------------- EWC
def _linear_setup():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2)
    gen = torch.Generator().manual_seed(1)
    batches = [{"x": torch.randn(4, 3, generator=gen), "y": torch.randn(4, 2, generator=gen)} for _ in range(3)]

    def loss_fn(b):  # 0.5 · mean over rows of ‖W x + c − y‖²
        return 0.5 * ((layer(b["x"]) - b["y"]) ** 2).sum(dim=1).mean()

    return layer, batches, loss_fn


def _hand_fisher(layer, batches):
    w, c = layer.weight.detach(), layer.bias.detach()
    fw, fc = torch.zeros_like(w), torch.zeros_like(c)
    for b in batches:
        residual = b["x"] @ w.T + c - b["y"]  # (n, 2)
        fw += (residual.T @ b["x"] / len(b["x"])) ** 2  # dL/dW = mean_n r xᵀ
        fc += residual.mean(dim=0) ** 2  # dL/dc = mean_n r
    return {"weight": fw / len(batches), "bias": fc / len(batches)}


def test_ewc_fisher_penalty_and_gradient_match_hand_computation():
    layer, batches, loss_fn = _linear_setup()
    fisher = fisher_diagonal(dict(layer.named_parameters()), batches, loss_fn, max_batches=10)
    hand = _hand_fisher(layer, batches)
    for name in hand:
        torch.testing.assert_close(fisher[name], hand[name], rtol=1e-5, atol=1e-7)
    assert layer.weight.grad is None  # estimation leaves .grad alone
    assert fisher_diagonal(dict(layer.named_parameters()), batches, loss_fn, max_batches=1)["bias"].equal(
        _hand_fisher(layer, batches[:1])["bias"]
    )

    ewc = EWC(lam=3.0)
    assert ewc.penalty(layer) is None  # nothing consolidated yet
    ewc.consolidate("a", fisher, dict(layer.named_parameters()))
    assert ewc.penalty(layer).item() == 0.0  # at the anchor
    anchor = {n: p.detach().clone() for n, p in layer.named_parameters()}
    with torch.no_grad():
        layer.weight.add_(torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.5, -0.1]]))
        layer.bias.add_(torch.tensor([0.2, -0.4]))
    penalty = ewc.penalty(layer)
    expected = 1.5 * sum((hand[n] * (p.detach() - anchor[n]) ** 2).sum() for n, p in layer.named_parameters())
    torch.testing.assert_close(penalty, expected, rtol=1e-5, atol=0)
    penalty.backward()
    for n, p in layer.named_parameters():  # d/dθ λ/2 F (θ − θ*)² = λ F (θ − θ*)
        torch.testing.assert_close(p.grad, 3.0 * hand[n] * (p.detach() - anchor[n]), rtol=1e-5, atol=1e-8)


def test_ewc_sums_stages_or_runs_online():
    layer, _, _ = _linear_setup()
    f1 = {"weight": torch.rand(2, 3), "bias": torch.rand(2)}
    f2 = {"weight": torch.rand(2, 3), "bias": torch.rand(2)}
    a1 = {n: p.detach().clone() for n, p in layer.named_parameters()}
    a2 = {n: p + 0.3 for n, p in a1.items()}
    theta = {n: p - 0.2 for n, p in a1.items()}

    def quad(f, a):
        return sum((f[n] * (theta[n] - a[n]) ** 2).sum() for n in f)

    offline, online = EWC(lam=2.0), EWC(lam=2.0, online=True, gamma=0.5)
    for method in (offline, online):
        method.consolidate("a", f1, a1)
        method.consolidate("b", f2, a2)
    with torch.no_grad():
        for n, p in layer.named_parameters():
            p.copy_(theta[n])
    torch.testing.assert_close(offline.penalty(layer), quad(f1, a1) + quad(f2, a2))
    running = {n: 0.5 * f1[n] + f2[n] for n in f1}  # F ← γ F + F_new, anchored at the latest values
    torch.testing.assert_close(online.penalty(layer), quad(running, a2))
    assert len(online.fisher) == 1 and online.summary()["consolidated"] == ["a", "b"]
    restored = EWC(lam=2.0)
    restored.load_state_dict(_roundtrip(offline.state_dict()))
    torch.testing.assert_close(restored.penalty(layer), offline.penalty(layer), rtol=0, atol=0)


def test_ewc_on_a_continual_lm():
    from crma_lightning.model.continual_lm import ContinualLM

    module = ContinualLM(model_config=TINY_LLAMA_CONFIG, adapter="lora", task_adapters="shared", seed=0)
    module.begin_task("d0")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (4, 2, 16), generator=gen)
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]
    ewc = EWC(lam=10.0, fisher_samples=3)
    ewc.setup(module)
    ewc.on_task_start(module, "d0", 0)
    module.train()
    ewc.on_task_end(module, "d0", 0, train_batches=iter(batches))
    assert module.training  # restored after the (dropout-free) estimation
    trainable = dict(module.trainable_parameters())
    assert set(ewc.fisher[0]) == set(trainable) and all(f.min() >= 0 for f in ewc.fisher[0].values())
    assert any(f.sum() > 0 for f in ewc.fisher[0].values())
    assert all(p.grad is None for p in trainable.values())
    assert ewc.penalty(module).item() == 0.0
    module.begin_task("d1")
    opt = torch.optim.SGD([p for _, p in module.trainable_parameters()], lr=0.5)
    loss = lm_loss(module, batches[0])
    loss.backward()
    opt.step()
    assert ewc.penalty(module).item() > 0
    ewc.on_task_end(module, "d0", 0, train_batches=iter(()))  # repeated stage end: no change
    assert ewc.tasks == ["d0"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"lam": -1.0}, "lam=-1.0"), ({"fisher_samples": 0}, "fisher_samples=0"), ({"gamma": 1.5}, "gamma=1.5")],
)
def test_ewc_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EWC(**kwargs)


# ----------------------------------------------------------------------------- several active LoRA adapters
def test_lora_linear_sums_the_active_adapters():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 4))
    layer.add_adapter("a", LoRAConfig(r=2, alpha=4))
    layer.add_adapter("b", LoRAConfig(r=3, alpha=3))
    for b in layer.lora_B.values():
        nn.init.normal_(b.weight)
    x = torch.randn(5, 6)
    layer.set_active_adapters(["a", "b"])
    assert layer.active_adapters == ["a", "b"]
    expected = layer.base_layer(x) + x @ layer.delta_weight("a").T + x @ layer.delta_weight("b").T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="read `active_adapters`"):
        _ = layer.active_adapter
    with pytest.raises(ValueError, match=r"unknown LoRA adapter\(s\) \['c'\]"):
        layer.set_active_adapters(["a", "c"])
    with pytest.raises(ValueError, match="more than once"):
        layer.set_active_adapters(["a", "a"])
    layer.set_adapter("b")  # the single-adapter API replaces the stack
    assert layer.active_adapter == "b" and layer.active_adapters == ["b"]
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ layer.delta_weight("b").T, rtol=1e-5, atol=1e-6)
    layer.set_active_adapters(["a", "b"])
    layer.delete_adapter("a")  # deleting one of a stack leaves the rest active
    assert layer.active_adapters == ["b"]
    layer.set_active_adapters([])
    assert layer.active_adapter is None and torch.equal(layer(x), layer.base_layer(x))


# ----------------------------------------------------------------------------- O-LoRA
def _train_steps(model, method, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(steps):
        ids = torch.randint(0, 128, (2, 12), generator=gen)
        loss = model(ids, labels=ids).loss
        penalty = method.penalty(model)
        if penalty is not None:
            loss = loss + penalty
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_olora_keeps_earlier_adapters_frozen_active_and_summed():
    model = tiny_llama()
    attach_adapters(model, "lora", LoRAConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"]), adapter_name="t0")
    add_lora_adapter(model, "t1", LoRAConfig(r=2, alpha=4), trainable=False)
    olora = build_method("olora", lam=0.5)
    olora.setup(model)
    olora.on_task_start(model, "t0", 0)
    assert active_adapter_names(model) == ["t0"] and olora.penalty(model) is None
    _train_steps(model, olora)
    olora.on_task_end(model, "t0", 0, train_batches=iter(()))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        logits_t0 = model(ids).logits
    t0_state = {n: p.detach().clone() for n, p in model.named_parameters() if ".t0." in n}

    olora.on_task_start(model, "t1", 1)
    olora.on_task_start(model, "t1", 1)  # idempotent (a resume calls it again)
    assert active_adapter_names(model) == ["t0", "t1"] == olora.active_adapters(model, "t0")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".t1." in n
    }
    with torch.no_grad():  # t1 is fresh (B = 0): the stack's output is t0's, bit for bit
        assert torch.equal(model(ids).logits, logits_t0)
    assert olora.penalty(model).item() > 0  # random A's are not orthogonal
    _train_steps(model, olora, seed=1)
    for n, p in model.named_parameters():
        if n in t0_state:
            assert torch.equal(p, t0_state[n]), n
    # Every LoRA layer's output is base + the sum of both deltas.
    _, layer = next(lora_layers(model))
    x = torch.randn(3, layer.in_features)
    expected = layer.base_layer(x) + x @ layer.delta_weight("t0").T + x @ layer.delta_weight("t1").T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        stacked = model(ids).logits
        set_active_adapters(model, ["t1"])
        assert not torch.allclose(model(ids).logits, stacked, atol=1e-5)
    restored = OLoRA(lam=0.5)
    restored.load_state_dict(_roundtrip(olora.state_dict()))
    assert restored.active_adapters(model, None) == ["t0", "t1"] and restored.summary()["stacked_adapters"] == ["t0"]


def test_olora_penalty_matches_hand_computation_and_vanishes_when_orthogonal():
    model = tiny_llama()
    attach_adapters(model, "lora", LoRAConfig(r=2, target_modules=["q_proj"]), adapter_name="t0")
    add_lora_adapter(model, "t1", LoRAConfig(r=3), trainable=True)
    olora = OLoRA(lam=0.7)
    olora.on_task_end(model, "t0", 0, train_batches=iter(()))
    olora.on_task_start(model, "t1", 1)
    expected = sum(
        (layer.lora_A["t0"].weight @ layer.lora_A["t1"].weight.T).pow(2).sum() for _, layer in lora_layers(model)
    )
    penalty = olora.penalty(model)
    torch.testing.assert_close(penalty, 0.7 * expected, rtol=1e-5, atol=0)
    penalty.backward()
    for _, layer in lora_layers(model):
        a0, a1 = layer.lora_A["t0"].weight.detach(), layer.lora_A["t1"].weight.detach()
        # d/dA_t λ ‖A_0 A_tᵀ‖² = 2 λ (A_0 A_tᵀ)ᵀ A_0; the frozen A_0 gets none.
        torch.testing.assert_close(layer.lora_A["t1"].weight.grad, 2 * 0.7 * (a0 @ a1.T).T @ a0, rtol=1e-4, atol=1e-6)
        assert layer.lora_A["t0"].weight.grad is None
    with torch.no_grad():
        for _, layer in lora_layers(model):
            eye = torch.eye(layer.in_features)
            layer.lora_A["t0"].weight.copy_(eye[:2] * 3.0)  # rows span e0, e1
            layer.lora_A["t1"].weight.copy_(eye[2:5] * -2.0)  # rows span e2..e4
    assert olora.penalty(model).item() == 0.0


def test_olora_l2_term_matches_hand_computation_from_the_first_task_and_is_checkpointed():
    model = tiny_llama()
    attach_adapters(model, "lora", LoRAConfig(r=2, target_modules=["q_proj"]), adapter_name="t0")
    add_lora_adapter(model, "t1", LoRAConfig(r=2), trainable=True)
    layers = [layer for _, layer in lora_layers(model)]
    with torch.no_grad():  # hand-checkable weights: ‖A‖_F = 5 (a 3-4-0 row), ‖B‖_F = 2 (four entries of 1)
        for layer in layers:
            for name in ("t0", "t1"):
                layer.lora_A[name].weight.zero_()
                layer.lora_B[name].weight.zero_()
            layer.lora_A["t0"].weight[0, :2] = torch.tensor([3.0, 4.0])
            layer.lora_B["t0"].weight[:2, :2] = 1.0
            layer.lora_A["t1"].weight[1, 0] = 2.0  # A_0 A_1ᵀ = [[0, 6], [0, 0]]: ‖·‖_F² = 36
    olora = OLoRA(lam=0.5, lam2=0.1)
    olora.on_task_start(model, "t0", 0)
    # First task: no earlier adapter, so the L2 term alone: 0.1 · Σ_layers (5 + 2).
    torch.testing.assert_close(olora.penalty(model), torch.tensor(0.1 * 7.0 * len(layers)))
    olora.on_task_end(model, "t0", 0, train_batches=iter(()))
    olora.on_task_start(model, "t1", 1)
    # Second task: 0.5 · 36 + 0.1 · (‖A_1‖_F + ‖B_1‖_F) = 18 + 0.1 · (2 + 0), per layer.
    penalty = olora.penalty(model)
    torch.testing.assert_close(penalty, torch.tensor((18.0 + 0.2) * len(layers)))
    penalty.backward()
    # dA_1 = 0.5 · 2 (A_0 A_1ᵀ)ᵀ A_0 + 0.1 · A_1/‖A_1‖_F: row 1 gets 6 · [3, 4] + 0.1 · [1, 0], row 0 nothing.
    expected_grad = torch.zeros_like(layers[0].lora_A["t1"].weight)
    expected_grad[1, :2] = torch.tensor([18.0 + 0.1, 24.0])
    for layer in layers:  # d‖B‖_F at B = 0 is 0 (not NaN)
        assert torch.equal(layer.lora_B["t1"].weight.grad, torch.zeros_like(layer.lora_B["t1"].weight))
        torch.testing.assert_close(layer.lora_A["t1"].weight.grad, expected_grad)
    assert OLoRA(lam=0.5).penalty(model) is None  # no task started: nothing
    first = OLoRA(lam=0.5)  # lam2 = 0 (the default) in the first task: no earlier adapter, no L2 term
    first.on_task_start(model, "t0", 0)
    assert first.penalty(model) is None
    assert OLoRA().config() == {"lam": 0.5} and olora.config() == {"lam": 0.5, "lam2": 0.1}
    restored = OLoRA(lam=0.5, lam2=0.1)
    restored.load_state_dict(_roundtrip(olora.state_dict()))
    with pytest.raises(ValueError, match=r"olora: checkpoint was written with lam2=0\.1, this run has lam2=0\.0"):
        OLoRA(lam=0.5).load_state_dict(_roundtrip(olora.state_dict()))
    with pytest.raises(ValueError, match=r"lam2=-1"):
        OLoRA(lam2=-1)


def test_olora_resumes_a_checkpoint_written_without_lam2_and_refuses_lam2_against_it():
    from crma_lightning.methods.hooks import identity
    from crma_lightning.model.identity import identity_differences

    # What a checkpoint from before λ₂ existed holds (and what λ₂ = 0 writes now).
    old_state = {"config": {"lam": 0.5}, "trained": ["t0"], "current": "t1"}
    old_identity = {"name": "olora", "lam": 0.5}
    resumed = OLoRA(lam=0.5)
    resumed.load_state_dict(_roundtrip(old_state))
    assert (resumed.trained, resumed.current) == (["t0"], "t1")
    assert identity_differences(old_identity, identity(resumed)) == []
    assert OLoRA(lam=0.5).state_dict()["config"] == old_state["config"]
    with pytest.raises(ValueError, match=r"olora: checkpoint was written with lam2=0\.0, this run has lam2=0\.1"):
        OLoRA(lam=0.5, lam2=0.1).load_state_dict(_roundtrip(old_state))
    assert identity_differences(old_identity, identity(OLoRA(lam=0.5, lam2=0.1))) == [
        "lam2: checkpoint None vs now 0.1"
    ]


def test_olora_on_a_continual_lm_and_its_requirements():
    from crma_lightning.model.continual_lm import ContinualLM

    module = ContinualLM(model_config=TINY_LLAMA_CONFIG, adapter="lora", task_adapters="per_task", seed=0)
    module.prepare_tasks(["d0", "d1"])
    olora = OLoRA()
    olora.setup(module)
    for index, task in enumerate(["d0", "d1"]):
        module.begin_task(task)
        olora.on_task_start(module, task, index)
        olora.on_task_end(module, task, index, train_batches=iter(()))
    assert active_adapter_names(module.model) == ["d0", "d1"]
    shared = ContinualLM(model_config=TINY_LLAMA_CONFIG, adapter="lora", task_adapters="shared", seed=0)
    with pytest.raises(ValueError, match=r"task_adapters='per_task'.*'shared'"):
        OLoRA().setup(shared)
    with pytest.raises(ValueError, match=r"lam=-0\.5"):
        OLoRA(lam=-0.5)


# ----------------------------------------------------------------------------- registry
def test_registry_builds_methods_and_names_bad_input():
    assert set(METHODS) == {"none", "replay", "ewc", "olora"}
    none = build_method("none")
    assert none.penalty(None) is None and none.active_adapters(None, "x") is None and none.state_dict() == {}
    assert none.train_data(1, "d", [], 8) is None and none.summary() == {"method": "none"}
    assert isinstance(build_method("replay", buffer_size=5, ratio=0.5), Replay)
    assert build_method("ewc", lam=2.0, online=True).summary()["online"] is True
    with pytest.raises(
        ValueError, match=r"method='lwf' is unknown: expected one of \['ewc', 'none', 'olora', 'replay'\]"
    ):
        build_method("lwf")
    with pytest.raises(ValueError, match=r"'ewc' has no hyper-parameter\(s\) \['lambda'\].*'lam'"):
        build_method("ewc", **{"lambda": 1.0})
    with pytest.raises(ValueError, match="online='yes'"):
        build_method("ewc", online="yes")


def test_replay_state_keeps_labels_only_for_masked_rows():
    replay = Replay(buffer_size=6, ratio=0.5)
    text = _rows(1, 3)
    masked = [{"input_ids": [7, 8, 9, 10], "scored": [False, False, True, True]}, {"input_ids": [5, 6, 7]}]
    replay.add_domain("a", text, 0)
    replay.add_domain("b", masked, 1)
    state = _roundtrip(replay.state_dict())
    assert state["labels"].tolist() == [-100, -100, 9, 10]  # the masked row alone; text rows store ids once
    restored = Replay(buffer_size=6, ratio=0.5)
    restored.load_state_dict(state)
    assert restored.buffer == replay.buffer


def test_a_method_states_the_task_adapters_it_needs_and_is_checked_before_the_model_loads(tmp_path):
    """No method is special-cased by name: any method's `required_task_adapters` is checked up front."""
    from crma_lightning.methods import ContinualMethod
    from crma_lightning.model.continual_lm import ContinualLM

    class PerTaskOnly(ContinualMethod):
        name = "per_task_only"
        required_task_adapters = "per_task"

    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ValueError, match=r"method per_task_only needs task_adapters='per_task' .*got 'shared'"):
        ContinualLM(model_name_or_path=missing, adapter="lora", task_adapters="shared", method=PerTaskOnly())
    with pytest.raises(ValueError, match=r"method olora needs task_adapters='per_task' .*got 'shared'"):
        ContinualLM(model_name_or_path=missing, adapter="lora", task_adapters="shared", method=OLoRA())


def test_a_merged_adapter_is_activated_as_itself_under_olora():
    # `evaluate --merge` on an O-LoRA run: the method chooses the adapters of the run's tasks (its stack),
    # but the merge is not a task - activating it must give the merged adapter alone, not O-LoRA's stack.
    from crma_lightning.adapters.merging import MERGED_ADAPTER, add_merged_adapter
    from crma_lightning.model.continual_lm import ContinualLM

    module = ContinualLM(
        model_config=TINY_LLAMA_CONFIG, adapter="lora", task_adapters="per_task", seed=0, method=OLoRA()
    )
    module.prepare_tasks(["d0", "d1"])
    for index, task in enumerate(["d0", "d1"]):
        module.begin_task(task)
        module.method.on_task_end(module, task, index, train_batches=iter(()))
    add_merged_adapter(module.model, ["d0", "d1"], "mean")
    module.activate_task("d0")
    assert active_adapter_names(module.model) == ["d0", "d1"]  # O-LoRA's stack for a task
    module.activate_task(MERGED_ADAPTER)
    assert active_adapter_names(module.model) == [MERGED_ADAPTER]
