"""The framework's cost per training step: one stage through ``ContinualRunner`` vs a bare transformers + PEFT loop.

Both train the same LoRA (r=8, alpha=16, every linear layer, no dropout) on the same frozen Llama-style
base built from one config and seed, on the same batches (the project's prepared built-in ``prose``
domain, batch 8 x 128 tokens), with the same optimizer (AdamW, lr 3e-3, no weight decay, fused: what
the module builds by default). The framework path is the product's NAIVE stage as a user runs it:
Lightning's loop, GradientStability, the non-finite guard, TensorBoard logging every 10 steps. The
bare loop is ``loss = model(**batch).loss; loss.backward(); opt.step(); opt.zero_grad()``, once with
PEFT's LoRA and once with the project's LoRA attached to the same base (``attach_adapters``): the first
ratio is what a user moving from a PEFT script sees, the second what Lightning and the callbacks cost.

Rounds alternate the order (framework first, then bare first, ...), so drifts in machine load hit both.
Per-step time is the median step after ``--warmup`` steps; start-up is from building the model to the
first step's start; the framework's end-of-stage evaluation is reported apart (it is not a step).

Example::

    python benchmarks/framework_overhead.py                        # demo size (hidden 128 x 2), ~2 min
    python benchmarks/framework_overhead.py --hidden 512 --layers 8 --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch

LR = 3e-3


def model_config(args: argparse.Namespace) -> dict:
    return {"model_type": "llama", "hidden_size": args.hidden, "intermediate_size": 2 * args.hidden,
            "num_hidden_layers": args.layers, "num_attention_heads": max(1, args.hidden // 32),
            "num_key_value_heads": max(1, args.hidden // 64), "max_position_embeddings": 256}


def data(args: argparse.Namespace):
    from crma_lightning.data.datamodule import SequentialDomainDataModule

    return SequentialDomainDataModule(domains=["prose"], max_length=128, batch_size=8,
                                      max_chars_per_domain=args.chars, max_eval_rows=16)


class _StepClock(L.Callback):
    """Start time of every training batch, and the end of the last one."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.end = 0.0

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, *args) -> None:
        self.end = time.perf_counter()


def framework(args: argparse.Namespace) -> dict:
    from crma_lightning.model.continual_lm import ContinualLM
    from crma_lightning.run.runner import ContinualRunner

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = ContinualLM(model_config=model_config(args), adapter="lora", task_adapters="shared",
                        lora={"r": 8, "alpha": 16, "target_modules": "all-linear"},
                        optimizer=partial(torch.optim.AdamW, lr=LR, weight_decay=0.0))
    clock = _StepClock()
    with tempfile.TemporaryDirectory() as tmp:
        runner = ContinualRunner(run_dir=Path(tmp) / "run", resume="never", callbacks=[clock],
                                 trainer_kwargs={"accelerator": "cpu", "max_steps": args.steps,
                                                 "log_every_n_steps": 10, "enable_progress_bar": False,
                                                 "check_val_every_n_epoch": None, "val_check_interval": None,
                                                 "enable_model_summary": False})
        runner.run(model, data(args))
        report = runner.state.timings
    steps = [b - a for a, b in zip(clock.starts, [*clock.starts[1:], clock.end])]
    timing = next(iter(report.values()))
    return {"steps": steps[args.warmup:], "startup": clock.starts[0] - t0, "eval": timing["eval_s"]}


def bare(args: argparse.Namespace, ours: bool = False) -> dict:
    """The hand-written loop, with PEFT's LoRA (``ours=False``) or the project's (``attach_adapters``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from crma_lightning.adapters import LoRAConfig, attach_adapters
    from crma_lightning.data.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    torch.manual_seed(0)
    tokenizer = load_tokenizer("byte")
    config = AutoConfig.for_model(**{**model_config(args), "vocab_size": len(tokenizer)})
    base = AutoModelForCausalLM.from_config(config)
    if ours:
        for p in base.parameters():
            p.requires_grad_(False)
        attach_adapters(base, "lora", LoRAConfig(r=8, alpha=16, target_modules="all-linear"))
        model = base
    else:
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0,
                                  fused=True)
    dm = data(args)
    dm.prepare(tokenizer)
    dm.set_stage(0)
    batches = iter(dm.train_dataloader())
    starts = []
    for _ in range(args.steps):
        starts.append(time.perf_counter())
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(dm.train_dataloader())
            batch = next(batches)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    end = time.perf_counter()
    steps = [b - a for a, b in zip(starts, [*starts[1:], end])]
    return {"steps": steps[args.warmup:], "startup": starts[0] - t0}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chars", type=int, default=60_000, help="characters of the prose domain")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import peft  # noqa: F401  imports first: start-up times then measure building and preparing, not importing

    import crma_lightning.run.runner  # noqa: F401
    variants = {"framework": framework, "bare": bare, "bare_ours": partial(bare, ours=True)}
    ratios, lightning_ratios = [], []
    medians: dict[str, list[float]] = {k: [] for k in variants}
    startups: dict[str, list[float]] = {k: [] for k in variants}
    evals = []
    for r in range(args.rounds):
        names = list(variants) if r % 2 == 0 else list(reversed(variants))
        got = {name: variants[name](args) for name in names}
        for name in medians:
            medians[name].append(statistics.median(got[name]["steps"]) * 1000)
            startups[name].append(got[name]["startup"])
        evals.append(got["framework"]["eval"])
        ratios.append(medians["framework"][-1] / medians["bare"][-1])
        lightning_ratios.append(medians["framework"][-1] / medians["bare_ours"][-1])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} ms/step" for k, v in medians.items()), flush=True)
    result = {
        "hidden": args.hidden, "layers": args.layers, "steps": args.steps, "rounds": args.rounds,
        "median_ms": {k: statistics.median(v) for k, v in medians.items()},
        "startup_s": {k: statistics.median(v) for k, v in startups.items()},
        "framework_eval_s": statistics.median(evals),
        "ratio": statistics.median(ratios), "ratios": ratios,
        "lightning_ratio": statistics.median(lightning_ratios), "lightning_ratios": lightning_ratios,
    }
    ms, up = result["median_ms"], result["startup_s"]
    print("| hidden x layers | framework ms/step | bare PEFT ms/step | bare, our LoRA ms/step | start-up s "
          "(framework / PEFT / ours) | end-of-stage evaluation s |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| {args.hidden} x {args.layers} | {ms['framework']:.1f} | {ms['bare']:.1f} | {ms['bare_ours']:.1f} | "
          f"{up['framework']:.2f} / {up['bare']:.2f} / {up['bare_ours']:.2f} | {result['framework_eval_s']:.2f} |")
    print(f"framework / bare {result['ratio']:.4f} (PEFT loop; median over {args.rounds} rounds: "
          f"{', '.join(f'{x:.3f}' for x in ratios)}; goal <= 1.03)")
    print(f"framework / bare with our LoRA {result['lightning_ratio']:.4f} (Lightning, callbacks and logging "
          f"alone; rounds: {', '.join(f'{x:.3f}' for x in lightning_ratios)})")
    return result


if __name__ == "__main__":
    main()
