"""ZClip: z-score clipping of gradient-norm spikes, on hand-made gradients and in a tiny Trainer."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from tiny_models import TINY_LLAMA_CONFIG, MemoryLogger
from torch.utils.data import DataLoader

from crma_lightning.callbacks import GradientStability, ZClip
from crma_lightning.model.continual_lm import ContinualLM


class Rig:
    """A small module with hand-set gradients and a minimal stand-in for the trainer."""

    def __init__(self, zclip: ZClip, every: int = 1, task: str = "a") -> None:
        self.zclip = zclip
        self.layer = torch.nn.Linear(3, 2)
        self.opt = torch.optim.SGD(self.layer.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(0)
        direction = [torch.randn(p.shape, generator=gen) for p in self.layer.parameters()]
        total = math.sqrt(sum(float(d.square().sum()) for d in direction))
        self.unit = [d / total for d in direction]  # gradient of norm 1
        self.logger = MemoryLogger()
        self.loop = SimpleNamespace(_batches_that_stepped=0)
        self.trainer = SimpleNamespace(
            fit_loop=SimpleNamespace(epoch_loop=self.loop),
            log_every_n_steps=every,
            strategy=object(),
            loggers=[self.logger],
            is_global_zero=True,
            callbacks=[zclip],
        )
        self.module = SimpleNamespace(device=torch.device("cpu"), current_task=task)
        zclip.on_train_start(self.trainer, self.module)

    def step(self, norm: float) -> list[torch.Tensor]:
        """Set gradients of total norm ``norm``, run the hook; return the gradients it left."""
        for p, u in zip(self.layer.parameters(), self.unit):
            p.grad = u * norm
        self.zclip.on_before_optimizer_step(self.trainer, self.module, self.opt)
        self.zclip.on_train_batch_end(self.trainer, self.module, None, None, 0)
        self.loop._batches_that_stepped += 1
        return [p.grad.clone() for p in self.layer.parameters()]

    def grad_norm(self) -> float:
        return torch.nn.utils.get_total_norm([p.grad for p in self.layer.parameters()]).item()


WARMUP = [1.0, 1.2, 0.8, 1.1, 0.9]
# Warm-up statistics: mean = 5.0 / 5 = 1.0; population variance = (0 + .04 + .04 + .01 + .01) / 5 = 0.02
MEAN0, VAR0 = 1.0, 0.02


def test_no_clipping_during_warmup():
    rig = Rig(ZClip(warmup_steps=3))
    for norm in (1.0, 50.0, 1.0):  # a spike inside warm-up only feeds the statistics
        rig.step(norm)
        assert rig.grad_norm() == pytest.approx(norm, rel=1e-6)
    stats = rig.zclip.stats()
    assert stats["warmed_up"] and stats["clipped_total"] == 0
    assert stats["mean"] == pytest.approx(52.0 / 3, rel=1e-6)


def test_normal_steps_untouched_and_spike_clipped_to_threshold():
    rig = Rig(ZClip(warmup_steps=5, alpha=0.97, z_thresh=2.5))
    for norm in WARMUP:
        rig.step(norm)
    stats = rig.zclip.stats()
    assert stats["mean"] == pytest.approx(MEAN0, rel=1e-6)
    assert stats["std"] == pytest.approx(math.sqrt(VAR0), rel=1e-5)

    # A normal step: z = (1.05 - 1.0) / 0.1414 = 0.35 < 2.5 -> gradients bit-for-bit unchanged.
    expected = [u * 1.05 for u in rig.unit]
    left = rig.step(1.05)
    assert all(torch.equal(a, b) for a, b in zip(left, expected))
    # EMA: mean = .97 * 1.0 + .03 * 1.05 = 1.0015; var = .97 * .02 + .03 * (1.05 - 1.0015)^2
    mean1 = 0.97 * MEAN0 + 0.03 * 1.05
    var1 = 0.97 * VAR0 + 0.03 * (1.05 - mean1) ** 2
    assert rig.zclip.stats()["mean"] == pytest.approx(mean1, rel=1e-6)
    assert rig.zclip.stats()["std"] == pytest.approx(math.sqrt(var1), rel=1e-5)

    # A spike of norm 10: z = (10 - 1.0015) / 0.1395 = 64 > 2.5 -> scaled to mean + 2.5 std, same direction.
    threshold = mean1 + 2.5 * math.sqrt(var1)  # = 1.3503...
    left = rig.step(10.0)
    assert rig.grad_norm() == pytest.approx(threshold, rel=1e-5)
    for a, u in zip(left, rig.unit):
        torch.testing.assert_close(a, u * threshold, rtol=1e-5, atol=1e-7)
    # The EMA sees the clipped norm, not the spike.
    mean2 = 0.97 * mean1 + 0.03 * threshold
    assert rig.zclip.stats()["mean"] == pytest.approx(mean2, rel=1e-6)
    assert rig.zclip.stats()["clipped_total"] == 1


def test_adaptive_mode_clips_harder():
    rig = Rig(ZClip(warmup_steps=5, mode="adaptive"))
    for norm in WARMUP:
        rig.step(norm)
    std = math.sqrt(VAR0)
    z = (4.0 - MEAN0) / (std + 1e-6)
    rig.step(4.0)
    assert rig.grad_norm() == pytest.approx(MEAN0 + 2.5**2 * std / z, rel=1e-5)  # mean + z_t^2 std / z


def test_clip_events_counted_and_logged_per_interval():
    rig = Rig(ZClip(warmup_steps=5), every=4)
    for norm in [*WARMUP, 1.0, 9.0, 1.0, 8.0, 1.0, 1.0]:  # steps 0..10; spikes at steps 6 and 8
        rig.step(norm)
    assert rig.zclip.stats()["clipped_total"] == 2
    logged = rig.logger.records
    assert [s for _, s in logged] == [3, 7]  # the last step of each interval of 4
    assert logged[0][0] == {"zclip/clipped": 0.0}  # still warming up: no threshold yet
    assert logged[1][0]["zclip/clipped"] == 1.0  # step 6 only; step 8 is in the next interval
    assert logged[1][0]["zclip/threshold"] > logged[1][0]["zclip/ema_mean"] > 0
    rig.zclip.on_train_end(rig.trainer, rig.module)  # flushes the unfinished interval (steps 8-10)
    assert logged[2][1] == 10 and logged[2][0]["zclip/clipped"] == 1.0


def test_nonfinite_norm_is_neither_clipped_nor_counted():
    rig = Rig(ZClip(warmup_steps=5))
    for norm in WARMUP:
        rig.step(norm)
    before = rig.zclip.stats()
    for p in rig.layer.parameters():
        p.grad = torch.full_like(p, float("inf"))
    rig.zclip.on_before_optimizer_step(rig.trainer, rig.module, rig.opt)
    assert all(torch.isinf(p.grad).all() for p in rig.layer.parameters())
    after = rig.zclip.stats()
    assert (after["mean"], after["std"], after["clipped_total"]) == (before["mean"], before["std"], 0)


def test_state_dict_round_trip_and_stage_reset(tmp_path):
    rig = Rig(ZClip(warmup_steps=5))
    for norm in [*WARMUP, 1.05, 10.0]:
        rig.step(norm)
    torch.save(rig.zclip.state_dict(), tmp_path / "z.pt")
    state = torch.load(tmp_path / "z.pt", weights_only=True)

    restored = ZClip(warmup_steps=5)
    restored.load_state_dict(state)
    resumed = Rig(restored, task="a")  # same stage: continues
    assert restored.stats() == rig.zclip.stats()
    rig.step(7.0)
    resumed.step(7.0)
    assert resumed.grad_norm() == pytest.approx(rig.grad_norm(), rel=1e-6)
    assert restored.stats() == pytest.approx(rig.zclip.stats())

    fresh = ZClip(warmup_steps=5)
    fresh.load_state_dict(state)
    Rig(fresh, task="b")  # a new stage: statistics restart with a warm-up
    assert fresh.stats()["steps"] == 0 and not fresh.stats()["warmed_up"]


def test_must_come_after_gradient_stability():
    zclip = ZClip()
    with pytest.raises(ValueError, match="after GradientStability"):
        zclip.setup(SimpleNamespace(callbacks=[zclip, GradientStability()]), None, "fit")
    zclip.setup(SimpleNamespace(callbacks=[GradientStability(), zclip]), None, "fit")


def test_invalid_arguments():
    for kwargs, match in [
        ({"alpha": 1.0}, "alpha"),
        ({"z_thresh": 0}, "z_thresh"),
        ({"warmup_steps": 1}, "warmup_steps"),
        ({"mode": "zscore"}, "mode"),
        ({"log_every_n_steps": 0}, "log_every_n_steps"),
    ]:
        with pytest.raises(ValueError, match=match):
            ZClip(**kwargs)


def test_in_trainer_logged_norm_is_before_clipping():
    model = ContinualLM(
        model_config=TINY_LLAMA_CONFIG,
        adapter="crma",
    )
    model.prepare_tasks(["a"])
    model.begin_task("a")
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        ids = torch.randint(0, 200, (2, 12), generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "domain": "a"})
    spike_step = 4
    compute_loss = model.compute_loss

    def spiky_loss(batch, logits):  # a 50x loss spike at one step
        return compute_loss(batch, logits) * (50.0 if model.global_step == spike_step else 1.0)

    model.compute_loss = spiky_loss
    logger = MemoryLogger()
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=6,
        logger=[logger],
        callbacks=[GradientStability(), ZClip(warmup_steps=3)],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=3,
    )
    trainer.fit(model, DataLoader(batches, batch_size=1, collate_fn=lambda x: x[0]))
    norms = [m["grad/norm"] for m, _ in logger.with_key("grad/norm")]
    assert len(norms) == 6
    assert norms[spike_step] > 20 * max(norms[:spike_step])  # GradientStability saw the raw spike
    clipped = [(m["zclip/clipped"], s) for m, s in logger.with_key("zclip/clipped")]
    assert clipped == [(0.0, 2), (1.0, 5)]
    threshold = logger.with_key("zclip/threshold")[0][0]["zclip/threshold"]
    assert 0 < threshold < norms[spike_step]


def test_hooks_never_synchronise_with_the_host(monkeypatch):
    zclip, stability = ZClip(warmup_steps=2), GradientStability()
    rig = Rig(zclip, every=1000)
    stability.on_train_start(rig.trainer, rig.module)

    def forbidden(self, *args, **kwargs):
        raise AssertionError("host synchronisation inside the optimizer step")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
            patch.setattr(torch.Tensor, name, forbidden)
        for norm in (1.0, 1.1, 0.9, 30.0):  # warm-up, its last step, then a clipped spike
            for p, u in zip(rig.layer.parameters(), rig.unit):
                p.grad = u * norm
            stability.on_before_optimizer_step(rig.trainer, rig.module, rig.opt)
            zclip.on_before_optimizer_step(rig.trainer, rig.module, rig.opt)
            rig.loop._batches_that_stepped += 1  # the next optimizer step (its norm is computed afresh)
    assert zclip.stats()["clipped_total"] == 1
    assert stability.summary()["run"]["steps"] == 4
