"""``crma-lightning export``: one task's adapter as a PEFT adapter directory or a merged HF model.

``--merge mean|ties`` instead of ``--task`` exports one adapter merged from every task adapter the stage
trained (:mod:`crma_lightning.adapters.merging`; ``--density`` and ``--scale`` tune TIES) in either format: a model
that needs no task label and no routing.

* ``--format peft``: ``adapter_config.json`` + ``adapter_model.safetensors`` for
  ``peft.PeftModel.from_pretrained(base, OUT)``. A run whose base model was built from ``model_config``
  has no hub id to name, so its (seeded, randomly initialised) base is saved next to it in
  ``OUT/base_model`` and named in ``adapter_config.json``.
* ``--format merged``: a ``save_pretrained`` directory (model and tokenizer) that
  ``AutoModelForCausalLM.from_pretrained(OUT)`` loads alone, with the task's LoRA folded into the base
  weights.

CRMA adapters sit on the residual stream after every decoder block: no PEFT adapter type and no
standard Hugging Face architecture has a place for them. Both formats therefore refuse a CRMA run
unless ``--drop_crma`` is given, which exports the LoRA part only - its outputs differ from the run's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from crma_lightning.cli.run_dir import CommandParser, RunDirectory, writable_dir

INFO_FILE = "crma_lightning_export.json"
"""Provenance written into every export: run, stage, task, format, whether CRMA was dropped."""


def build_parser() -> CommandParser:
    """The ``export`` options."""
    parser = CommandParser(
        prog="crma-lightning export",
        description="Export one task's LoRA adapter of a run as a PEFT adapter or a merged model directory.",
    )
    parser.add_argument("--run", required=True, help="run directory (run.dir of the fit run)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="the domain whose adapter is exported")
    which.add_argument(
        "--merge",
        choices=["mean", "ties"],
        help="export one adapter merged from every task adapter trained by the stage (no routing needed): "
        "mean (task arithmetic) or ties (TIES-merging)",
    )
    parser.add_argument("--density", type=float, default=0.2, help="--merge ties: share of each update kept (0.2)")
    parser.add_argument("--scale", type=float, default=1.0, help="--merge ties: factor of the merged update (1.0)")
    parser.add_argument("--format", required=True, choices=["peft", "merged"], help="peft or merged")
    parser.add_argument("--stage", type=int, help="use the model after this stage (default: the newest checkpoint)")
    parser.add_argument(
        "--drop_crma",
        action="store_true",
        help="CRMA runs: export the LoRA part only (the exported model's outputs differ from the run's)",
    )
    parser.add_argument("--overwrite", action="store_true", help="allow a non-empty OUT directory")
    parser.add_argument("out", help="output directory")
    return parser


def run_export(args: list[str]) -> None:
    """Parse ``args`` (what follows ``export``) and write the export."""
    opts = build_parser().parse_args(args)
    run = RunDirectory(opts.run)
    out = Path(opts.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not opts.overwrite:
        raise ValueError(f"output directory {out} exists and is not empty; choose another or pass --overwrite")
    model, _ = run.build(prog="crma-lightning export")
    if opts.task is not None:
        run.check_task(opts.task)
    if model.adapter == "crma" and not opts.drop_crma:
        raise ValueError(
            f"the run at {run.path} uses CRMA adapters, which a {opts.format} export cannot hold (CRMA mixes the "
            "residual stream after every block; no PEFT type or HF architecture has it); pass --drop_crma to "
            "export the LoRA part only, whose outputs differ from the run's model"
        )
    ckpt_info = run.stage_checkpoint(opts.stage)
    if opts.task is not None:
        run.check_task(opts.task, ckpt_info.stage)
    else:
        from crma_lightning.adapters.merging import check_merge

        check_merge(model.task_adapters, run.domains[: ckpt_info.stage], opts.density)
    writable_dir(out)  # after every check: a refused export leaves no empty OUT behind
    run.load(model, ckpt_info.path)
    model.eval()
    task = opts.task
    if opts.merge is not None:
        from crma_lightning.adapters.merging import MERGED_ADAPTER, add_merged_adapter

        tasks = run.domains[: ckpt_info.stage]
        add_merged_adapter(model.model, [model.adapter_for(t) for t in tasks], opts.merge, opts.density, opts.scale)
        task = MERGED_ADAPTER
    info = {
        "run": str(run.path.resolve()),
        "checkpoint": str(ckpt_info.path),
        "stage": ckpt_info.stage,
        "task": task,
        "adapter": model.adapter_for(task),
        **({"merge": opts.merge, "merged_tasks": tasks} if opts.merge else {}),
        **({"density": opts.density, "scale": opts.scale} if opts.merge == "ties" else {}),
        "format": opts.format,
        "crma_dropped": model.adapter == "crma",
    }
    if opts.format == "peft":
        export_peft(model, task, out, info)
    else:
        export_merged(model, task, out)
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    what = f"task {task!r}" if opts.merge is None else f"the {opts.merge} merge of {tasks}"
    print(f"Exported {what} (stage {ckpt_info.stage}, {opts.format}) to {out}")
    if info["crma_dropped"]:
        print("Note: CRMA was dropped (--drop_crma): the exported model's outputs differ from the run's.")


def export_peft(model: Any, task: str, out: Path, info: dict[str, Any]) -> None:
    """``task``'s LoRA as a PEFT adapter; a config-built base is saved to ``out/base_model``."""
    from crma_lightning.adapters import detach_adapters
    from crma_lightning.adapters.serialization import export_peft_adapter

    base = model.hparams["model_name_or_path"]
    base_dir = out / "base_model"
    export_peft_adapter(model.model, model.adapter_for(task), out, base or str(base_dir.resolve()))
    if base is None:
        detach_adapters(model.model)  # the base as the run had it (seeded from model_config)
        _save_model(model, base_dir)
        info["base_model"] = str(base_dir)


def export_merged(model: Any, task: str, out: Path) -> None:
    """``task``'s LoRA folded into the base weights, every adapter removed, saved with ``save_pretrained``."""
    from crma_lightning.adapters import detach_adapters, lora_layers, merge_lora

    merge_lora(model.model, model.adapter_for(task))
    merged = [(layer.base_layer, layer.base_layer.weight.detach().clone()) for _, layer in lora_layers(model.model)]
    detach_adapters(model.model)  # puts the original layers back (and unmerges): copy the merged weights in again
    with torch.no_grad():
        for module, weight in merged:
            module.weight.copy_(weight)
    _save_model(model, out)


def _save_model(model: Any, out: Path) -> None:
    hf_model = model.model
    hf_model.config.use_cache = True  # the run turns the KV cache off for training; generation wants it
    hf_model.save_pretrained(out, safe_serialization=True)
    model.tokenizer.save_pretrained(out)
