"""The stage driver: all four modes, zero drift by construction, resume, checkpoint contents, pitfalls."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from tiny_models import TINY_LLAMA_CONFIG

from crma_lightning.data.datamodule import SequentialDomainDataModule
from crma_lightning.model.continual_lm import ContinualLM
from crma_lightning.run.runner import ContinualRunner

TINY = TINY_LLAMA_CONFIG
DOMAINS = ["prose", "code", "arithmetic"]
TRAINER = {
    "accelerator": "cpu",
    "max_steps": 3,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "log_every_n_steps": 1,
}


def make_model(adapter="lora", task_adapters="per_task", lr=0.01, crma=None):
    from functools import partial

    return ContinualLM(
        model_config=TINY,
        adapter=adapter,
        task_adapters=task_adapters,
        optimizer=partial(torch.optim.AdamW, lr=lr),
        crma=crma,
    )


def make_data(domains=DOMAINS):
    return SequentialDomainDataModule(
        domains=domains, max_length=32, batch_size=4, max_chars_per_domain=6000, max_eval_rows=8
    )


def run(tmp_path, adapter="lora", task_adapters="per_task", callbacks=None, name="run", crma=None, **kw):
    runner = ContinualRunner(run_dir=tmp_path / name, trainer_kwargs=dict(TRAINER), callbacks=callbacks, **kw)
    model = make_model(adapter, task_adapters, crma=crma)
    report = runner.run(model, make_data())
    return runner, model, report


@pytest.mark.parametrize("adapter", ["lora", "crma"])
@pytest.mark.parametrize("task_adapters", ["shared", "per_task"])
def test_three_stage_run_completes_in_every_mode(tmp_path, adapter, task_adapters):
    _runner, _, report = run(tmp_path, adapter, task_adapters)
    matrix = report["loss_matrix"]["values"]
    assert report["status"] == "complete" and report["completed_stages"] == 3
    assert len(matrix) == 4 and all(len(r) == 3 for r in matrix)
    # Row 0 (base) covers every domain; row s covers the domains seen so far.
    for s, row in enumerate(matrix):
        seen = 3 if s == 0 else s
        assert all(v is not None for v in row[:seen]), (s, row)
    for stage, domain in enumerate(DOMAINS, 1):
        assert (tmp_path / "run" / "checkpoints" / f"stage-{stage:02d}-{domain}.ckpt").exists()
        assert (tmp_path / "run" / "adapters" / f"stage-{stage:02d}-{domain}.safetensors").exists()
    on_disk = json.loads((tmp_path / "run" / "report.json").read_text())
    assert on_disk["loss_matrix"] == report["loss_matrix"]
    markdown = (tmp_path / "run" / "report.md").read_text()
    for s, row in enumerate(matrix):  # report.md renders the same numbers as report.json
        label = "base" if s == 0 else f"{s}: {DOMAINS[s - 1]}"
        cells = " | ".join("—" if v is None else f"{v:.4f}" for v in row)
        assert f"| {label} | {cells} |" in markdown


def test_lora_per_task_has_zero_drift_and_shared_does_not(tmp_path):
    _, _, frozen = run(tmp_path, "lora", "per_task", name="frozen")
    m = frozen["loss_matrix"]["values"]
    assert abs(m[3][0] - m[1][0]) < 1e-5 and abs(m[3][1] - m[2][1]) < 1e-5
    assert abs(frozen["metrics"]["drift_mean"]) < 1e-3
    _, _, naive = run(tmp_path, "lora", "shared", name="naive")
    n = naive["loss_matrix"]["values"]
    assert abs(n[2][0] - n[1][0]) > 1e-4  # stage 2 changed the adapter domain 1 is evaluated with


class _Recorder(L.Callback):
    """Which domain each stage's training batches came from, and each stage's step count."""

    def __init__(self):
        self.domains: list[set[str]] = []
        self.steps: list[int] = []

    def on_train_start(self, trainer, pl_module):
        self.domains.append(set())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.domains[-1].add(batch["domain"])

    def on_train_end(self, trainer, pl_module):
        self.steps.append(trainer.global_step)


def test_every_stage_trains_its_own_domain_for_its_full_budget(tmp_path):
    """Lightning pitfalls: a second fit with max_steps doing nothing (#11425) and stale train loaders."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rec = _Recorder()
    _runner, _, _ = run(tmp_path, "lora", "per_task", callbacks=[rec])
    assert rec.domains == [{"prose"}, {"code"}, {"arithmetic"}]
    assert rec.steps == [3, 3, 3]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    # Sorted: the per-stage event files' names need not sort in write order (see the crash test below).
    steps = sorted(e.step for e in events.Scalars("train/loss"))
    assert steps == [1, 2, 3, 5, 6, 7, 9, 10, 11], steps  # one continuous run; evaluations at 0, 4, 8, 12
    assert sorted(e.step for e in events.Scalars("val/prose/loss")) == [0, 4, 8, 12]


class _Crash(L.Callback):
    def __init__(self, stage_domain, at_step):
        self.stage_domain, self.at_step = stage_domain, at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.current_task == self.stage_domain and trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


@pytest.mark.parametrize("every", [None, 1])
def test_crash_in_stage_two_resumes_to_the_same_results(tmp_path, every):
    """Resume from the stage-1 checkpoint (every=None) or from a mid-stage checkpoint (every=1)."""
    _, _, reference = run(tmp_path, "crma", "per_task", name="ref")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path, "crma", "per_task", callbacks=[_Crash("code", 2)], name="crash", checkpoint_every_n_steps=every)
    partial = json.loads((tmp_path / "crash" / "report.json").read_text())
    assert partial["status"].startswith("failed") and partial["completed_stages"] == 1
    assert partial["loss_matrix"]["values"][1][0] == pytest.approx(reference["loss_matrix"]["values"][1][0], abs=1e-6)
    rec = _Recorder()
    _, _, resumed = run(tmp_path, "crma", "per_task", callbacks=[rec], name="crash")
    assert rec.domains[0] == {"code"}, "a finished stage was trained again"
    if every:
        assert len(rec.steps) == 2  # stage 2 continued from its mid-stage checkpoint
    ref_m, res_m = reference["loss_matrix"]["values"], resumed["loss_matrix"]["values"]
    for a, b in zip(ref_m, res_m):
        assert a == pytest.approx(b, abs=1e-5)
    # TensorBoard: what the crashed run logged past its checkpoint is purged, so the resumed curves have
    # exactly the uninterrupted run's steps - no duplicates, no gaps - and the same values.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def curve(name):
        events = EventAccumulator(str(tmp_path / name / "tensorboard"))
        events.Reload()
        # By step: each stage's trainer writes its own event file, and TensorBoard's file names
        # (time in seconds, host, pid, a per-process counter compared as text) do not sort in write
        # order when a fast test makes several within one second.
        return sorted((e.step, e.value) for e in events.Scalars("train/loss"))

    # Same steps exactly; values as the loss matrix above (rounding both to 5 digits flaked when a value sat
    # on a rounding boundary).
    crashed, ref = curve("crash"), curve("ref")
    assert [s for s, _ in crashed] == [s for s, _ in ref]
    assert [v for _, v in crashed] == pytest.approx([v for _, v in ref], abs=1e-5)


def test_mix_form_resumes_mid_stage_to_the_same_results(tmp_path):
    # The mix form's read projection is a QR of R~ and its optimizer state lives on R~: a mid-stage resume
    # must land on the uninterrupted run's numbers, and the files must say which form they hold.
    mix = {"form": "mix", "g_max": 0.5}
    _, _, reference = run(tmp_path, "crma", "per_task", name="ref", crma=mix)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(
            tmp_path,
            "crma",
            "per_task",
            callbacks=[_Crash("code", 2)],
            name="crash",
            checkpoint_every_n_steps=1,
            crma=mix,
        )
    _, _, resumed = run(tmp_path, "crma", "per_task", name="crash", crma=mix)
    for a, b in zip(reference["loss_matrix"]["values"], resumed["loss_matrix"]["values"]):
        assert a == pytest.approx(b, abs=1e-6)
    from crma_lightning.adapters import read_adapter_metadata

    saved = read_adapter_metadata(tmp_path / "crash" / "adapters" / "stage-03-arithmetic.safetensors")
    assert (saved["crma"]["form"], saved["crma"]["g_max"]) == ("mix", 0.5)
    with pytest.raises(ValueError, match="form"):  # the write form cannot resume the mix form's checkpoints
        run(tmp_path, "crma", "per_task", name="crash", crma={"form": "write"})


def test_stage_checkpoint_holds_no_base_weights(tmp_path):
    _runner, model, _ = run(tmp_path, "crma", "per_task")
    ckpt_path = tmp_path / "run" / "checkpoints" / "stage-03-arithmetic.ckpt"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    adapter_bytes = sum(v.numel() * v.element_size() for v in ckpt["state_dict"].values())
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    names = set(ckpt["state_dict"])
    assert all(".lora_" in n or ".crma." in n for n in names)
    assert adapter_bytes < base_bytes
    assert ckpt_path.stat().st_size < base_bytes + 4 * adapter_bytes + 200_000
    assert ckpt["optimizer_states"], "the stage checkpoint should keep the optimizer state"


def test_bad_budget_and_resume_settings(tmp_path):
    runner = ContinualRunner(run_dir=tmp_path / "nobudget", trainer_kwargs={"accelerator": "cpu"})
    with pytest.raises(ValueError, match="no per-stage budget for domain 'prose'"):
        runner.run(make_model(), make_data())
    assert not (tmp_path / "nobudget").exists()
    # Budgets on every domain are enough on their own.
    domains = [{"name": d, "builtin": d, "max_steps": 2} for d in DOMAINS[:2]]
    per_domain = ContinualRunner(run_dir=tmp_path / "perdomain", trainer_kwargs={**TRAINER, "max_steps": None})
    assert per_domain.run(make_model(), make_data(domains))["status"] == "complete"
    with pytest.raises(ValueError, match="max_steps=-5"):
        ContinualRunner(run_dir=tmp_path, trainer_kwargs={"max_steps": -5})
    with pytest.raises(ValueError, match="resume='sometimes'"):
        ContinualRunner(run_dir=tmp_path, trainer_kwargs={"max_steps": 1}, resume="sometimes")


def test_resume_refuses_a_changed_configuration(tmp_path):
    run(tmp_path, "lora", "per_task", name="r")
    runner = ContinualRunner(run_dir=tmp_path / "r", trainer_kwargs=dict(TRAINER))
    with pytest.raises(ValueError, match=r"configuration changed.*adapter: checkpoint 'lora' vs now 'crma'"):
        runner.run(make_model("crma", "per_task"), make_data())
    runner = ContinualRunner(run_dir=tmp_path / "r", trainer_kwargs=dict(TRAINER))
    with pytest.raises(ValueError, match=r"domains: checkpoint"):
        runner.run(make_model("lora", "per_task"), make_data(["code", "prose", "arithmetic"]))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        ContinualRunner(run_dir=tmp_path / "r", trainer_kwargs=dict(TRAINER), resume="never").run(
            make_model(), make_data()
        )


def test_eval_every_evaluates_full_rows_every_k_stages_and_keeps_the_end_of_run_metrics(tmp_path):
    domains = ["prose", "code", "arithmetic", "unicode"]

    def fit(name, **data):
        runner = ContinualRunner(run_dir=tmp_path / name, trainer_kwargs=dict(TRAINER))
        dm = SequentialDomainDataModule(domains=domains, max_length=32, batch_size=4, max_chars_per_domain=6000,
                                        max_eval_rows=8, **data)
        return runner.run(make_model(), dm)

    every, sparse = fit("every"), fit("sparse", eval_every=2)
    full, thin = every["loss_matrix"]["values"], sparse["loss_matrix"]["values"]
    present = [[v is not None for v in row] for row in thin]
    assert present == [
        [True] * 4,  # the base row: every domain
        [True, False, False, False],  # after stage 1: only the domain just trained
        [True, True, False, False],  # after stage 2 (every 2nd): every seen domain
        [False, False, True, False],  # after stage 3: only its diagonal entry
        [True] * 4,  # after the last stage: every seen domain
    ]
    # Training does not depend on what is evaluated: the entries both runs have agree, and so do the
    # end-of-run metrics (the last row and the diagonal).
    for s, row in enumerate(thin):
        for j, v in enumerate(row):
            if v is not None:
                assert v == pytest.approx(full[s][j], rel=1e-6), (s, j)
    for key in ("drift_mean", "bwt", "plasticity_mean"):
        assert sparse["metrics"][key] == pytest.approx(every["metrics"][key], rel=1e-6), key
    timings = sparse["timings"]["stages"]
    assert all(0.0 < t["eval_share"] < 1.0 for t in timings.values()), timings
    assert "End-of-stage evaluation: " in (tmp_path / "sparse" / "report.md").read_text()
    with pytest.raises(ValueError, match=r"eval_every=0 is invalid: expected an integer >= 1"):
        SequentialDomainDataModule(domains=domains, eval_every=0)
