"""Multi-process training on CPU (gloo): FSDP2, FSDP1 and DDP against the single-process run, checkpoints, resume.

Each 2-process job is ``tests/helpers/dist_job.py`` run as a subprocess (Lightning's launcher re-executes
``sys.argv`` for the second process, so it must never start inside the pytest process). The
single-process reference runs here, with the same seed, data and global batch (per-process batch =
global batch / 2; :class:`~crma_lightning.data.sampling.GlobalBatchSampler` makes the global batches the
same), so the runs must agree up to float reduction order.

Tolerances (measured differences on this machine are about 1e-6 or smaller):

* loss matrix, FSDP2/FSDP1/DDP vs one process: absolute 1e-4 per entry (losses are about 5.4 nats);
* gradient norm of the first optimizer step: relative 1e-5 (later steps: relative 1e-4);
* resumed runs (mid-stage and stage boundary) vs the uninterrupted run (FSDP2, FSDP1): absolute 1e-6;
* FSDP2 with ``fsdp_mixed_precision="bf16"``, FSDP1 with a bf16 ``MixedPrecision``, vs float32: absolute 0.02;
* a 2-process checkpoint evaluated in one process vs the 2-process evaluation: absolute 1e-5.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from dist_launch import assert_matrices_close, grad_norms, launch, load_job
from safetensors.torch import load_file

from crma_lightning.adapters import read_adapter_metadata
from crma_lightning.callbacks.domain_evaluation import DomainEvaluation
from crma_lightning.data.datamodule import Collator
from crma_lightning.data.sampling import (
    EvalShardSampler,
    PaddedEvalLoader,
    equalize_eval_batches,
    eval_batches_per_rank,
)
from crma_lightning.parallel import AdapterFSDPStrategy, AdapterModelParallelStrategy

# Launcher/rendezvous variables from an enclosing distributed run would make the job join it.

dist_job = load_job("dist_job")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    report, _ = dist_job.run(out / "ref", "single")
    return out, report["loss_matrix"]["values"]


@pytest.fixture(scope="module")
def single_mix(tmp_path_factory):
    report, _ = dist_job.run(tmp_path_factory.mktemp("single_mix") / "mix", "single", crma=dist_job.MIX_CRMA)
    return report["loss_matrix"]["values"]


@pytest.mark.distributed
@pytest.mark.parametrize("job", ["fsdp2", "fsdp1"])
def test_two_process_mix_form_matches_single_process(request, single_mix, job):
    # The mix form's read projection is a QR of the full R~: the shards must be gathered before it.
    _, result = request.getfixturevalue(job)
    assert_matrices_close(result["mix"], single_mix, abs_tol=1e-4)
    assert result["mix"][2][0] != pytest.approx(result["ref"][2][0], abs=1e-6)  # another function than ref's


@pytest.fixture(scope="module")
def single_pissa(tmp_path_factory):
    report, _ = dist_job.run(tmp_path_factory.mktemp("single_pissa") / "pissa", "single", crma=dist_job.PISSA_CRMA)
    return report["loss_matrix"]["values"]


@pytest.mark.distributed
@pytest.mark.parametrize("job", ["fsdp2", "fsdp1"])
def test_loading_on_rank0_only_gives_the_same_losses(request, single_pissa, job):
    """init_on_rank0: rank 1 builds on the meta device and gets its shards from rank 0; same numbers as before."""
    out, result = request.getfixturevalue(job)
    built_on_meta = [json.loads((out / f"meta-rank0-rank{r}.json").read_text()) for r in (0, 1)]
    assert built_on_meta == [False, True]
    # The same processes, the same seed: every loss (stage 0 = the first forward, and after each stage)
    # equals the run that built the whole model on every rank - bit for bit, shards copied, not recomputed.
    assert result["rank0"] == result["ref"]
    first_steps = [grad_norms(out / run, "train/loss")[0] for run in ("ref", "rank0")]
    assert first_steps[0] == first_steps[1]
    # PiSSA reads the base weights, which only rank 0 has: its adapters' numbers reach rank 1 by the broadcast.
    assert_matrices_close(result["rank0_pissa"], single_pissa, abs_tol=1e-4)
    assert result["rank0_pissa"][1][0] != pytest.approx(result["ref"][1][0], abs=1e-6)  # PiSSA is another start


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    return out, launch("fsdp2", out)


@pytest.fixture(scope="module")
def fsdp1(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp1")
    return out, launch("fsdp1", out)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return out, launch("ddp", out)


# ---------------------------------------------------------------------- 2-process runs
@pytest.mark.distributed
@pytest.mark.parametrize("job", ["fsdp2", "fsdp1", "ddp"])
def test_two_process_continual_run_matches_single_process(request, single, job):
    out, result = request.getfixturevalue(job)
    assert result["world_size"] == 2
    assert_matrices_close(result["ref"], single[1], abs_tol=1e-4)
    report = json.loads((out / "ref" / "report.json").read_text())
    assert report["status"] == "complete" and report["completed_stages"] == 2


@pytest.fixture(scope="module")
def single_methods(tmp_path_factory):
    """One-process runs of each continual method (same global batches as the 2-process ones)."""
    out = tmp_path_factory.mktemp("single_methods")
    return {m: dist_job.run(out / m, "single", method=m) for m in dist_job.METHODS}


@pytest.mark.distributed
@pytest.mark.parametrize("job", ["fsdp2", "ddp"])
@pytest.mark.parametrize("method", sorted(dist_job.METHODS))
def test_two_process_continual_method_matches_single_process(request, single_methods, job, method):
    # Replay: the same buffer and the same global batches; EWC: the same Fisher (every rank reads the same
    # global batches) and the same penalty gradient on each shard (FSDP2) or replica (DDP); O-LoRA: its
    # penalty over whole (gathered) LoRA weights - before, a DTensor penalty crashed the FSDP2 backward.
    out, result = request.getfixturevalue(job)
    report, model = single_methods[method]
    assert_matrices_close(result[method]["matrix"], report["loss_matrix"]["values"], abs_tol=1e-4)
    if method == "ewc":  # the penalty acted: stage 2 ended elsewhere than without it
        assert model.method.tasks == dist_job.DOMAINS and model.method_summary()["state_bytes"] > 0
    if method == "olora":
        assert model.method.trained == dist_job.DOMAINS
    ckpt = torch.load(out / method / "checkpoints" / "stage-01-prose.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["continual_method"]["name"] == method  # whole tensors: loadable without the process group


@pytest.mark.distributed
def test_fsdp2_really_shards_every_block_and_the_root(fsdp2):
    facts = fsdp2[1]["sharding"]
    assert facts["fsdp_units"] == 2 * facts["blocks"] + 1  # each block (CRMABlock), its CRMA adapter, the root
    assert facts["all_dtensor"]
    # Each of the 2 ranks holds about half of every parameter (dim-0 shards, the odd row rounds up).
    assert facts["global_numel"] / 2 <= facts["local_numel"] < 0.51 * facts["global_numel"]
    assert facts["checkpointed_blocks"] == facts["blocks"]  # fsdp_activation_checkpointing=True


@pytest.mark.distributed
def test_ops_crma_adds_under_fsdp2_barely_grow_with_depth(fsdp2):
    # benchmarks/crma_ops.py --fsdp2 at hidden 32 on the job's 2 processes; loosely (the benchmark prints the
    # 1.3 target): 4x the blocks may cost at most 1.5x the ops that do work (per block: ~4x before).
    ops = fsdp2[1]["fsdp2_crma_ops"]
    shallow, deep = ops["4"], ops["16"]
    assert deep["work"] <= 1.5 * shallow["work"], ops


@pytest.mark.distributed
@pytest.mark.parametrize("job", ["fsdp2", "ddp"])
def test_sharded_crma_blocks_use_the_factors_of_all_blocks_computed_together(request, job):
    # Under FSDP2 the adapters' shards are gathered in one collective at the model's pre-forward; no block
    # computes its own factors, in training (activation checkpointing's recomputation included) or evaluation.
    sources = request.getfixturevalue(job)[1]["factor_sources"]
    assert sources["batched"] > 0 and sources["own"] == 0, sources


@pytest.mark.distributed
@pytest.mark.parametrize("job", ["fsdp2", "fsdp1", "ddp"])
def test_logged_gradient_norm_matches_single_process(request, single, job):
    out, _ = request.getfixturevalue(job)
    expected, actual = grad_norms(single[0] / "ref"), grad_norms(out / "ref")
    assert len(actual) == len(expected) == 2 * dist_job.STEPS
    assert actual[0] == pytest.approx(expected[0], rel=1e-5)
    assert actual == pytest.approx(expected, rel=1e-4)


@pytest.mark.distributed
def test_fsdp1_wraps_each_adapter_apart_from_the_frozen_base(fsdp1):
    facts = fsdp1[1]["sharding"]
    layers, targets, tasks = 2, 7, len(dist_job.DOMAINS)  # tiny Llama, LoRA on all 7 linears, one LoRA per task
    assert facts["lora_factor_units"] == layers * targets * tasks * 2  # lora_A[task] and lora_B[task]
    assert facts["crma_units"] == facts["block_units"] == layers
    assert facts["root_is_unit"] and facts["fsdp_units"] == facts["lora_factor_units"] + 2 * layers + 1
    # No flat parameter holds both frozen and trainable weights: no gradient memory for frozen ones.
    assert facts["units_mixing_frozen_and_trainable"] == []
    model = dist_job.make_model()
    model.prepare_tasks(dist_job.DOMAINS)
    total = sum(p.numel() for p in model.model.parameters())
    assert total / 2 <= facts["local_numel"] < 0.51 * total  # rank 0 holds half of every flat parameter


@pytest.mark.distributed
@pytest.mark.parametrize("job", ["fsdp2", "fsdp1"])
def test_crma_health_of_sharded_adapters_matches_single_process(request, single, job):
    # The adapters are gathered from their shards (FSDP1: their own units, onto rank 0) before the
    # spectral norms and Sinkhorn errors are computed.
    out, _ = request.getfixturevalue(job)
    for tag in ("crma/spectral_norm_max", "crma/gate_mean", "crma/row_sum_error_max"):
        expected, actual = grad_norms(single[0] / "ref", tag), grad_norms(out / "ref", tag)
        assert len(actual) == len(expected) == 2 * dist_job.STEPS, tag
        assert actual == pytest.approx(expected, rel=1e-4, abs=1e-6), tag


@pytest.mark.distributed
@pytest.mark.parametrize("job", ["fsdp2", "fsdp1"])
def test_sharded_run_resumes_mid_stage_and_at_a_stage_boundary(request, job):
    _, result = request.getfixturevalue(job)
    assert result["crash_had_last_ckpt"], "the crash should have left a mid-stage checkpoint"
    # Identical to the uninterrupted run only if the adapters AND the AdamW state were restored.
    assert_matrices_close(result["crash"], result["ref"], abs_tol=1e-6)
    assert_matrices_close(result["boundary"], result["ref"], abs_tol=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("job", ["fsdp2", "fsdp1"])
def test_nonfinite_gradient_on_one_rank_is_skipped_on_both(request, job):
    out, _ = request.getfixturevalue(job)
    states = [json.loads((out / f"nan-rank{r}.json").read_text()) for r in range(2)]
    # A NaN was put into rank 1's gradient shard at step 1 of each stage; rank 0's shards were finite.
    assert states[0]["skipped"] == states[1]["skipped"] == 2
    assert states[0]["skipped_steps"] == states[1]["skipped_steps"]


@pytest.mark.distributed
@pytest.mark.parametrize("job", ["fsdp2", "fsdp1"])
def test_bf16_mixed_precision_trains_close_to_float32(request, job):
    _, result = request.getfixturevalue(job)
    assert_matrices_close(result["bf16"], result["ref"], abs_tol=0.02)


@pytest.mark.distributed
def test_fsdp1_bf16_policy_leaves_the_adapters_in_float32(fsdp1):
    # A bf16 MixedPrecision policy applies to the base's units only; adapters keep float32 weights and math.
    dtypes = fsdp1[1]["bf16_dtypes"]["compute"]
    assert dtypes["Linear"] == dtypes["CRMAAdapter"] == ["torch.float32"]  # LoRA factors and CRMA
    assert dtypes["CRMABlock"] == dtypes["LlamaForCausalLM"] == ["torch.bfloat16"]  # the base's units


@pytest.mark.distributed
def test_fsdp1_keeps_a_bf16_base_in_bf16_under_32_true(fsdp1):
    # Lightning's FSDPStrategy would cast the whole model to float32 under precision "32-true".
    result = fsdp1[1]
    for what in ("storage", "compute"):
        dtypes = result["bf16_base_dtypes"][what]
        assert dtypes["CRMABlock"] == dtypes["LlamaForCausalLM"] == ["torch.bfloat16"], what
        assert dtypes["Linear"] == dtypes["CRMAAdapter"] == ["torch.float32"], what
    assert_matrices_close(result["bf16_base"], result["ref"], abs_tol=0.05)


@pytest.mark.distributed
def test_fsdp2_lora_only_shards_the_decoder_layers_and_trains_in_bf16(fsdp2):
    _, result = fsdp2
    facts = result["lora_sharding"]
    assert facts["fsdp_units"] == facts["blocks"] + 1 and facts["all_dtensor"]
    matrix = result["lora_bf16"]
    assert matrix[1][0] < matrix[0][0] and matrix[2][1] < matrix[0][1]  # each stage learned its domain
    assert matrix[2][0] == pytest.approx(matrix[1][0], abs=1e-6)  # per-task LoRA: zero drift


@pytest.mark.distributed
@pytest.mark.parametrize("job", ["fsdp2", "fsdp1"])
def test_sharded_stage_two_trains_its_adapter_while_the_first_stays_frozen(request, single, job):
    adapters = request.getfixturevalue(job)[0] / "ref" / "adapters"
    s1, s2 = load_file(adapters / "stage-01-prose.safetensors"), load_file(adapters / "stage-02-code.safetensors")
    assert set(s1) == set(s2)
    prose = [k for k in s1 if ".lora_B.prose." in k]
    code = [k for k in s1 if ".lora_B.code." in k]
    crma = [k for k in s1 if ".crma.write_weight" in k]
    assert prose and code and crma
    assert all(torch.equal(s1[k], s2[k]) for k in prose)  # frozen in stage 2
    assert all(not s1[k].any() for k in code) and all(s2[k].any() for k in code)  # zero-init, then trained
    assert any(not torch.equal(s1[k], s2[k]) for k in crma)  # the CRMA backbone trains in every stage
    # The gathered export holds the same tensors, under the same names, as the single-process one.
    reference = load_file(single[0] / "ref" / "adapters" / "stage-02-code.safetensors")
    assert set(reference) == set(s2)
    for k, v in reference.items():
        torch.testing.assert_close(s2[k], v, atol=2e-4, rtol=1e-3)  # Adam: near-zero grads amplify sum-order noise
    assert read_adapter_metadata(adapters / "stage-02-code.safetensors")["domain"] == "code"


@pytest.mark.distributed
@pytest.mark.parametrize("job", ["fsdp2", "fsdp1", "ddp"])
def test_two_process_checkpoint_holds_adapters_only_and_reproduces_its_losses_in_one_process(request, single, job):
    out, result = request.getfixturevalue(job)
    ckpt = torch.load(out / "ref" / "checkpoints" / "stage-02-code.ckpt", map_location="cpu", weights_only=True)
    model = dist_job.make_model()
    model.on_load_checkpoint(ckpt)  # creates the per-task adapters, as the stage driver does
    state = ckpt["state_dict"]
    assert set(state) == set(model.checkpoint_parameter_names())  # adapters only: no base weight
    assert all(".lora_" in k or ".crma." in k for k in state)
    assert all(type(v) is torch.Tensor for v in state.values())  # full tensors, not DTensor shards
    reference = torch.load(
        single[0] / "ref" / "checkpoints" / "stage-02-code.ckpt", map_location="cpu", weights_only=True
    )
    for k, v in reference["state_dict"].items():
        torch.testing.assert_close(state[k], v, atol=2e-4, rtol=1e-3)  # as above

    model.load_state_dict(state)
    # The optimizer state has the single-process layout: it loads into a 1-process AdamW.
    optimizer = torch.optim.AdamW(model.param_groups(), lr=0.01)
    optimizer.load_state_dict(ckpt["optimizer_states"][0])
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(optimizer.state) == len(params)
    assert all(optimizer.state[p]["exp_avg"].shape == p.shape for p in params)

    data = dist_job.make_data(world=1)
    data.prepare(model.tokenizer)
    data.set_stage(1)
    evaluation = DomainEvaluation(log_heatmap=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[evaluation],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(model, datamodule=data, verbose=False)
    expected = dict(zip(dist_job.DOMAINS, result["ref"][2]))
    assert evaluation.last_losses == pytest.approx(expected, abs=1e-5)


# ---------------------------------------------------------------------- single-process pieces
def test_eval_batches_per_rank_follows_the_eval_shards():
    assert eval_batches_per_rank(5, 2, 2) == [1, 2]  # shards of 2 and 3 rows
    assert eval_batches_per_rank(8, 2, 4) == [1, 1]
    assert eval_batches_per_rank(1, 4, 2) == [0, 0, 0, 1]
    assert eval_batches_per_rank(9, 4, 1) == [2, 2, 2, 3]  # sizes differ by one at most: no rank is left empty
    for n, world, batch in [(5, 2, 2), (7, 3, 2), (1, 4, 2)]:
        sizes = [len(EvalShardSampler(list(range(n)), world, r)) for r in range(world)]
        assert eval_batches_per_rank(n, world, batch) == [-(-s // batch) for s in sizes]


def test_padded_eval_loader_adds_zero_token_batches_to_the_short_rank():
    rows = [{"input_ids": list(range(1, 2 + i))} for i in range(5)]
    collate = Collator(pad_id=0, domain="d")
    short = torch.utils.data.DataLoader(rows, batch_size=2, sampler=EvalShardSampler(rows, 2, 0), collate_fn=collate)
    long = torch.utils.data.DataLoader(rows, batch_size=2, sampler=EvalShardSampler(rows, 2, 1), collate_fn=collate)
    padded = equalize_eval_batches(short)
    assert isinstance(padded, PaddedEvalLoader) and len(padded) == len(equalize_eval_batches(long)) == 2
    batches = list(padded)
    assert len(batches) == 2
    assert (batches[0]["labels"] != -100).any()
    assert (batches[1]["labels"] == -100).all() and batches[1]["domain"] == "d"
    even = torch.utils.data.DataLoader(rows[:4], batch_size=2, sampler=EvalShardSampler(rows[:4], 2, 1))
    assert equalize_eval_batches(even) is even


def test_bad_distributed_settings_are_refused():
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        AdapterModelParallelStrategy(tensor_parallel_size=2)
    with pytest.raises(ValueError, match="auto_wrap_policy"):
        AdapterFSDPStrategy(auto_wrap_policy={torch.nn.Linear})
    with pytest.raises(ValueError, match="state_dict_type='sharded'"):
        AdapterFSDPStrategy(state_dict_type="sharded")
    AdapterFSDPStrategy(state_dict_type="full")  # what --print_config writes back: accepted
    with pytest.raises(ValueError, match="use_orig_params=False"):
        AdapterFSDPStrategy(use_orig_params=False)
    with pytest.raises(ValueError, match="fsdp_mixed_precision='fp32'"):
        dist_job.ContinualLM(model_config=dist_job.TINY, fsdp_mixed_precision="fp32")
