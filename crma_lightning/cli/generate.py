"""``crma-lightning generate``: text from a trained run with a chosen task's adapter.

The model is rebuilt from the run's ``config.yaml`` and a stage checkpoint is loaded (default: the
newest), then ``ContinualLM.generate`` continues each prompt with the task's LoRA adapter active
(CRMA, in a CRMA run, is always on). ``--routing [perplexity|prototype]`` chooses the task per prompt
instead. Sampling options are passed to ``transformers``' ``generate``.
"""

from __future__ import annotations

import json
from typing import Any

from crma_lightning.cli.run_dir import CommandParser, RunDirectory

SAMPLING_OPTIONS = {
    "max_new_tokens": int,
    "min_new_tokens": int,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "num_beams": int,
    "repetition_penalty": float,
}
"""Options passed on to ``transformers``' ``generate`` when given (``--do_sample`` is a flag)."""


_SCORES = {"perplexity": "prompt_losses", "prototype": "prototype_distances"}
"""The JSON key of each routing mode's per-task scores (lower wins)."""


def routing_config(run: RunDirectory, mode: str, fallback_margin: float | None = None) -> Any:
    """The :class:`~crma_lightning.routing.config.RoutingConfig` ``generate --routing mode`` uses: the run's own."""
    from crma_lightning.routing.config import RoutingConfig

    saved = run.routing.config if run.routing is not None else RoutingConfig()
    return saved.override(mode, fallback_margin=fallback_margin)


def fit_router_if_missing(run: RunDirectory, model: Any, dm: Any, tasks: list[str]) -> None:
    """Give ``model`` prototype statistics for ``tasks``: the checkpoint's, else fitted on the run's training rows.

    With the run's ``routing`` settings when it was trained with ``mode: prototype``, else the defaults.
    """
    import sys

    from crma_lightning.data.tokenizer import pad_id
    from crma_lightning.routing.prototype import PrototypeRouter, fit_missing_tasks

    if model.router is not None and all(t in model.router.tasks for t in tasks):
        return
    if model.router is None:
        model.router = PrototypeRouter(**routing_config(run, "prototype").router_settings)
    dm.prepare(model.tokenizer)
    tokenizer = model.tokenizer
    pad = pad_id(tokenizer)
    rows = {t: dm.train_sets[t] for t in tasks}  # Datasets: read one batch at a time
    fitted = fit_missing_tasks(
        model.router, model.model, model.activate_task, rows, tasks, dm.eval_batch_size, pad, model.device
    )
    print(f"prototype routing statistics fitted on the run's training rows for {fitted}", file=sys.stderr)


def bare_routing_flag(args: list[str]) -> list[str]:
    """``--routing`` not followed by a mode means ``--routing=perplexity`` (so ``--routing PROMPT`` keeps working)."""
    out = list(args)
    for i, arg in enumerate(out):
        if arg == "--routing" and (i + 1 == len(out) or out[i + 1] not in _SCORES):
            out[i] = "--routing=perplexity"
    return out


def build_parser() -> CommandParser:
    """The ``generate`` options."""
    parser = CommandParser(
        prog="crma-lightning generate",
        description="Continue PROMPT(s) with a trained run's model and one task's adapter.",
    )
    parser.add_argument("--run", required=True, help="run directory (run.dir of the fit run)")
    pick = parser.add_mutually_exclusive_group(required=True)
    pick.add_argument("--task", help="the domain whose adapter generates (one of the run's domains)")
    pick.add_argument(
        "--routing",
        nargs="?",
        const="perplexity",
        choices=["perplexity", "prototype"],
        help="choose the task per prompt without a label: perplexity (default; the trained task whose adapter "
        "gives the prompt the lowest loss, one forward per task) or prototype (the task whose training rows' "
        "base-model features are nearest; one base forward; statistics from the checkpoint, else fitted on "
        "the run's training rows)",
    )
    parser.add_argument(
        "--fallback_margin",
        type=float,
        help="--routing prototype: the hybrid - a prompt whose two nearest tasks are within this log-odds margin is "
        "routed by perplexity on its first P tokens (default: the run's routing.fallback_margin)",
    )
    parser.add_argument("--stage", type=int, help="use the model after this stage (default: the newest checkpoint)")
    for name, kind in SAMPLING_OPTIONS.items():
        parser.add_argument(f"--{name}", type=kind, help=f"transformers generate({name}=...)")
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of {prompt, text} instead")
    parser.add_argument("prompt", nargs="+", help="prompt text; several prompts are generated as one batch")
    return parser


def run_generate(args: list[str]) -> None:
    """Parse ``args`` (what follows ``generate``), generate, print."""
    import torch

    opts = build_parser().parse_args(bare_routing_flag(args))
    run = RunDirectory(opts.run)
    model, dm = run.build(prog="crma-lightning generate")
    if not opts.routing:
        run.check_task(opts.task)
    margin = opts.fallback_margin
    if opts.routing != "prototype" and margin is not None:
        raise ValueError("--fallback_margin needs --routing prototype")
    if opts.routing == "prototype":  # a layer the model lacks or too wide features: before loading anything
        from crma_lightning.routing.prototype import check_model

        routing = routing_config(run, "prototype", margin)  # the hybrid the run was evaluated with, by default
        margin = routing.fallback_margin
        check_model(model.model.config, routing.layer, routing.pooling)
    ckpt_info = run.stage_checkpoint(opts.stage)
    if not opts.routing:
        run.check_task(opts.task, ckpt_info.stage)
    run.load(model, ckpt_info.path)
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"--device {device!r} is not usable: {err}") from err
    kwargs: dict[str, Any] = {k: getattr(opts, k) for k in SAMPLING_OPTIONS if getattr(opts, k) is not None}
    if opts.do_sample:
        kwargs["do_sample"] = True
    trained = run.domains[: ckpt_info.stage]
    if opts.routing == "prototype":
        fit_router_if_missing(run, model, dm, trained)
    routes = [
        model.route(p, trained, mode=opts.routing, fallback_margin=margin) if opts.routing else (opts.task, None)
        for p in opts.prompt
    ]
    fallbacks = [getattr(r, "fallback_losses", None) for r in routes]  # the hybrid's perplexity losses, if used
    texts: list[str] = [""] * len(opts.prompt)
    torch.manual_seed(opts.seed)
    for task in dict.fromkeys(t for t, _ in routes):  # one batch per task (one batch without --routing)
        rows = [i for i, (t, _) in enumerate(routes) if t == task]
        try:
            out = model.generate([opts.prompt[i] for i in rows], task=task, **kwargs)
        except (TypeError, ValueError) as err:  # transformers' own check of the generation options
            raise ValueError(f"generation options {kwargs} are invalid: {err}") from err
        for i, text in zip(rows, out, strict=True):
            texts[i] = text
    if opts.json:
        out = [
            {
                "prompt": p,
                "text": t,
                "task": task,
                **({_SCORES[opts.routing]: losses} if losses else {}),
                **({"fallback": fb is not None} if margin is not None else {}),
                **({_SCORES["perplexity"]: fb} if fb is not None else {}),
            }
            for p, t, (task, losses), fb in zip(opts.prompt, texts, routes, fallbacks)
        ]
        print(json.dumps(out, ensure_ascii=False))
        return
    for i, (prompt, text, (task, losses), fb) in enumerate(zip(opts.prompt, texts, routes, fallbacks)):
        if len(texts) > 1 or losses:
            how = "routed to" if losses else "task"
            how += " (near tie: by perplexity)" if fb is not None else ""
            print(f"--- [{i + 1}/{len(texts)}] {how} {task}, stage {ckpt_info.stage}")
        print(prompt + text)
