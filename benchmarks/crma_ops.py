"""How many ops CRMA adds to a training step, and how that grows with depth (torch profiler, CPU or GPU).

For each depth, two identical Llama-style models (same seed), one with LoRA and one with LoRA+CRMA (same
LoRA), run one forward + backward under ``torch.profiler``; "ops CRMA adds" is the difference in recorded
aten ops. Counted twice: every recorded op, and only the ops that do work (views, reshapes, transposes and
other metadata-only ops left out: on a GPU they launch no kernel). CRMA's factors (Sinkhorn, norms,
implicit backward) are computed for all blocks at once, so only the per-token part - two thin matmuls per
block forward and their gradients - grows with depth; the ratio at 16 vs 4 layers shows how much.
``--per-block`` measures the old scheme (every block computing its own factors) for comparison.

``--fsdp2`` counts the same under FSDP2 (``apply_fsdp2``: every block and the root sharded, as in a run) on 2
gloo CPU processes (``--world``), on rank 0: there the adapters' shards are gathered in one collective and
their gradients reduce-scattered in one (``crma_lightning/adapters/crma_shards.py``). Collectives (``c10d::``
ops) are counted with the ops that do work.

Example::

    python benchmarks/crma_ops.py                       # 4 and 16 layers, hidden 128, CPU, seconds
    python benchmarks/crma_ops.py --layers 4,16,64 --per-block
    python benchmarks/crma_ops.py --fsdp2 --per-block --out runs/bench/crma_ops_fsdp2.json   # 2 gloo processes
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from crma_lightning.adapters import CRMAConfig, LoRAConfig, attach_adapters
from crma_lightning.adapters.crma_batch import per_block_factors

# Ops that only change metadata (no kernel launch on a GPU, no pass over memory on a CPU).
VIEW_OPS = {
    "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::t", "aten::transpose", "aten::permute",
    "aten::expand", "aten::as_strided", "aten::select", "aten::slice", "aten::unsqueeze", "aten::squeeze",
    "aten::detach", "aten::alias", "aten::unbind", "aten::split", "aten::split_with_sizes", "aten::chunk",
    "aten::narrow", "aten::diagonal", "aten::numpy_T", "aten::mT", "aten::matrix_H", "aten::lift_fresh",
    "aten::result_type", "aten::resolve_conj", "aten::resolve_neg", "aten::empty_like", "aten::empty",
    "aten::empty_strided", "aten::to", "aten::_unsafe_view", "aten::contiguous", "aten::flatten",
    "aten::unflatten", "aten::view_as", "aten::expand_as", "aten::is_nonzero", "aten::item",
    "aten::_local_scalar_dense", "aten::size", "aten::stride", "aten::is_same_size",
}  # fmt: skip


def build(layers: int, hidden: int, adapter: str, seed: int = 0) -> LlamaForCausalLM:
    """A Llama-style model (FFN 2x hidden, 4 heads) with LoRA r=8 on all linears, plus CRMA for ``adapter="crma"``."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    attach_adapters(model, adapter, LoRAConfig(r=8, alpha=16, target_modules="all-linear"), CRMAConfig())
    return model.train()


def step_ops(model: torch.nn.Module, ids: torch.Tensor) -> tuple[int, int]:
    """``(all ops, ops that do work)`` recorded by the profiler in one forward + backward of ``model``.

    Ops are counted where they are dispatched (the CPU side), also on a GPU: each one that does work is a
    kernel launch there. Collectives (``c10d::``) count as ops that do work.
    """
    from torch.profiler import ProfilerActivity, profile

    model(input_ids=ids, labels=ids).loss.backward()  # warm-up: lazy initialisations stay out of the count
    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    names = [e.name for e in prof.events() if e.name.startswith(("aten::", "c10d::"))]
    return len(names), sum(name not in VIEW_OPS for name in names)


def crma_added_ops(
    layers: int,
    hidden: int = 128,
    seq: int = 16,
    per_block: bool = False,
    device: str = "cpu",
    shard: Callable[[torch.nn.Module], object] | None = None,
) -> dict[str, int]:
    """Ops of a LoRA+CRMA step minus those of the same LoRA step, at ``layers`` blocks (``shard``: e.g. FSDP2)."""
    ids = torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(0)).to(device)
    counts = {}
    for adapter in ("lora", "crma"):
        model = build(layers, hidden, adapter).to(device)
        if shard is not None:
            shard(model)
        with per_block_factors() if per_block and adapter == "crma" else contextlib.nullcontext():
            counts[adapter] = step_ops(model, ids)
    (lora_all, lora_work), (crma_all, crma_work) = counts["lora"], counts["crma"]
    return {"all": crma_all - lora_all, "work": crma_work - lora_work}


def _fsdp2_worker(rank: int, world: int, port: int, jobs: list, hidden: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from crma_lightning.parallel.fsdp2 import apply_fsdp2

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        results = [crma_added_ops(d, hidden, per_block=pb, shard=lambda m: apply_fsdp2(m, mesh)) for d, pb in jobs]
        if rank == 0:
            with open(out, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def fsdp2_added_ops(jobs: list[tuple[int, bool]], hidden: int = 128, world: int = 2) -> list[dict[str, int]]:
    """:func:`crma_added_ops` under FSDP2 on ``world`` gloo CPU processes, one ``(layers, per_block)`` per job."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ops.json")
        mp.spawn(_fsdp2_worker, args=(world, port, jobs, hidden, out), nprocs=world)
        with open(out) as f:
            return json.load(f)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="4,16", help="comma-separated depths; ratios are to the first")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--per-block", action="store_true", help="also measure every block computing its own factors")
    p.add_argument("--device", default="cpu", help="e.g. cuda")
    p.add_argument("--fsdp2", action="store_true", help="under FSDP2 on --world gloo CPU processes")
    p.add_argument("--world", type=int, default=2, help="processes for --fsdp2")
    p.add_argument("--out", default=None, help="also write the counts to this JSON file")
    args = p.parse_args(argv)
    depths = [int(x) for x in args.layers.split(",")]
    schemes = {"batched": False, **({"per-block": True} if args.per_block else {})}
    results: dict[str, dict[int, dict[str, int]]] = {}
    where = f"FSDP2 on {args.world} gloo CPU processes (rank 0)" if args.fsdp2 else args.device
    print(f"ops CRMA adds to one forward+backward (LoRA r=8 all-linear + CRMA defaults), hidden {args.hidden}, "
          f"{where}, torch {torch.__version__}")  # fmt: skip
    if args.fsdp2:
        jobs = [(d, pb) for pb in schemes.values() for d in depths]
        counts = iter(fsdp2_added_ops(jobs, args.hidden, args.world))
        measured = {scheme: {d: next(counts) for d in depths} for scheme in schemes}
    print("| factors | layers | ops added (all) | per block | ratio to first | ops added (doing work) | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for scheme, per_block in schemes.items():
        if args.fsdp2:
            results[scheme] = measured[scheme]
        else:
            results[scheme] = {
                d: crma_added_ops(d, args.hidden, per_block=per_block, device=args.device) for d in depths
            }
        first = results[scheme][depths[0]]
        for d in depths:
            r = results[scheme][d]
            print(f"| {scheme} | {d} | {r['all']} | {r['all'] / d:.1f} | {r['all'] / first['all']:.2f} | "
                  f"{r['work']} | {r['work'] / first['work']:.2f} |")  # fmt: skip
    if len(depths) > 1:
        r = results["batched"]
        a, b = depths[0], depths[-1]
        work, every = r[b]["work"] / r[a]["work"], r[b]["all"] / r[a]["all"]
        verdict = "meets" if work <= 1.3 else "MISSES"
        print(f"batched, {b} vs {a} layers: ratio {work:.2f} of the ops doing work ({every:.2f} of all recorded ops); "
              f"target <= 1.3 (ops doing work, 16 vs 4 layers): {verdict}")  # fmt: skip
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"settings": vars(args), "torch": torch.__version__, "ops_added": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
