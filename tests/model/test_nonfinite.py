"""The non-finite guard decides on the device with a fused optimizer, and training makes no host sync per step."""

from __future__ import annotations

import collections
import traceback
from functools import partial

import lightning as L
import pytest
import torch
from tiny_models import TINY_LLAMA_CONFIG

from crma_lightning import _compat
from crma_lightning.callbacks.zclip import ZClip
from crma_lightning.data.datamodule import SequentialDomainDataModule
from crma_lightning.model.continual_lm import ContinualLM
from crma_lightning.model.nonfinite import NonFiniteError, NonFiniteGuard, skips_on_device
from crma_lightning.model.optim import prefer_fused
from crma_lightning.run.runner import ContinualRunner

SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__")
"""Tensor methods that copy a value to the host: on a GPU each one waits for the device to finish."""

TRANSFORMERS_MASK = "transformers/masking_utils.py"
"""transformers checks every forward's mask (or, with none, the position ids) on the host: its own, one per step."""


def params(n: int = 3) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3, generator=gen)) for _ in range(n)]


def set_grads(ps: list[torch.nn.Parameter], bad: bool) -> torch.Tensor:
    for i, p in enumerate(ps):
        p.grad = torch.full_like(p, 0.5 + i)
    if bad:
        ps[1].grad[0, 0] = float("nan")
    return sum(p.grad.pow(2).sum() for p in ps)


# ---------------------------------------------------------------------------------------------- prefer_fused
def test_adamw_left_at_its_defaults_is_built_fused_with_its_groups_and_settings():
    ps = params()
    opt = torch.optim.AdamW([{"params": ps[:2], "name": "lora", "lr": 0.1}, {"params": ps[2:], "name": "crma"}],
                            lr=0.01, betas=(0.8, 0.9), weight_decay=0.05)
    fused = prefer_fused(opt)
    assert type(fused) is torch.optim.AdamW and fused is not opt
    assert [g["fused"] for g in fused.param_groups] == [True, True]
    assert [(g["name"], g["lr"], g["betas"], g["weight_decay"]) for g in fused.param_groups] == [
        ("lora", 0.1, (0.8, 0.9), 0.05), ("crma", 0.01, (0.8, 0.9), 0.05)]
    assert [p for g in fused.param_groups for p in g["params"]] == ps


@pytest.mark.parametrize("build", [
    lambda ps: torch.optim.AdamW(ps, foreach=False),  # the configuration chose an implementation
    lambda ps: torch.optim.AdamW(ps, fused=False),
    lambda ps: torch.optim.SGD(ps, lr=0.1),  # not an Adam
    lambda ps: torch.optim.RMSprop(ps),
], ids=["foreach_false", "fused_false", "sgd", "rmsprop"])
def test_other_optimizers_and_explicit_choices_are_kept(build):
    opt = build(params())
    assert prefer_fused(opt) is opt


def test_the_fused_step_equals_the_default_step():
    a, b = params(), params()
    plain, fused = torch.optim.AdamW(a, lr=0.01), prefer_fused(torch.optim.AdamW(b, lr=0.01))
    for _ in range(3):
        set_grads(a, False), set_grads(b, False)
        plain.step(), fused.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- the guard
def test_a_fused_optimizer_skips_a_bad_step_on_the_device_and_counts_it_at_the_flush():
    ps = params()
    opt = prefer_fused(torch.optim.AdamW(ps, lr=0.01))
    guard = NonFiniteGuard(max_consecutive=5)
    guard.stage = "code"
    assert skips_on_device(opt)
    assert guard.check(opt, step=0, square_norm=set_grads(ps, False), on_device=True) is None
    opt.step()
    weights = [p.detach().clone() for p in ps]
    moments = [opt.state[p]["exp_avg"].clone() for p in ps]
    assert guard.check(opt, step=1, square_norm=set_grads(ps, True), on_device=True) is None
    opt.step()
    assert all(torch.equal(p, w) for p, w in zip(ps, weights)), "the NaN step moved a weight"
    assert all(torch.equal(opt.state[p]["exp_avg"], m) for p, m in zip(ps, moments))
    assert all(float(opt.state[p]["step"]) == 1.0 for p in ps), "a skipped step is not counted by Adam"
    assert guard.skipped == 0, "counted only at the flush"
    guard.flush()
    assert (guard.skipped, guard.consecutive, guard.skipped_steps, guard.per_stage) == (1, 1, [1], {"code": 1})
    assert guard.check(opt, step=2, square_norm=set_grads(ps, False), on_device=True) is None
    opt.step()
    assert not torch.equal(ps[0], weights[0]), "a finite step after a skipped one updates"
    assert guard.state_dict()["consecutive"] == 0, "a saved state includes the pending decisions"


def test_consecutive_bad_steps_raise_at_the_flush_naming_the_last_one():
    ps = params()
    opt = prefer_fused(torch.optim.AdamW(ps))
    guard = NonFiniteGuard(max_consecutive=3)
    guard.stage = "code"
    for step in range(5):
        guard.check(opt, step=step, square_norm=set_grads(ps, step >= 1), on_device=True)
        opt.step()
    with pytest.raises(NonFiniteError, match=r"3 consecutive .*step 3 of stage 'code'"):
        guard.flush()
    assert guard.skipped_steps == [1, 2, 3]


def test_a_state_saved_past_the_limit_raises_at_the_next_flush_not_while_saving():
    ps = params()
    opt = prefer_fused(torch.optim.AdamW(ps))
    guard = NonFiniteGuard(max_consecutive=2)
    for step in range(2):
        guard.check(opt, step=step, square_norm=set_grads(ps, True), on_device=True)
    assert guard.state_dict()["consecutive"] == 2
    with pytest.raises(NonFiniteError, match="2 consecutive"):
        guard.flush()


def test_optimizers_without_a_device_skip_decide_at_once():
    ps = params()
    opt = torch.optim.SGD(ps, lr=0.1)
    guard = NonFiniteGuard(max_consecutive=3)
    assert not skips_on_device(opt)
    assert guard.check(opt, step=0, square_norm=set_grads(ps, True), on_device=True) is True
    assert all(p.grad is None for p in ps) and guard.skipped == 1
    assert guard.check(opt, step=1, square_norm=set_grads(ps, False), on_device=True) is False
    assert guard.consecutive == 0


# ---------------------------------------------------------------------------------------------- host syncs
class _StepOf(L.Callback):
    """Tells the counter which optimizer step the training loop is in (``None`` outside training batches)."""

    def __init__(self, state: dict) -> None:
        self.state = state

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        self.state["step"] = trainer.global_step
        # The step number Lightning logs with (the stage driver carries it across stages).
        self.state["logged_as"][trainer.global_step] = _compat.logging_step(trainer)

    def on_validation_start(self, *args) -> None:
        self.state["step"] = None

    def on_train_end(self, *args) -> None:
        self.state["step"] = None


@pytest.mark.parametrize(("adapter", "task_adapters"), [("lora", "shared"), ("crma", "per_task")],
                         ids=["naive_lora", "modular_crma"])
def test_training_steps_make_no_host_sync_between_logging_steps(tmp_path, monkeypatch, adapter, task_adapters):
    """NAIVE and MODULAR with ZClip, GradientStability and the non-finite guard on: syncs only at logging steps."""
    state: dict = {"step": None, "logged_as": {}}
    syncs: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)

    def counting(name):
        original = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            if state["step"] is not None:
                frames = traceback.extract_stack(limit=12)[:-1]
                site = "transformers mask" if any(TRANSFORMERS_MASK in f.filename for f in frames) else (
                    f"{frames[-1].filename}:{frames[-1].lineno}")
                syncs[state["step"]][site] += 1
            return original(self, *args, **kwargs)

        return method

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    steps, every = 12, 4
    model = ContinualLM(model_config=TINY_LLAMA_CONFIG, adapter=adapter, task_adapters=task_adapters,
                        optimizer=partial(torch.optim.AdamW, lr=1e-3))
    dm = SequentialDomainDataModule(domains=["prose"], max_length=32, batch_size=4, max_chars_per_domain=4000,
                                    max_eval_rows=4)
    runner = ContinualRunner(run_dir=tmp_path / "run", resume="never", callbacks=[ZClip(), _StepOf(state)],
                             trainer_kwargs={"accelerator": "cpu", "max_steps": steps, "log_every_n_steps": every,
                                             "enable_progress_bar": False, "enable_model_summary": False})
    runner.run(model, dm)
    assert model.nonfinite.enabled and sorted(syncs) == list(range(steps))
    logging_batches = {s for s, logged in state["logged_as"].items() if (logged + 1) % every == 0}
    assert len(logging_batches) == steps // every
    flushes = logging_batches | {steps - 1}  # and the end of the stage flushes what is left
    between = {s: dict(c) for s, c in syncs.items() if s not in flushes and set(c) - {"transformers mask"}}
    assert between == {}, f"host syncs on steps between logging steps: {between}"
    assert all(syncs[s]["transformers mask"] <= 1 for s in syncs), dict(syncs)
    at_logging = [sum(c.values()) - c["transformers mask"] for s, c in syncs.items() if s in flushes]
    assert all(n <= 8 for n in at_logging), at_logging  # a few batched transfers, not one per parameter
