"""GradientStability: exact per-step gradient norms, Welford statistics, CRMA health, bounded transfers."""

from __future__ import annotations

import copy
import json
import statistics
import traceback

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny_models import TINY_LLAMA_CONFIG, MemoryLogger
from torch.utils.data import DataLoader

from crma_lightning.callbacks import GradientStability
from crma_lightning.callbacks.gradient_stability import RunningStats
from crma_lightning.callbacks.health import crma_health_vector
from crma_lightning.model.continual_lm import ContinualLM
from crma_lightning.parallel.grad_norms import group_grad_square_sums

MODEL_CONFIG = TINY_LLAMA_CONFIG


def make_model(adapter: str = "crma") -> ContinualLM:
    model = ContinualLM(model_config=MODEL_CONFIG, adapter=adapter, task_adapters="per_task")
    model.prepare_tasks(["a"])
    model.begin_task("a")
    return model


def make_batches(n: int = 3) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, 200, (2, 12), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "domain": "a"})
    return batches


def loader(batches: list[dict]) -> DataLoader:
    return DataLoader(batches, batch_size=1, collate_fn=lambda x: x[0])


def fit(model, callbacks, max_steps=6, every=2, batches=None, ckpt_path=None, checkpointing=False, root=None):
    logger = MemoryLogger()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        logger=[logger],
        callbacks=callbacks,
        enable_checkpointing=checkpointing,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=every,
        default_root_dir=root,
    )
    trainer.fit(model, loader(batches or make_batches()), ckpt_path=ckpt_path)
    return logger


def norms_of(logger: MemoryLogger) -> list[float]:
    entries = logger.with_key("grad/norm")
    assert [s for _, s in entries] == list(range(len(entries)))  # one entry per optimizer step, in order
    return [m["grad/norm"] for m, _ in entries]


@pytest.fixture(scope="module")
def run():
    """One 6-step fit (logging every 2 steps), shared by the read-only checks below."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped fixtures run before the function-scoped one_thread
    try:
        callback = GradientStability(window=3)
        logger = fit(make_model(), [callback])
    finally:
        torch.set_num_threads(threads)
    return callback, logger


def test_step0_norm_matches_hand_computed_total_norm(run):
    _, logger = run
    first, step = logger.with_key("grad/norm")[0]
    assert step == 0
    # Same model (seeded construction), same first batch, gradients by hand.
    model = make_model()
    model.train()
    batch = make_batches()[0]
    model.compute_loss(batch, model(batch["input_ids"], batch["attention_mask"])).backward()
    grads = [p.grad for _, p in model.trainable_parameters() if p.grad is not None]
    expected = torch.nn.utils.get_total_norm(grads).item()
    assert first["grad/norm"] == pytest.approx(expected, rel=1e-5)
    # Per group: each equals the hand norm of that optimizer group, and they combine to the total.
    for group in model.param_groups():
        hand = torch.nn.utils.get_total_norm([p.grad for p in group["params"]]).item()
        assert first[f"grad/norm_{group['name']}"] == pytest.approx(hand, rel=1e-5, abs=1e-12)
    combined = np.sqrt(sum(v**2 for k, v in first.items() if k.startswith("grad/norm_")))
    assert combined == pytest.approx(first["grad/norm"], rel=1e-6)
    assert {"grad/norm_lora", "grad/norm_crma", "grad/norm_crma_structural"} <= set(first)


def test_welford_peak_and_rolling_variance(run):
    callback, logger = run
    norms = norms_of(logger)
    assert len(norms) == 6
    stage = callback.summary()["stages"]["a"]
    assert stage["steps"] == 6 and stage["warmup_steps"] == 0
    assert stage["mean"] == pytest.approx(np.mean(norms), rel=1e-12)
    assert stage["var"] == pytest.approx(np.var(norms), rel=1e-9)  # ddof=0
    assert stage["std"] == pytest.approx(np.std(norms), rel=1e-9)
    assert stage["peak"] == max(norms)
    assert callback.summary()["run"] == stage  # one stage: the run is that stage
    json.dumps(callback.summary(), allow_nan=False)
    for k, (metrics, _) in enumerate(logger.with_key("grad/norm")):
        assert metrics["grad/peak"] == max(norms[: k + 1])
        assert metrics["grad/var"] == pytest.approx(np.var(norms[max(0, k - 2) : k + 1]), rel=1e-9, abs=1e-15)


def test_crma_health_logged_at_each_flush(run):
    _, logger = run
    health = logger.with_key("crma/spectral_norm_max")
    assert [s for _, s in health] == [1, 3, 5]  # the last step of every logging interval
    for metrics, _ in health:
        assert 0.0 < metrics["crma/spectral_norm_max"] <= 1 + 1e-5
        assert 0.0 < metrics["crma/gate_mean"] <= metrics["crma/gate_max"] <= 0.1  # g_max
        assert metrics["crma/row_sum_error_max"] < 1e-5
        assert metrics["crma/col_sum_error_max"] < 1e-5
        assert metrics["crma/sinkhorn_residual_max"] >= 0.0


def test_warmup_is_excluded_and_runs_are_deterministic(run):
    _, reference = run
    norms = norms_of(reference)
    callback = GradientStability(warmup_steps=2)
    logger = fit(make_model(), [callback])
    assert norms_of(logger) == norms  # same seed, same data: bit-identical norms
    stage = callback.summary()["stages"]["a"]
    assert stage["steps"] == 6 and stage["warmup_steps"] == 2
    assert stage["mean"] == pytest.approx(np.mean(norms[2:]), rel=1e-12)
    assert stage["var"] == pytest.approx(np.var(norms[2:]), rel=1e-9)
    assert stage["peak"] == max(norms[2:])
    assert "grad/peak" not in logger.with_key("grad/norm")[0][0]  # no peak before warm-up ends


def test_one_transfer_per_logging_interval(monkeypatch):
    calls = []
    original = GradientStability._flush

    def counting(self, *args, **kwargs):
        calls.append(list(self._pending_steps))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GradientStability, "_flush", counting)
    tolist_calls = []
    original_tolist = torch.Tensor.tolist

    def counting_tolist(self):
        if "gradient_stability" in traceback.extract_stack(limit=2)[0].filename:  # not the non-finite guard's
            tolist_calls.append(self.shape)
        return original_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    fit(make_model(), [GradientStability()], max_steps=6, every=4)
    # Interval 4: steps 0-3 flushed at step 3, the remaining 4-5 at train end; one .tolist() each.
    assert calls == [[0, 1, 2, 3], [4, 5]]
    assert len(tolist_calls) == 2
    assert tolist_calls[0] == (4 * 5 + 6,)  # 4 steps x (total + 4 groups), then 6 health values


def test_lora_only_model_logs_no_crma_health():
    logger = fit(make_model("lora"), [GradientStability()], max_steps=2, every=1)
    entries = logger.with_key("grad/norm")
    assert len(entries) == 2
    assert {k for k in entries[0][0] if k.startswith("grad/norm_")} == {"grad/norm_lora"}
    assert not logger.with_key("crma/spectral_norm_max")


def test_state_dict_round_trip_is_plain_and_continues(run, tmp_path):
    callback, _ = run
    state = callback.state_dict()
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    restored = GradientStability(window=3)
    restored.load_state_dict(loaded)
    assert restored.summary() == callback.summary()
    assert restored._window == callback._window  # the rolling window continues too
    # Both continue with the same numbers: Welford state (n, mean, M2) survived exactly.
    a, b = copy.deepcopy(callback), restored
    for stats in (a.stages["a"], a.run, b.stages["a"], b.run):
        for x in (0.5, 2.0):
            stats.add(x)
    assert a.summary() == b.summary()
    assert a.summary()["run"]["steps"] == 8


def test_mid_stage_checkpoint_resume_continues_the_stage(tmp_path):
    # Uninterrupted 6 steps, checkpointing at step 3 (Lightning takes the callback state then).
    full = GradientStability()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    full_logger = fit(make_model(), [full, checkpoint], checkpointing=True, root=tmp_path)
    full_norms = norms_of(full_logger)
    ckpt = tmp_path / "epoch=0-step=3.ckpt"
    assert ckpt.exists(), sorted(p.name for p in tmp_path.iterdir())

    resumed = GradientStability()
    logger = fit(make_model(), [resumed], ckpt_path=str(ckpt), checkpointing=False, root=tmp_path)
    entries = logger.with_key("grad/norm")
    assert [s for _, s in entries] == [3, 4, 5]
    np.testing.assert_allclose([m["grad/norm"] for m, _ in entries], full_norms[3:], rtol=1e-6)
    assert list(resumed.stages) == ["a"]  # the same stage continued, not "a#2"
    got, want = resumed.summary()["stages"]["a"], full.summary()["stages"]["a"]
    assert got["steps"] == want["steps"] == 6
    for key in ("mean", "var", "peak"):
        assert got[key] == pytest.approx(want[key], rel=1e-5)


def test_new_fit_starts_a_new_stage_and_run_accumulates():
    callback = GradientStability()
    model = make_model()
    first = norms_of(fit(model, [callback], max_steps=3))
    model.current_task = "b"  # what begin_task("b") would set; the stage is named after it
    second = [m["grad/norm"] for m, _ in fit(model, [callback], max_steps=3).with_key("grad/norm")]
    summary = callback.summary()
    assert list(summary["stages"]) == ["a", "b"]
    assert summary["stages"]["b"]["mean"] == pytest.approx(np.mean(second), rel=1e-12)
    assert summary["run"]["steps"] == 6
    assert summary["run"]["var"] == pytest.approx(np.var(first + second), rel=1e-9)


def test_running_stats_skip_nonfinite():
    stats = RunningStats()
    for x, warm in [(9.0, True), (1.0, False), (float("nan"), False), (3.0, False)]:
        stats.add(x, warm)
    s = stats.summary()
    assert (s["steps"], s["warmup_steps"], s["nonfinite_steps"]) == (4, 1, 1)
    assert (s["mean"], s["var"], s["peak"]) == (2.0, 1.0, 3.0)  # of 1 and 3, population variance
    assert RunningStats().summary()["mean"] is None


def test_group_square_sums_float32_for_half_grads():
    a = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    b = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3.0, 4.0, 0.0], dtype=torch.bfloat16)
    b.grad = torch.tensor([1.0, 2.0])
    c = torch.nn.Parameter(torch.zeros(1))  # no grad: skipped
    opt = torch.optim.SGD([{"params": [a, c], "name": "x"}, {"params": [b]}], lr=0.1)
    names, sums = group_grad_square_sums(opt)
    assert names == ["x", "group1"]
    assert sums.dtype == torch.float32
    assert sums.tolist() == [25.0, 5.0]
    empty = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert group_grad_square_sums(empty)[1].tolist() == [0.0]


def test_invalid_arguments():
    for kwargs in ({"log_every_n_steps": 0}, {"warmup_steps": -1}, {"window": 0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            GradientStability(**kwargs)


# ---------------------------------------------------------------------- two processes (gloo, CPU)
def _distributed_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from crma_lightning.adapters import CRMAAdapter
    from crma_lightning.callbacks import ZClip

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {}
        # FSDP2: DTensor gradients sharded over the ranks, each rank on its half of the batch.
        torch.manual_seed(0)
        full = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 5))
        sharded = copy.deepcopy(full)
        for module in (sharded[0], sharded[2], sharded):
            fully_shard(module)
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
        sharded(x[2 * rank : 2 * rank + 2]).square().mean().backward()
        full(x).square().mean().backward()
        groups = [{"params": list(sharded[0].parameters()), "name": "a"}, {"params": list(sharded[2].parameters())}]
        names, sums = group_grad_square_sums(torch.optim.SGD(groups, lr=0.1))
        results["fsdp2"] = (names, sums.sqrt().tolist())
        results["fsdp2_ref"] = [
            torch.nn.utils.get_total_norm([p.grad for p in m.parameters()]).item() for m in (full[0], full[2])
        ]

        # ZClip scales DTensor gradients through their local shards.
        opt = torch.optim.SGD(sharded.parameters(), lr=0.1)
        zclip = ZClip(warmup_steps=2)
        zclip.seen, zclip._values = 2, {**zclip._values, "mean": 0.01, "var": 1e-6, "ready": 1.0}
        fake = type("T", (), {"fit_loop": type("F", (), {"epoch_loop": type("E", (), {"_batches_that_stepped": 0})})})
        zclip.on_before_optimizer_step(fake, type("M", (), {"device": torch.device("cpu")}), opt)
        clipped = torch.nn.utils.get_total_norm([p.grad.full_tensor() for p in sharded.parameters()]).item()
        results["zclip"] = (clipped, 0.01 + 2.5 * 1e-3)

        # FSDP1-style flat local shards (plain tensors): sums reduced over the group.
        flat = torch.arange(10, dtype=torch.float32)
        p = torch.nn.Parameter(torch.zeros(5))
        p.grad = flat[5 * rank : 5 * rank + 5].clone()
        _, sums = group_grad_square_sums(torch.optim.SGD([p], lr=0.1), local_shards_group=dist.group.WORLD)
        results["fsdp1"] = (sums.sqrt().item(), flat.norm().item())

        # CRMA health of a sharded adapter (the scalar gate stays unsharded: fully_shard refuses 0-d params).
        torch.manual_seed(3)
        adapter = CRMAAdapter(32)
        with torch.no_grad():
            adapter.mix_logits.add_(torch.randn(4, 4))
            adapter.gate_logit.fill_(0.7)
        want = crma_health_vector(torch.nn.ModuleList([adapter])).tolist()
        shard = copy.deepcopy(adapter)
        fully_shard(shard, ignored_params={shard.gate_logit})
        results["health"] = (crma_health_vector(torch.nn.ModuleList([shard])).tolist(), want)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_sharded_gradients_give_single_process_norms(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        names, norms = r["fsdp2"]
        assert names == ["a", "group1"]
        np.testing.assert_allclose(norms, r["fsdp2_ref"], rtol=1e-5)
        assert r["zclip"][0] == pytest.approx(r["zclip"][1], rel=1e-4)
        assert r["fsdp1"][0] == pytest.approx(r["fsdp1"][1], rel=1e-6)
        np.testing.assert_allclose(*r["health"], rtol=1e-6, atol=1e-7)


def test_scale_free_statistics_ignore_a_rescaling_that_changes_the_variance():
    norms = [1.0, 1.4, 0.8, 3.0, 1.1, 0.9]
    a, b = RunningStats(), RunningStats()
    for x in norms:
        a.add(x)
        b.add(0.5 * x)  # what a contracting adapter would do to the same gradients
    sa, sb = a.summary(), b.summary()
    assert sb["var"] == pytest.approx(0.25 * sa["var"])
    assert sb["cv"] == pytest.approx(sa["cv"]) and sa["cv"] == pytest.approx(
        statistics.pstdev(norms) / statistics.mean(norms)
    )
    assert sa["median"] == pytest.approx(statistics.median(norms))
    assert sb["peak_over_median"] == pytest.approx(sa["peak_over_median"]) == pytest.approx(3.0 / 1.05)
    restored = RunningStats.from_state(a.state_dict())
    assert restored.summary() == sa
