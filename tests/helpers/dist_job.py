"""Multi-process continual runs for ``tests/parallel/test_distributed.py`` (run as a script, never under pytest).

Lightning's launcher re-executes ``sys.argv`` once per extra process, so each 2-process job is this
script run as a subprocess::

    python tests/helpers/dist_job.py fsdp2 OUT_DIR     # FSDP2 (AdapterModelParallelStrategy), 2 CPU processes
    python tests/helpers/dist_job.py fsdp1 OUT_DIR     # FSDP1 (AdapterFSDPStrategy), 2 CPU processes
    python tests/helpers/dist_job.py ddp OUT_DIR       # DDP, 2 CPU processes

Every process runs the same scenarios; rank 0 writes ``OUT_DIR/result.json``. The single-process
reference uses the same functions in the test process (``strategy="single"``).

Scenarios (``fsdp2`` all; ``fsdp1`` all but ``lora_bf16``; ``ddp`` the first only):

* ``ref``: a 2-stage CRMA + per-task LoRA run.
* ``crash``: the same run, killed by an exception at step 2 of stage 2 with a checkpoint every step,
  then resumed in the same processes from the mid-stage ``last.ckpt`` (``trainer.fit(ckpt_path=...)``).
* ``boundary``: a new run directory resumed from ``ref``'s stage-1 checkpoint (``ContinualRunner``
  loads the module state before any sharding).
* ``nan``: a NaN put into rank 1's gradient shard at one step: ``NonFiniteGuard`` must skip that step
  on both ranks (each rank writes ``nan-rank<r>.json``).
* ``bf16``: FSDP2 with ``fsdp_mixed_precision="bf16"``, FSDP1 with a bf16 ``MixedPrecision`` policy;
  ``lora_bf16``: FSDP2 bf16 with LoRA only.
* ``mix`` (``fsdp2``, ``fsdp1``): the ``ref`` run with CRMA's ``mix`` form (:data:`MIX_CRMA`).
* ``replay``, ``ewc``, ``olora`` (``fsdp2`` and ``ddp``): the continual methods (:data:`METHODS`) on a shared
  LoRA (O-LoRA: one LoRA per task).
* ``rank0``, ``rank0_pissa`` (``fsdp2``, ``fsdp1``): the ``ref`` run (and one with CRMA's PiSSA init) with
  ``init_on_rank0=True``: rank 1 builds on the meta device and receives its shards from rank 0.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from functools import partial
from pathlib import Path

import lightning as L
import torch
from tiny_models import TINY_LLAMA_CONFIG

from crma_lightning.data.datamodule import SequentialDomainDataModule
from crma_lightning.methods import build_method
from crma_lightning.model.continual_lm import ContinualLM
from crma_lightning.run.runner import ContinualRunner

TINY = TINY_LLAMA_CONFIG
DOMAINS = ["prose", "code"]
GLOBAL_BATCH = 4
STEPS = 3
WORLD = 2
# 5 held-out rows in batches of 2: 2 ranks get 3 and 2 rows, i.e. 2 and 1 batches - uneven on purpose.
EVAL_ROWS = 5
EVAL_BATCH = 2
# Replay: 1 buffer row of 2 per process = 2 of 4 in one process (the same global batches). EWC: a large
# lambda, so that the penalty (and its gradient on the shards) visibly changes stage 2's results.
METHODS = {
    "replay": ("replay", {"buffer_size": 8, "ratio": 0.5}),
    "ewc": ("ewc", {"lam": 1.0e5, "fisher_samples": 2}),
    "olora": ("olora", {"lam": 1.0e3, "lam2": 1.0}),  # strong, so both penalty terms move the second stage
}


MIX_CRMA = {"form": "mix", "g_max": 0.5}
"""The ``mix`` scenario's CRMA: the orthonormal-row (QR) read projection, a gate up to 0.5."""
PISSA_CRMA = {"init": "pissa"}
"""The ``rank0_pissa`` scenario's CRMA: read projections initialised from the base weights (on rank 0 only)."""


def make_model(
    mixed_precision: str | None = None,
    adapter: str = "crma",
    dtype: str = "float32",
    method: str | None = None,
    crma: dict | None = None,
    init_on_rank0: bool = False,
) -> ContinualLM:
    name, kwargs = METHODS[method] if method else (None, {})
    return ContinualLM(
        init_on_rank0=init_on_rank0,
        dtype=dtype,
        crma=crma,
        model_config=TINY,
        adapter="lora" if method else adapter,
        task_adapters="shared" if method and method != "olora" else "per_task",  # O-LoRA: one LoRA per task
        method=build_method(name, **kwargs) if name else None,
        optimizer=partial(torch.optim.AdamW, lr=0.01),
        fsdp_mixed_precision=mixed_precision,
        fsdp_activation_checkpointing=True,  # used by FSDP1/FSDP2 only; numerically a no-op
    )


def make_data(world: int) -> SequentialDomainDataModule:
    return SequentialDomainDataModule(
        domains=DOMAINS,
        max_length=32,
        batch_size=GLOBAL_BATCH // world,  # per process: the global batch is the same for any world size
        eval_batch_size=EVAL_BATCH,
        max_chars_per_domain=6000,
        max_eval_rows=EVAL_ROWS,
    )


def make_strategy(name: str):
    if name == "fsdp2":
        from crma_lightning.parallel import AdapterModelParallelStrategy

        # A short collective timeout: a hang fails the job in seconds instead of 30 minutes.
        timeout = timedelta(seconds=90)
        return AdapterModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1, timeout=timeout)
    if name in ("fsdp1", "fsdp1_bf16"):
        from torch.distributed.fsdp import MixedPrecision

        from crma_lightning.parallel import AdapterFSDPStrategy

        # fsdp1_bf16: a bf16 policy for the base's units; the adapters' units keep float32 (apply_fsdp1).
        policy = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if name != "fsdp1" else None
        return AdapterFSDPStrategy(timeout=timedelta(seconds=90), mixed_precision=policy)
    if name == "ddp":
        return "ddp"
    return "auto"


def trainer_kwargs(name: str) -> dict:
    return {
        "accelerator": "cpu",
        "devices": 1 if name == "single" else WORLD,
        "strategy": make_strategy(name),
        "max_steps": STEPS,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
    }


class Crash(L.Callback):
    """Raise on every rank at ``step`` of the stage training ``domain``."""

    def __init__(self, domain: str, step: int) -> None:
        self.domain, self.step = domain, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.current_task == self.domain and trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class NaNGradient(L.Callback):
    """At global step ``step``, put a NaN into the first non-empty local gradient shard of rank ``rank``.

    Runs before ``ContinualLM.on_before_optimizer_step`` (Lightning calls callbacks first), so the
    guard sees a non-finite gradient on that rank only.
    """

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_rank != self.rank or trainer.global_step != self.step:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                if local is not None and local.numel():
                    local.view(-1)[0] = float("nan")
                    return


def run(
    run_dir: Path,
    strategy: str,
    callbacks=None,
    mixed_precision=None,
    adapter="crma",
    dtype="float32",
    method=None,
    crma=None,
    init_on_rank0=False,
    **kwargs,
):
    """One continual run (``method``: a key of :data:`METHODS`); returns the final report and the model.

    With ``init_on_rank0`` each rank writes ``meta-rank<r>.json``: whether it built the model on the meta device.
    """
    world = 1 if strategy == "single" else WORLD
    runner = ContinualRunner(
        run_dir=run_dir, trainer_kwargs=trainer_kwargs(strategy), callbacks=callbacks, seed=0, **kwargs
    )
    model = make_model(mixed_precision, adapter, dtype, method, crma, init_on_rank0)
    if init_on_rank0:
        from crma_lightning.parallel.rank0_init import has_meta_tensors

        rank = os.environ.get("LOCAL_RANK", "0")
        (run_dir.parent / f"meta-{run_dir.name}-rank{rank}.json").write_text(json.dumps(has_meta_tensors(model.model)))
    return runner.run(model, make_data(world)), model


def sharding_facts(model: ContinualLM) -> dict:
    """How the model ended up: FSDP2 units, DTensor parameters, local shard sizes, checkpointed blocks."""
    from torch.distributed._composable.contract import _get_registry
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from crma_lightning.adapters import find_decoder_layers

    params = dict(model.model.named_parameters())
    _, layers = find_decoder_layers(model.model)
    return {
        "fsdp_units": sum(isinstance(m, FSDPModule) for m in model.modules()),
        "all_dtensor": all(isinstance(p, DTensor) for p in params.values()),
        "global_numel": sum(p.numel() for p in params.values()),
        "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params.values()),
        "checkpointed_blocks": sum("checkpoint" in (_get_registry(b) or {}) for b in layers),
        "blocks": len(layers),
    }


def fsdp1_sharding_facts(model: ContinualLM) -> dict:
    """How FSDP1 wrapped the model: units by what they wrap, local shard sizes, frozen/trainable mixing."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from crma_lightning.adapters import CRMAAdapter, CRMABlock

    units = [m for m in model.modules() if isinstance(m, FSDP)]
    kinds = [type(u.module).__name__ for u in units]
    # use_orig_params=True: each original parameter is a view of this rank's part of its flat parameter.
    local = sum(p.numel() for p in model.model.parameters())
    # Frozen and trainable parameters never share a flat parameter (the PEFT recipe: no gradient
    # memory for frozen weights). `_flat_param._params`: the unit's original parameters (an FSDP1 internal).
    mixed = [k for u, k in zip(units, kinds) if len({p.requires_grad for p in u._flat_param._params}) > 1]
    return {
        "fsdp_units": len(units),
        "crma_units": sum(isinstance(u.module, CRMAAdapter) for u in units),
        "block_units": sum(isinstance(u.module, CRMABlock) for u in units),
        "lora_factor_units": kinds.count("Linear"),
        "root_is_unit": isinstance(model.model, FSDP),
        "local_numel": local,
        "units_mixing_frozen_and_trainable": mixed,
    }


def fsdp1_dtypes(model: ContinualLM) -> dict:
    """Per kind of FSDP1 unit: the dtypes its flat parameters are stored in and computed with.

    Compute dtype: the unit's mixed precision ``param_dtype``, else its storage dtype.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    seen: dict[str, dict[str, set]] = {"storage": {}, "compute": {}}
    for unit in (m for m in model.modules() if isinstance(m, FSDP)):
        kind = type(unit.module).__name__  # Linear (a LoRA factor), CRMAAdapter, CRMABlock, LlamaForCausalLM
        storage = unit._flat_param.dtype  # an FSDP1 internal
        seen["storage"].setdefault(kind, set()).add(str(storage))
        seen["compute"].setdefault(kind, set()).add(str(unit.mixed_precision.param_dtype or storage))
    return {what: {kind: sorted(d) for kind, d in kinds.items()} for what, kinds in seen.items()}


def count_factor_sources() -> dict:
    """Counts, from now on, of CRMA forwards with the step's batched factors and with their own factors."""
    from crma_lightning.adapters import crma

    counts, apply = {"batched": 0, "own": 0}, crma.apply_step_factors

    def counting(adapter, flat):
        out = apply(adapter, flat)
        counts["batched" if out is not None else "own"] += 1
        return out

    crma.apply_step_factors = counting
    return counts


def fsdp2_crma_ops() -> dict:
    """Ops CRMA adds to a step under FSDP2 (``benchmarks/crma_ops.py``, tiny sizes) at 4 and 16 layers, by depth."""
    import importlib.util

    from torch.distributed.device_mesh import init_device_mesh

    from crma_lightning.parallel.fsdp2 import apply_fsdp2

    spec = importlib.util.spec_from_file_location("crma_ops", Path(__file__).parents[2] / "benchmarks" / "crma_ops.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    return {
        layers: bench.crma_added_ops(layers, hidden=32, seq=8, shard=lambda m: apply_fsdp2(m, mesh))
        for layers in (4, 16)
    }


def main(strategy: str, out: Path) -> None:
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    result: dict = {"strategy": strategy}
    factor_sources = count_factor_sources()
    ref, model = run(out / "ref", strategy)
    result["factor_sources"] = dict(factor_sources)
    result["ref"] = ref["loss_matrix"]["values"]
    result["world_size"] = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if strategy in ("fsdp2", "fsdp1"):
        result["sharding"] = sharding_facts(model) if strategy == "fsdp2" else fsdp1_sharding_facts(model)
        try:
            run(out / "crash", strategy, callbacks=[Crash("code", 2)], checkpoint_every_n_steps=1)
            raise AssertionError("the simulated crash did not happen")
        except RuntimeError as err:
            assert "simulated crash" in str(err), err
        result["crash_had_last_ckpt"] = (out / "crash" / "checkpoints" / "last.ckpt").exists()
        result["crash"] = run(out / "crash", strategy)[0]["loss_matrix"]["values"]
        stage1 = out / "ref" / "checkpoints" / "stage-01-prose.ckpt"
        result["boundary"] = run(out / "boundary", strategy, resume=str(stage1))[0]["loss_matrix"]["values"]
        _, nan_model = run(out / "nan", strategy, callbacks=[NaNGradient(rank=1, step=1)])
        (out / f"nan-rank{rank}.json").write_text(json.dumps(nan_model.nonfinite.state_dict()))
        result["mix"] = run(out / "mix", strategy, crma=MIX_CRMA)[0]["loss_matrix"]["values"]
        # Rank 0 loads, rank 1 builds on the meta device and receives its shards (docs/distributed.md).
        result["rank0"] = run(out / "rank0", strategy, init_on_rank0=True)[0]["loss_matrix"]["values"]
        pissa = run(out / "rank0_pissa", strategy, crma=PISSA_CRMA, init_on_rank0=True)[0]
        result["rank0_pissa"] = pissa["loss_matrix"]["values"]
    if strategy == "fsdp1":
        report, bf16_model = run(out / "bf16", "fsdp1_bf16")
        result["bf16"] = report["loss_matrix"]["values"]
        result["bf16_dtypes"] = fsdp1_dtypes(bf16_model)
        # A bf16 base under precision "32-true": the base must stay bf16 (not be cast to float32).
        report, base_model = run(out / "bf16_base", "fsdp1", dtype="bfloat16")
        result["bf16_base"] = report["loss_matrix"]["values"]
        result["bf16_base_dtypes"] = fsdp1_dtypes(base_model)
    if strategy == "fsdp2":
        result["bf16"] = run(out / "bf16", strategy, mixed_precision="bf16")[0]["loss_matrix"]["values"]
        # LoRA only: the blocks are the decoder layers themselves, and none has a trainable parameter
        # at the first forward (base-model evaluation) - the hard case for FSDP2's gradient dtypes.
        report, lora_model = run(out / "lora_bf16", strategy, mixed_precision="bf16", adapter="lora")
        result["lora_bf16"] = report["loss_matrix"]["values"]
        result["lora_sharding"] = sharding_facts(lora_model)
        result["fsdp2_crma_ops"] = fsdp2_crma_ops()
    if strategy in ("fsdp2", "ddp"):
        for method in METHODS:
            report, _ = run(out / method, strategy, method=method)
            result[method] = {"matrix": report["loss_matrix"]["values"]}
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], Path(sys.argv[2]))
