"""ContinualLM: task adapters, trainable sets, parameter groups, hooks, checkpoint contents."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from tiny_models import TINY_LLAMA_CONFIG
from torch.utils.data import DataLoader

from crma_lightning.adapters import adapter_parameter_names, crma_adapters, lora_adapter_names
from crma_lightning.model.continual_lm import ContinualLM

TINY = TINY_LLAMA_CONFIG


def make(**kw) -> ContinualLM:
    kw.setdefault("model_config", TINY)
    return ContinualLM(**kw)


def batches(n=4, seed=0, domain="a"):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (2, 16), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(), "domain": domain})
    return out


def fit(model, data, steps=4):
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=None))
    return trainer


def trainable(model):
    return {n for n, p in model.model.named_parameters() if p.requires_grad}


def test_per_task_adapters_freeze_earlier_tasks_and_crma_keeps_training():
    m = make(adapter="crma", task_adapters="per_task")
    m.prepare_tasks(["a", "b"])
    assert lora_adapter_names(m.model) == ["a", "b"]
    m.begin_task("a")
    t = trainable(m)
    assert any(".lora_A.a." in n for n in t) and not any(".lora_A.b." in n for n in t)
    assert any(".crma." in n for n in t)
    m.begin_task("b")
    t = trainable(m)
    assert not any(".lora_A.a." in n for n in t) and any(".lora_B.b." in n for n in t)
    assert t <= set(adapter_parameter_names(m.model))


def test_shared_mode_trains_one_adapter_for_every_task():
    m = make(adapter="lora", task_adapters="shared")
    m.prepare_tasks(["a", "b"])
    assert lora_adapter_names(m.model) == ["shared"]
    m.begin_task("b")
    assert m.adapter_for("a") == m.adapter_for("b") == "shared"
    assert not any(".crma." in n for n in trainable(m))


def test_adapter_init_is_independent_of_creation_order():
    a = make(task_adapters="per_task")
    a.prepare_tasks(["x", "y"])
    b = make(task_adapters="per_task")
    b.begin_task("x")
    b.begin_task("y")  # created lazily, one at a time
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_changes_only_the_active_task_adapter_and_crma():
    m = make(adapter="crma", task_adapters="per_task")
    m.prepare_tasks(["a", "b"])
    m.begin_task("a")
    fit(m, batches())
    m.begin_task("b")
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    fit(m, batches(seed=1, domain="b"))
    after = m.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert all(".lora_A.b." in k or ".lora_B.b." in k or ".crma." in k for k in changed), changed
    assert any(".crma." in k for k in changed)


def test_state_dict_holds_adapters_only_and_round_trips():
    m = make(adapter="crma", task_adapters="per_task")
    m.prepare_tasks(["a"])
    m.begin_task("a")
    fit(m, batches())
    sd = m.state_dict()
    assert set(sd) == {f"model.{n}" for n in adapter_parameter_names(m.model)}
    base_keys = [k for k in m.model.state_dict() if "base_layer" in k and "lora" not in k]
    assert base_keys and not any(f"model.{k}" in sd for k in base_keys)
    fresh = make(adapter="crma", task_adapters="per_task")
    fresh.prepare_tasks(["a"])
    fresh.load_state_dict(sd)
    x = batches(1)[0]["input_ids"]
    fresh.activate_task("a")
    m.activate_task("a")
    assert torch.equal(fresh(x), m(x))
    with pytest.raises(ValueError, match="missing"):
        fresh.load_state_dict({k: v for k, v in list(sd.items())[1:]})


def test_param_groups_give_lambda_gate_and_projections_their_own_learning_rates():
    m = make(adapter="crma", crma_structural_lr=0.05, crma_gate_lr=0.2, crma_projection_lr=0.003)
    m.begin_task("a")
    groups = {g["name"]: g for g in m.param_groups()}
    assert set(groups) == {"lora", "crma", "crma_structural", "crma_gate"}
    assert (groups["crma_structural"]["lr"], groups["crma_gate"]["lr"], groups["crma"]["lr"]) == (0.05, 0.2, 0.003)
    assert "lr" not in groups["lora"]  # the optimizer's own
    blocks = len(list(crma_adapters(m.model)))
    assert [p.shape for p in groups["crma_structural"]["params"]] == [(4, 4)] * blocks
    assert [p.shape for p in groups["crma_gate"]["params"]] == [(1,)] * blocks
    assert len(groups["crma"]["params"]) == 2 * blocks  # R~ and W~ of every block
    opt = m.configure_optimizers()
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs["crma_gate"] == 0.2 and lrs["crma"] == 0.003 and lrs["lora"] == opt.defaults["lr"]
    # Unset: every group uses the optimizer's learning rate.
    plain = make(adapter="crma")
    plain.begin_task("a")
    assert all("lr" not in g for g in plain.param_groups())


def test_hyperparameters_hold_a_subclass_own_arguments_as_plain_values(tmp_path):
    class WithPenalty(ContinualLM):
        def __init__(self, *args, penalty: float = 0.5, schedule: tuple = (1, 2), **kwargs):
            super().__init__(*args, **kwargs)
            self.penalty = penalty

    m = WithPenalty(model_config=TINY, adapter="crma", penalty=0.25, crma={"g_max": 0.2})
    hp = m.hparams
    assert hp["penalty"] == 0.25 and hp["schedule"] == [1, 2] and hp["adapter"] == "crma"
    assert hp["crma"]["g_max"] == 0.2 and isinstance(hp["lora"], dict)
    assert "optimizer" not in hp and "self" not in hp and "kwargs" not in hp
    path = tmp_path / "hp.pt"
    torch.save(dict(hp), path)
    assert torch.load(path, weights_only=True) == dict(hp)  # plain data: loadable without pickle


def test_research_subclass_needs_only_a_few_lines():
    class L2Adapters(ContinualLM):
        def __init__(self, *args, l2: float = 0.5, **kwargs):
            super().__init__(*args, **kwargs)
            self.l2 = l2
            self.started = []

        def compute_loss(self, batch, logits):
            penalty = sum(p.pow(2).sum() for _, p in self.trainable_parameters())
            return super().compute_loss(batch, logits) + self.l2 * penalty

        def on_task_start(self, task, index):
            self.started.append((task, index))

    m = L2Adapters(model_config=TINY, adapter="lora")
    m.begin_task("a")
    b = batches(1)[0]
    logits = m(b["input_ids"])
    base = ContinualLM.compute_loss(m, b, logits)
    assert m.compute_loss(b, logits) > base
    assert m.started == [("a", 0)]


def test_generate_returns_text_and_restores_the_task():
    m = make(adapter="lora", task_adapters="per_task")
    m.prepare_tasks(["a", "b"])
    m.begin_task("b")
    out = m.generate(["12 + 3 = ", "def "], task="a", max_new_tokens=5, do_sample=False)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    assert m.current_task == "b"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task_adapters": "sometimes"}, r"task_adapters='sometimes'.*\['shared', 'per_task'\]"),
        ({"adapter": "dora"}, r"adapter='dora'.*\['lora', 'crma'\]"),
        ({"dtype": "float8"}, r"dtype='float8'"),
        ({"model_config": {"hidden_size": 8}}, "model_type"),
        ({"model_config": {**TINY, "vocab_size": 100}}, "vocab_size=100 is too small: the tokenizer has 259 tokens"),
        ({"lora": {"r": 0}}, r"rank r=0"),
    ],
)
def test_bad_model_settings(kwargs, match):
    from crma_lightning.adapters import LoRAConfig

    with pytest.raises(ValueError, match=match):  # a LoRAConfig checks itself when built
        if isinstance(kwargs.get("lora"), dict):
            kwargs["lora"] = LoRAConfig(**kwargs["lora"])
        make(**kwargs)


def test_nonfinite_steps_are_skipped_then_stop():
    from crma_lightning.model.nonfinite import NonFiniteError

    m = make(adapter="lora", max_nonfinite_steps=3)
    m.begin_task("a")

    class Poisoned(ContinualLM):
        pass

    before = {k: v.clone() for k, v in m.state_dict().items()}
    original = m.compute_loss
    m.compute_loss = lambda batch, logits: original(batch, logits) * float("nan")
    with pytest.raises(NonFiniteError, match="3 consecutive"):
        fit(m, batches(6), steps=6)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a NaN step updated the weights"
    assert m.nonfinite.skipped == 3


def test_warmup_cosine_schedule_and_its_validation():
    from crma_lightning.model.optim import WarmupCosine

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = WarmupCosine(opt, warmup_steps=2, total_steps=10, min_ratio=0.1)
    rates = []
    for _ in range(12):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert rates[:3] == pytest.approx([0.5, 1.0, 1.0])
    assert rates[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 4 / 8)).item()))
    assert rates[-1] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="min_ratio=2"):
        WarmupCosine(opt, min_ratio=2)


def test_loads_a_local_pretrained_model_and_tokenizer(tmp_path):
    """`model_name_or_path` takes any local directory written by `save_pretrained` (no hub access)."""
    source = make(adapter="lora")
    from crma_lightning.adapters import detach_adapters

    detach_adapters(source.model)
    source.model.save_pretrained(tmp_path / "base")
    source.tokenizer.save_pretrained(tmp_path / "base")
    loaded = ContinualLM(model_name_or_path=str(tmp_path / "base"), adapter="crma", dtype="bfloat16")
    assert loaded.model.training, "from_pretrained returns eval mode; training must see dropout like any model"
    assert loaded.tokenizer.eos_token == "<|eos|>" and len(loaded.tokenizer) == 259
    assert next(p for n, p in loaded.model.named_parameters() if "base_layer" in n).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for n, p in loaded.model.named_parameters() if p.requires_grad)
    ids = batches(1)[0]["input_ids"]
    assert torch.isfinite(loaded(ids)).all()


def test_subclass_state_is_checkpointed_and_resumed_stages_skip_on_task_start():
    class WithFisher(ContinualLM):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.register_buffer("fisher", torch.zeros(3))
            self.started = []

        def on_task_start(self, task, index):
            self.started.append(task)

    m = WithFisher(model_config=TINY, adapter="lora")
    m.fisher += 7
    sd = m.state_dict()
    assert torch.equal(sd["fisher"], torch.full((3,), 7.0)), "a subclass's own state must reach checkpoints"
    fresh = WithFisher(model_config=TINY, adapter="lora")
    fresh.load_state_dict(sd)  # strict: the subclass's key is expected, not "unexpected"
    assert torch.equal(fresh.fisher, m.fisher)
    fresh.begin_task("a", resumed=True)  # continuing a stage from a mid-stage checkpoint
    fresh.begin_task("b")
    assert fresh.started == ["b"] and fresh.current_task == "b"


def test_load_from_checkpoint_rebuilds_the_module(tmp_path):
    m = make(adapter="crma")
    m.begin_task("a")
    trainer = fit(m, batches(2), steps=2)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    restored = ContinualLM.load_from_checkpoint(path, weights_only=True)
    assert restored.lora_config == m.lora_config and restored.tasks == ["a"]
    x = batches(1)[0]["input_ids"]
    assert torch.equal(restored(x), m(x))


def test_load_from_checkpoint_rebuilds_the_method_from_its_hyperparameters(tmp_path):
    from crma_lightning.methods import EWC

    m = make(adapter="lora", task_adapters="shared", method=EWC(lam=5.0, fisher_samples=3, online=True))
    m.begin_task("a")
    trainer = fit(m, batches(2), steps=1)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    restored = ContinualLM.load_from_checkpoint(path, weights_only=True)
    assert isinstance(restored.method, EWC) and restored.method.config() == m.method.config()
    assert restored.hparams["method"] == {"name": "ewc", "lam": 5.0, "fisher_samples": 3, "online": True, "gamma": 1.0}


def test_adapter_type_is_checked_before_the_base_model_loads(tmp_path):
    """A typo in `adapter` must not cost a base-model load (minutes for a 7B) before it is reported."""
    with pytest.raises(ValueError, match=r"adapter='crmaa' is not supported: expected one of \['lora', 'crma'\]"):
        ContinualLM(model_name_or_path=str(tmp_path / "no-such-model"), adapter="crmaa")


def test_resume_and_adapter_files_check_the_same_crma_settings(tmp_path):
    from crma_lightning.adapters import CRMAConfig
    from crma_lightning.adapters.serialization import read_crma_settings
    from crma_lightning.model.identity import model_identity_differences
    from crma_lightning.parallel.export import export_adapters

    m = make(adapter="crma", crma={"g_max": 0.2, "sinkhorn_iters": 7})
    assert (
        m.identity()["crma"]
        == m.crma_config.identity()
        == {
            "form": "write",
            "norm": "spectral",
            "n_streams": 4,
            "stream_rank": 4,
            "g_max": 0.2,
        }
    )
    assert make(adapter="lora").crma_config is None and make(adapter="lora").identity()["crma"] is None
    # A checkpoint whose identity recorded every CRMA field (older runs) still resumes; a changed
    # solver setting is not a difference for either check, a changed g_max is for both.
    old_style = {**m.identity(), "crma": {**vars(CRMAConfig(g_max=0.2)), "sinkhorn_iters": 9}}
    assert model_identity_differences(old_style, m.identity()) == []
    other = make(adapter="crma", crma={"g_max": 0.3})
    assert model_identity_differences(m.identity(), other.identity()) == [
        "crma: checkpoint {'form': 'write', 'norm': 'spectral', 'n_streams': 4, 'stream_rank': 4, 'g_max': 0.2} "
        "vs now {'form': 'write', 'norm': 'spectral', 'n_streams': 4, 'stream_rank': 4, 'g_max': 0.3}"
    ]
    # Every adapter-file writer records the CRMA settings (the sharding-aware export included).
    path = export_adapters(m.model, tmp_path / "a.safetensors", metadata={"stage": 1})
    assert read_crma_settings(path) == {"version": 2, **vars(m.crma_config)}


def test_the_batch_and_the_per_row_token_loss_are_one_definition():
    from crma_lightning.losses import row_token_losses
    from crma_lightning.methods.base import lm_loss

    torch.manual_seed(0)
    logits, labels = torch.randn(3, 9, 11), torch.randint(0, 11, (3, 9))
    labels[0, :4] = -100
    labels[2, 6:] = -100
    total, count = ContinualLM.token_losses(logits, labels)
    rows, counts = row_token_losses(logits, labels)
    assert torch.allclose(rows.sum(), total) and int(counts.sum()) == int(count) == 3 * 8 - 3 - 3
    m = make(adapter="lora")
    batch = batches(1)[0]
    assert torch.equal(lm_loss(m, batch), m.compute_loss(batch, m(batch["input_ids"], batch["attention_mask"])))
