"""Training-step overhead of our adapters: LoRA vs LoRA+CRMA vs PEFT's LoRA on the same Llama-style model.

Each variant gets an identical base model (same seed), frozen, with LoRA of the same rank on the same
target modules. One full training step (forward, LM loss, backward, AdamW step) is timed per variant,
interleaved A, B, C, A, B, C, ... after a warm-up, all in one process, so that drifts in machine load hit
every variant alike. Reported: the median step time per variant and the ratios CRMA/LoRA and ours/PEFT
(ratio of medians, and the median of the per-round paired ratios).

``--widths 256,512,1024`` repeats the measurement per hidden size (FFN width scaled with it, 688/256) and
ends with a table of how CRMA/LoRA moves with width. ``--crma-form``/``--crma-norm``/``--crma-iters`` pick
the CRMA variant; ``--no-peft`` drops the PEFT variant (a third faster).

Example::

    python benchmarks/overhead.py                     # CPU defaults, ~1-3 min on 2 cores
    python benchmarks/overhead.py --widths 256,512,1024 --no-peft --steps 20
    python benchmarks/overhead.py --device cuda --dtype bfloat16 --seq 1024 --batch 16 --json overhead.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from crma_lightning.adapters import CRMAConfig, LoRAConfig, attach_adapters
from crma_lightning.adapters.crma import FORMS, NORMS
from crma_lightning.adapters.crma_batch import per_block_factors
from crma_lightning.model.compile import compile_decoder_layers

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default="q_proj,v_proj", help="comma-separated module suffixes, or 'all-linear'")
    p.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per variant first")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the frozen base model")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    p.add_argument(
        "--rotate",
        action="store_true",
        help="rotate the order every round (A,B,C; B,C,A; ...) to cancel any position-in-round bias",
    )
    p.add_argument("--profile", action="store_true", help="print the top ops of one profiled step per variant")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="also time CRMA's parts alone (all blocks' factors forward+backward; one block's read/write "
        "forward+backward), minimum over the timed rounds, interleaved with the steps",
    )
    p.add_argument("--crma-form", default="write", choices=FORMS)
    p.add_argument("--crma-norm", default="spectral", choices=NORMS)
    p.add_argument("--crma-iters", type=int, default=CRMAConfig.sinkhorn_iters, help="Sinkhorn iterations")
    p.add_argument("--no-peft", action="store_true", help="time only our LoRA and LoRA+CRMA")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time LoRA+CRMA with its decoder layers torch.compile'd (ContinualLM(compile=True), inductor)",
    )
    p.add_argument(
        "--per-block",
        action="store_true",
        help="also time LoRA+CRMA with every block computing its own factors (the scheme before batching)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument(
        "--widths",
        default=None,
        help="comma-separated hidden sizes (e.g. 256,512,1024): one measurement per width, FFN scaled 688/256",
    )
    return p.parse_args(argv)


def build_base(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(args.seq, 128),
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config)
    return model.to(device=args.device, dtype=DTYPES[args.dtype])


def targets_of(args: argparse.Namespace) -> str | list[str]:
    return "all-linear" if args.targets == "all-linear" else [t for t in args.targets.split(",") if t]


def build_variants(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    from peft import LoraConfig, get_peft_model

    lora = LoRAConfig(r=args.rank, alpha=args.alpha, target_modules=targets_of(args))
    ours_lora = build_base(args)
    attach_adapters(ours_lora, "lora", lora)
    ours_crma = build_base(args)
    crma = CRMAConfig(form=args.crma_form, norm=args.crma_norm, sinkhorn_iters=args.crma_iters)
    attach_adapters(ours_crma, "crma", LoRAConfig(**vars(lora)), crma)
    variants = {"lora": ours_lora, "crma": ours_crma}
    if args.compile:
        variants["crma_compiled"] = build_base(args)
        attach_adapters(variants["crma_compiled"], "crma", LoRAConfig(**vars(lora)), crma)
        compile_decoder_layers(variants["crma_compiled"])
    if args.per_block:
        variants["crma_per_block"] = build_base(args)
        attach_adapters(variants["crma_per_block"], "crma", LoRAConfig(**vars(lora)), crma)
    if not args.no_peft:
        peft_cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=targets_of(args))
        variants["peft_lora"] = get_peft_model(build_base(args), peft_cfg)
    for model in variants.values():
        model.to(args.device).train()
    return variants


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def make_step(model: torch.nn.Module, ids: torch.Tensor, lr: float, per_block: bool = False):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with per_block_factors() if per_block else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        opt.step()
        return loss.detach()

    return step, sum(p.numel() for p in params)


def crma_parts(model: torch.nn.Module, ids: torch.Tensor) -> dict:
    """Callables timing CRMA's two parts alone: all blocks' batched factors, and one block's read/write."""
    from crma_lightning.adapters import crma_adapters
    from crma_lightning.adapters.crma_batch import _build, _ReadWrite

    adapters = [a for _, a in crma_adapters(model)]
    names = [name for name, _ in adapters[0].named_parameters(recurse=False)]

    def factors() -> None:
        group = _build(adapters, {n: torch.stack([getattr(a, n) for a in adapters]) for n in names})
        (group.reads.sum() + group.effective.sum()).backward()

    group = _build(adapters, {n: torch.stack([getattr(a, n) for a in adapters]) for n in names})
    read_t, effective_t, read, effective = (part[0].detach() for part in group.slices(torch.float32))
    read_t, effective_t = read_t.requires_grad_(), effective_t.requires_grad_()
    hidden = adapters[0].hidden_size
    flat = torch.randn(ids.numel(), hidden, device=ids.device, requires_grad=True)
    grad = torch.randn(ids.numel(), hidden, device=ids.device)

    def read_write() -> None:
        _ReadWrite.apply(flat, read_t, effective_t, read, effective).backward(grad)

    return {"factors": factors, "read_write": read_write}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.widths:
        results = sweep(args)
        for width, r in results.items():
            print(f"{READABLE} {r['median_paired_ratio']['crma_over_lora']:.4f} hidden={width}")
        return results
    result = measure(args)
    print(f"{READABLE} {result['median_paired_ratio']['crma_over_lora']:.4f} hidden={args.hidden}")
    return result


READABLE = "CRMA / LoRA"
"""The last line(s): ``CRMA / LoRA <median paired ratio> hidden=<width>``, one per width, for scripts to read."""


def sweep(args: argparse.Namespace) -> dict:
    """:func:`measure` once per width in ``args.widths``, then a summary table (and one JSON for all)."""
    results = {}
    for width in [int(w) for w in args.widths.split(",") if w]:
        run = argparse.Namespace(**{**vars(args), "widths": None, "json": None})
        run.hidden, run.intermediate = width, 8 * round(width * 688 / 256 / 8)
        print(f"\n=== hidden {width} ===")
        results[width] = measure(run)
    print(f"\nCRMA ({args.crma_form}, {args.crma_norm}) / LoRA by width, {args.dtype} on {args.device}:")
    extra = " CRMA per block/LoRA (ratio of medians) | (median paired) |" if args.per_block else ""
    print(f"| hidden | LoRA median ms | LoRA+CRMA median ms | CRMA/LoRA (ratio of medians) | (median paired) |{extra}")
    print("|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.per_block else ""))
    for width, r in results.items():
        row = (
            f"| {width} | {r['median_ms']['lora']:.1f} | {r['median_ms']['crma']:.1f} | "
            f"{r['ratio_of_medians']['crma_over_lora']:.3f} | {r['median_paired_ratio']['crma_over_lora']:.3f} |"
        )
        if args.per_block:
            row += (
                f" {r['ratio_of_medians']['crma_per_block_over_lora']:.3f} |"
                f" {r['median_paired_ratio']['crma_per_block_over_lora']:.3f} |"
            )
        print(row)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({str(w): r for w, r in results.items()}, indent=2))
        print(f"wrote {args.json}")
    return results


def measure(args: argparse.Namespace) -> dict:
    """Time the variants side by side for one model size; print the table and return the numbers."""
    torch.manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    variants = build_variants(args)
    steps, trainable = {}, {}
    for name, model in variants.items():
        steps[name], trainable[name] = make_step(model, ids, args.lr, per_block=name == "crma_per_block")
    if args.breakdown:
        steps.update(crma_parts(variants["crma"], ids))
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for i in range(args.warmup + args.steps):
        order = names[i % len(names) :] + names[: i % len(names)] if args.rotate else names
        for name in order:  # interleaved: lora, crma, peft_lora, lora, ...
            step = steps[name]
            sync(args.device)
            start = time.perf_counter()
            step()
            sync(args.device)
            if i >= args.warmup:
                times[name].append((time.perf_counter() - start) * 1e3)

    median = {name: statistics.median(t) for name, t in times.items()}
    paired = {"crma_over_lora": statistics.median(c / a for a, c in zip(times["lora"], times["crma"]))}
    ratios = {"crma_over_lora": median["crma"] / median["lora"]}
    if "crma_compiled" in times:
        paired["crma_compiled_over_crma"] = statistics.median(
            c / a for a, c in zip(times["crma"], times["crma_compiled"])
        )
        ratios["crma_compiled_over_crma"] = median["crma_compiled"] / median["crma"]
    if "crma_per_block" in times:
        paired["crma_per_block_over_lora"] = statistics.median(
            c / a for a, c in zip(times["lora"], times["crma_per_block"])
        )
        ratios["crma_per_block_over_lora"] = median["crma_per_block"] / median["lora"]
    if "peft_lora" in times:
        paired["ours_over_peft"] = statistics.median(a / p for a, p in zip(times["lora"], times["peft_lora"]))
        ratios["ours_over_peft"] = median["lora"] / median["peft_lora"]
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
            "threads": torch.get_num_threads(),
        },
        "trainable_params": trainable,
        "median_ms": median,
        "min_ms": {name: min(t) for name, t in times.items()},
        "times_ms": times,
        "ratio_of_medians": ratios,
        "median_paired_ratio": paired,
        "targets": {
            "crma_over_lora": 1.05,
            "crma_per_block_over_lora": 1.05,
            "crma_compiled_over_crma": 1.00,
            "ours_over_peft": 1.00,
        },
    }

    print(
        f"Llama {args.layers}x{args.hidden} (ffn {args.intermediate}, {args.heads} heads, vocab {args.vocab}), "
        f"batch {args.batch} x seq {args.seq}, {args.dtype} on {args.device} ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}; LoRA r={args.rank} on {args.targets}; "
        f"CRMA form={args.crma_form} norm={args.crma_norm} sinkhorn_iters={args.crma_iters}; "
        f"{args.warmup} warm-up + {args.steps} timed steps each, interleaved{' (rotated)' if args.rotate else ''}"
    )
    print(f"| {'variant':<22} | {'trainable params':>16} | {'median ms':>10} | {'min ms':>9} |")
    print(f"|{'-' * 24}|{'-' * 17}:|{'-' * 11}:|{'-' * 10}:|")
    labels = {
        "lora": "ours LoRA",
        "crma": "ours LoRA+CRMA",
        "crma_per_block": "LoRA+CRMA, per block",
        "crma_compiled": "LoRA+CRMA, compiled",
        "peft_lora": "PEFT LoRA",
    }
    for name in variants:
        print(
            f"| {labels[name]:<22} | {trainable[name]:>16,} | {median[name]:>10.1f} | {result['min_ms'][name]:>9.1f} |"
        )
    if args.breakdown:
        added = result["min_ms"]["crma"] - result["min_ms"]["lora"]
        parts = result["min_ms"]["factors"] + args.layers * result["min_ms"]["read_write"]
        print(
            f"CRMA's parts (min ms): all blocks' factors fwd+bwd {result['min_ms']['factors']:.2f}, one block's "
            f"read/write fwd+bwd {result['min_ms']['read_write']:.2f}; factors + {args.layers} blocks = {parts:.2f} "
            f"of the {added:.2f} between the fastest LoRA+CRMA and the fastest LoRA step"
        )
    pairs = [
        ("crma_over_lora", "CRMA / LoRA"),
        ("crma_per_block_over_lora", "CRMA per block / LoRA"),
        ("crma_compiled_over_crma", "CRMA compiled / CRMA eager"),
        ("ours_over_peft", "ours / PEFT"),
    ]
    for key, label in pairs:
        if key not in ratios:
            continue
        target = result["targets"][key]
        verdict = "meets" if ratios[key] <= target else "MISSES"
        print(
            f"{label}: {ratios[key]:.3f} (ratio of medians), {paired[key]:.3f} (median paired ratio); "
            f"target <= {target:.2f}: {verdict}"
        )

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        for name, step in steps.items():
            with profile(activities=activities) as prof:
                step()
                sync(args.device)
            sort = "self_cuda_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
            print(f"\n== profile: {labels[name]} ==")
            print(prof.key_averages().table(sort_by=sort, row_limit=12))

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
