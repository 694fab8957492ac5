"""Peak host memory of every rank while a sharded run starts: each rank loading the base vs rank 0 only.

``prepare`` builds a Llama-style base of about 1.3 GB (float32) from a config and saves it with
``save_pretrained`` (safetensors). ``measure`` starts a 2-process CPU (gloo) run on it through Lightning
with ``AdapterModelParallelStrategy`` (FSDP2) or ``AdapterFSDPStrategy`` (FSDP1), LoRA + CRMA attached, up to
the point where the model is sharded (``Trainer(max_steps=0)``: everything of start-up, no training step),
and every rank reports its peak resident memory (``VmHWM``), its memory after the imports (the process
baseline), the bytes of its own shards and of the whole model. ``--init-on-rank0`` uses
``ContinualLM(init_on_rank0=True)``: rank 0 loads, rank 1 builds on the meta device and receives its shards.

Targets (issue 25): rank != 0 at most its shard + 25 % + the baseline; rank 0 at most one full copy + its
shard + the baseline.

Example (a few minutes on 2 cores, ~6 GB of RAM at peak without ``--init-on-rank0``)::

    python benchmarks/startup_memory.py prepare /tmp/base-1b
    python benchmarks/startup_memory.py measure /tmp/base-1b --strategy fsdp2
    python benchmarks/startup_memory.py measure /tmp/base-1b --strategy fsdp2 --init-on-rank0
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

MIB = 2**20
BASE = {  # ~324M parameters: 1.3 GB in float32
    "hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 8, "num_attention_heads": 12,
    "num_key_value_heads": 12, "vocab_size": 32000, "max_position_embeddings": 512,
}  # fmt: skip


def vm_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process from ``/proc/self/status``, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def prepare(directory: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**BASE, bos_token_id=None, eos_token_id=None, pad_token_id=None))
    model.save_pretrained(directory)
    size = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    print(f"saved {sum(p.numel() for p in model.parameters()):,} parameters ({size / 2**30:.2f} GiB) to {directory}")


def measure(
    directory: Path,
    strategy_name: str,
    init_on_rank0: bool,
    out: Path | None,
    accelerator: str = "cpu",
    devices: int = 2,
) -> None:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from crma_lightning.adapters import CRMAConfig, LoRAConfig
    from crma_lightning.model.continual_lm import ContinualLM
    from crma_lightning.parallel import AdapterFSDPStrategy, AdapterModelParallelStrategy
    from crma_lightning.parallel.dist import to_local

    torch.set_num_threads(1)
    baseline_kib = vm_kib("VmRSS")
    model = ContinualLM(
        model_name_or_path=str(directory), tokenizer="byte", adapter="crma", task_adapters="shared",
        lora=LoRAConfig(r=8, target_modules=["q_proj", "v_proj"]), crma=CRMAConfig(), init_on_rank0=init_on_rank0,
    )  # fmt: skip
    strategy = (
        AdapterModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)
        if strategy_name == "fsdp2"
        else AdapterFSDPStrategy()
    )
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, max_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    full = sum(p.numel() * p.element_size() for p in model.model.parameters())  # meta tensors have shapes too
    trainer.fit(model, train_dataloaders=DataLoader([0]))  # max_steps=0: set up and shard, no step
    # FSDP2: DTensor shards; FSDP1 (use_orig_params): each parameter is a view of this rank's part of its unit.
    local = sum(to_local(p).numel() * p.element_size() for p in model.model.parameters())
    rank = trainer.global_rank
    record = {
        "rank": rank, "strategy": strategy_name, "init_on_rank0": init_on_rank0,
        "peak_mib": vm_kib("VmHWM") / 1024, "baseline_mib": baseline_kib / 1024,
        "shard_mib": local / MIB, "full_mib": full / MIB,
    }  # fmt: skip
    if rank == 0:
        limit = record["full_mib"] + record["shard_mib"] + record["baseline_mib"]
    else:
        limit = 1.25 * record["shard_mib"] + record["baseline_mib"]
    record["target_mib"] = limit
    print(json.dumps(record))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{rank}.json").write_text(json.dumps(record))


def table(directory: Path) -> None:
    """Print the records of ``measure --json-dir`` runs below ``directory`` as a markdown table."""
    print("| strategy | loading | rank | peak RSS MiB | baseline MiB | shard MiB | full MiB | target MiB | meets |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for path in sorted(directory.glob("*/rank*.json")):
        r = json.loads(path.read_text())
        loading = "rank 0 only" if r["init_on_rank0"] else "every rank"
        print(f"| {r['strategy']} | {loading} | {r['rank']} | {r['peak_mib']:.0f} | {r['baseline_mib']:.0f} | "
              f"{r['shard_mib']:.0f} | {r['full_mib']:.0f} | {r['target_mib']:.0f} | "
              f"{'yes' if r['peak_mib'] <= r['target_mib'] else 'NO'} |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["prepare", "measure", "table"])
    p.add_argument("directory", type=Path, help="where the base is saved (table: the records' parent)")
    p.add_argument("--strategy", choices=["fsdp2", "fsdp1"], default="fsdp2")
    p.add_argument("--init-on-rank0", action="store_true")
    p.add_argument("--json-dir", type=Path, default=None, help="write each rank's record here")
    p.add_argument("--accelerator", default="cpu", help="cpu (gloo) or gpu (nccl; the shards then live on GPUs)")
    p.add_argument("--devices", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "prepare":
        prepare(args.directory)
    elif args.command == "measure":
        measure(args.directory, args.strategy, args.init_on_rank0, args.json_dir, args.accelerator, args.devices)
    else:
        table(args.directory)


if __name__ == "__main__":
    main()
