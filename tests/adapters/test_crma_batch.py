"""CRMA's factors computed for all blocks at once per step (adapters/crma_batch.py): same numbers, same bounds,
never stale, activation checkpointing, and an op count that barely grows with depth."""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama

from crma_lightning.adapters import (
    CRMAAdapter,
    CRMAConfig,
    LoRAConfig,
    attach_adapters,
    crma_adapters,
    crma_batch,
    inject,
)

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def _model(layers: int = 3, seed: int = 0, **crma) -> torch.nn.Module:
    model = tiny_llama(seed=seed, layers=layers).train()
    attach_adapters(model, "crma", LoRAConfig(r=4, target_modules="all-linear"), CRMAConfig(**crma))
    torch.manual_seed(seed + 1)
    with torch.no_grad():  # away from the (near-)identity start, so every factor matters
        for _, adapter in crma_adapters(model):
            adapter.read_weight.normal_(std=0.5)
            if hasattr(adapter, "write_weight"):
                adapter.write_weight.normal_(std=0.5)
            adapter.mix_logits.normal_(std=2.0)
            adapter.gate_logit.normal_()
    return model


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _no_per_block_factors(monkeypatch) -> None:
    """Make an adapter computing its own factors fail: proves the batched factors were used."""

    def refuse(self):
        raise AssertionError("an adapter computed its own factors")

    monkeypatch.setattr(CRMAAdapter, "factors", refuse)


IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    "settings", [{}, {"form": "mix", "g_max": 0.5}, {"norm": "frobenius"}, {"sinkhorn_backward": "unrolled"}]
)
def test_batched_step_gives_the_per_block_loss_and_gradients(settings, monkeypatch):
    batched = _model(**settings)
    reference = copy.deepcopy(batched)
    with monkeypatch.context() as patch:
        _no_per_block_factors(patch)
        loss, grads = _loss_and_grads(batched, IDS)
    with crma_batch.per_block_factors():
        ref_loss, ref_grads = _loss_and_grads(reference, IDS)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    assert any("mix_logits" in n for n in grads) and any("read_weight" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("form", ["write", "mix"])
def test_batched_factors_keep_the_bound(form):
    g_max = 0.3 if form == "write" else 1.0
    model = _model(layers=4, form=form, g_max=g_max)
    adapters = [a for _, a in crma_adapters(model)]
    with torch.no_grad():
        for a in adapters:
            a.read_weight.mul_(40.0)  # σ_max far above 1: the normalisation must bring it back
            if form == "write":
                a.write_weight.mul_(40.0)
            a.mix_logits.copy_(torch.randn(a.mix_logits.shape) * 50)  # far from doubly stochastic
            a.gate_logit.fill_(20.0)  # g = g_max
    assert crma_batch.precompute_step_factors(adapters) == 4
    group = crma_batch._STEP[adapters[0]][0]
    assert (torch.linalg.matrix_norm(group.reads.detach(), ord=2) <= 1 + 1e-5).all()
    h = torch.randn(64, 32) * 3
    outs = [crma_batch.apply_step_factors(a, h) for a in adapters]
    crma_batch.clear_step_factors(adapters)
    for a, out in zip(adapters, outs):
        assert out is not None
        if form == "write":  # ||h' - h|| <= g_max ||h|| for every row
            assert ((out - h).norm(dim=-1) <= g_max * h.norm(dim=-1) * (1 + 1e-5) + 1e-6).all()
        else:  # non-expansive
            assert (out.norm(dim=-1) <= h.norm(dim=-1) * (1 + 1e-5) + 1e-6).all()
        torch.testing.assert_close(out, a(h), rtol=1e-5, atol=1e-5)  # = the adapter computing its own factors


def test_changed_parameters_never_use_stale_factors():
    model = _model()
    model(input_ids=IDS)  # builds this step's factors
    _, adapter = next(crma_adapters(model))
    h = torch.randn(5, 32)
    with torch.no_grad():
        cached = adapter(h)
        adapter.write_weight.add_(1.0)  # an in-place change, like an optimizer step or a loaded state dict
        changed = adapter(h)
    crma_batch.clear_step_factors([adapter])
    with torch.no_grad():
        fresh = adapter(h)  # computed by the adapter itself
    assert not torch.allclose(cached, changed)
    torch.testing.assert_close(changed, fresh)


@pytest.mark.parametrize("fused", [True, False], ids=["fused_adamw", "adamw"])
def test_an_optimizer_step_drops_the_cached_factors_even_without_version_bumps(fused):
    # torch's fused AdamW writes parameters without bumping their version counters: the version stamp alone
    # would serve the factors of before the step to the evaluation after it.
    model = _model(layers=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=fused)
    with torch.no_grad():
        model(input_ids=IDS)  # an evaluation caches factors
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    with torch.no_grad():
        after = model(input_ids=IDS).logits
        with crma_batch.per_block_factors():
            fresh = model(input_ids=IDS).logits  # every block computes its own from today's parameters
    torch.testing.assert_close(after, fresh, atol=1e-5, rtol=1e-5)


def test_factors_built_without_grad_are_not_used_for_training():
    model = _model()
    with torch.no_grad():
        model(input_ids=IDS)  # e.g. a validation pass
    _, adapter = next(crma_adapters(model))
    adapter(torch.randn(4, 32)).sum().backward()
    assert adapter.mix_logits.grad is not None and adapter.write_weight.grad is not None


def test_activation_checkpointing_reuses_the_step_factors_and_matches(monkeypatch):
    plain = _model()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss, grads = _loss_and_grads(plain, IDS)
    _no_per_block_factors(monkeypatch)  # the recomputation in the backward uses the step's factors too
    ck_loss, ck_grads = _loss_and_grads(checkpointed, IDS)
    torch.testing.assert_close(loss, ck_loss)
    for name in grads:
        torch.testing.assert_close(grads[name], ck_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_detach_removes_the_step_hook():
    model = _model()
    inject.detach_adapters(model)
    assert model not in inject._STEP_HOOKS
    model(input_ids=IDS)  # no adapters, no hook: runs as the base model
    assert not any(True for _ in crma_adapters(model))


def _crma_ops():
    spec = importlib.util.spec_from_file_location("crma_bench_ops", BENCH_DIR / "crma_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ops_crma_adds_per_step_barely_grow_with_depth():
    bench = _crma_ops()
    shallow, deep = (bench.crma_added_ops(layers, hidden=32, seq=8) for layers in (4, 16))
    # Loosely (the benchmark prints the 1.3 target): 4x the blocks may cost at most 1.5x the ops that do work.
    assert deep["work"] <= 1.5 * shallow["work"], (shallow, deep)
    # The scheme it replaced (every block its own factors) grows ~linearly: the same check fails for it.
    old_shallow, old_deep = (bench.crma_added_ops(layers, hidden=32, seq=8, per_block=True) for layers in (4, 16))
    assert old_deep["work"] > 3 * old_shallow["work"] > 3 * shallow["work"]


def test_without_autograd_unchanged_factors_are_reused_and_changed_ones_rebuilt():
    # Generation runs one forward per token with the parameters unchanged: the factors are built once.
    model = _model(layers=4, form="write", g_max=0.3)
    adapters = [a for _, a in crma_adapters(model)]
    ids = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        assert crma_batch.precompute_step_factors(adapters) == 4
        assert crma_batch.precompute_step_factors(adapters) == 0  # reused
        adapters[1].mix_logits.add_(0.5)  # changed in place: that block's factors are stale
        assert crma_batch.precompute_step_factors(adapters) == 1
        batched = model(input_ids=ids).logits
        with crma_batch.per_block_factors():
            assert crma_batch.precompute_step_factors(adapters) == 0  # none kept inside per_block_factors
            assert all(crma_batch._STEP.get(a) is None for a in adapters)
            per_block = model(input_ids=ids).logits
    assert torch.allclose(batched, per_block, atol=1e-5)
    assert crma_batch.precompute_step_factors(adapters) == 4  # with autograd: always rebuilt


def _simulated_gather(world: int, rows: int, monkeypatch) -> None:
    """The shard gather and gradient reduce-scatter on ``world`` simulated ranks, checked against full tensors.

    The collectives are replaced by two-phase fakes (every rank's buffer recorded, then delivered), so the
    padding and reordering of uneven ``torch.chunk`` shards (some ranks partly padded or empty) is exercised
    without processes.
    """
    from crma_lightning.adapters import crma_shards

    torch.manual_seed(rows)
    fulls = [torch.randn(rows, 3, dtype=torch.float64) for _ in range(2)]  # L = 2 parameters of shape (rows, 3)
    grads = [torch.randn(2, rows, 3, dtype=torch.float64) for _ in range(world)]  # each rank's upstream grad
    sent: dict[str, list[torch.Tensor]] = {"gather": [], "scatter": []}
    state = {"phase": "record", "rank": 0}

    def all_gather(out, mine, group=None):
        if state["phase"] == "record":
            sent["gather"].append(mine.clone())
        else:
            out.copy_(torch.cat(sent["gather"]))

    def reduce_scatter(out, flat, group=None):
        if state["phase"] == "record":
            sent["scatter"].append(flat.clone())
        else:
            out.copy_(sum(f.view(world, -1)[state["rank"]] for f in sent["scatter"]))

    monkeypatch.setattr(crma_shards.dist, "get_world_size", lambda group=None: world)
    monkeypatch.setattr(crma_shards.dist, "all_gather_into_tensor", all_gather)
    monkeypatch.setattr(crma_shards.dist, "reduce_scatter_tensor", reduce_scatter)
    shards = [[list(torch.chunk(f, world))[r] if r < len(torch.chunk(f, world)) else f[:0] for f in fulls]
              for r in range(world)]  # fmt: skip

    def run(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        state["rank"] = rank
        stack = torch.stack(shards[rank]).requires_grad_(True)  # (L, local, 3)
        (full,) = crma_shards._GatherStacked.apply(None, [fulls[0].shape], stack)
        (full * grads[rank]).sum().backward()
        return full.detach(), stack.grad

    for rank in range(world):  # phase 1: every rank's buffers
        run(rank)
    state["phase"] = "deliver"
    mean_grad = sum(grads) / world
    for rank in range(world):
        full, grad = run(rank)
        torch.testing.assert_close(full, torch.stack(fulls), rtol=0, atol=0)
        lo = rank * math.ceil(rows / world)
        torch.testing.assert_close(grad, mean_grad[:, lo : lo + shards[rank][0].shape[0]], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("rows", [1, 5, 7, 16])
def test_shard_gather_handles_uneven_and_empty_shards(world, rows, monkeypatch):
    """Rows 1/5/7/16 over 1 or 3 ranks: full, partly padded and empty shards all gather and reduce exactly."""
    _simulated_gather(world, rows, monkeypatch)
