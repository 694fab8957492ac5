"""Continual-learning benchmark: forgetting, stability and cost of the adapter settings and CL methods.

The settings run on the same base model, domains, budgets and seeds, each through the code path users
run (``ContinualLM`` + ``SequentialDomainDataModule`` + ``ContinualRunner``), each in its own run
directory ``<out>/seed<s>/<SETTING>``; ``--settings`` picks them (default: the first seven):

    NAIVE            lora + shared      one LoRA keeps training through every stage
    FROZEN           lora + per_task    a fresh LoRA per stage, earlier ones frozen      (+ routed evaluation)
    MODULAR          crma + per_task    FROZEN + the shared CRMA backbone                (+ routed evaluation)
    CRMA-shared      crma + shared      NAIVE + CRMA
    REPLAY           lora + shared      NAIVE + Replay(buffer_size=--replay-buffer, ratio=--replay-ratio)
    EWC              lora + shared      NAIVE + EWC(lam=--ewc-lam, fisher_samples=--ewc-fisher-samples)
    O-LORA           lora + per_task    OLoRA(lam=--olora-lam): earlier LoRAs stay active, frozen
    MULTITASK        lora + shared      joint training, the upper bound: every stage trains on the union of
                                        all domains (same total budget, T x steps), evaluated like the others
    MODULAR-v1, CRMA-shared-v1          CRMA write form with v1's Frobenius norm (ablation)
    MODULAR-mix, CRMA-shared-mix        CRMA mix form, g_max = --mix-g-max (ablation)
    MERGED-mean, MERGED-ties            not trained: FROZEN's per-task LoRAs merged into one (needs FROZEN)

``--settings ablation`` is NAIVE, FROZEN and the four ablation variants; ``--settings v3`` the default seven
and MULTITASK; ``--settings all`` is every one. With MULTITASK in the run, every setting X gets the share
of NAIVE's gap to joint training it closes, ``(NAIVE - X) / (NAIVE - MULTITASK)`` on the mean final
held-out loss (and on AP with task metrics; docs/metrics.md).

Protocol v3 (issue 23): ``--orders K`` runs K fixed task orders (the given one, its reversal, a half
rotation, ...: ``lib/orders.py``), each in ``<out>/order<k>/seed<s>/<SETTING>`` (K = 1 keeps
``<out>/seed<s>/<SETTING>``); ``results.md`` shows each order's numbers and their mean over orders.
``--suite tasks`` runs the built-in task suite of ``configs/tasks.yaml`` (first, shift, sort, length;
its budgets and the base of ``task_suite_base.py``) and reports the score matrix: AP, BWT_score,
forgetting and the final score of every task, per setting, order and seed. The suite routes FROZEN and
MODULAR only when ``--router`` is given (its instructions name the task): then each held-out prompt is also
answered by its routed adapter (routed AP and BWT_score).
FROZEN and MODULAR are also evaluated task-agnostically (``RoutedEvaluation(mode="perplexity")``, routing
on the first ``--prefix-tokens`` tokens of each held-out row; ``--router prototype``: by the base model's
features, :mod:`crma_lightning.routing.prototype`; ``--router hybrid``: prototype, perplexity on the near-ties
within ``--fallback-margin``); the shared settings and O-LORA need no
routing (checked with ``mode="none"``): their routed numbers are the oracle ones.

Held-out rows (protocol v3): each held-out file is split by document into dev and test halves
(``lib/splits.py``; the task suite's generated prompts into halves); runs evaluate ``--eval-split`` (default
``test``). Every run keeps its per-row held-out
numbers (``heldout_rows.json``), from which ``lib/stats.py`` computes bootstrap intervals of every headline
number and paired intervals of every pair, routed numbers included (``results.json`` ``intervals``, the end
of ``results.md``).

Within each seed the runs take turns one optimizer step at a time (``--interleave step``), so the
step times of all settings see the same machine load. Writes ``results.json`` (every per-seed number and
the aggregates; a ``null`` always has its reason under ``null_reasons``) and ``results.md`` (the table)
into ``--out``, and prints the table.

Base model: ``--model PATH`` (any local Hugging Face causal LM), or by default a tiny Llama-style model
pretrained briefly on an equal mix of the domains' training text and cached (see ``lib/pretrain.py``).

Examples::

    python benchmarks/continual.py --out runs/bench/builtin                 # built-in domains, 3 seeds
    python benchmarks/continual.py --data-dir ../shared/data/domains \\
        --domains medical legal finance science --out runs/bench/real
    python benchmarks/continual.py --quick --out /tmp/bench-quick           # a few minutes on CPU
    python benchmarks/continual.py --settings ablation --seeds 1 --out runs/bench/ablation
    python benchmarks/continual.py --suite tasks --settings v3 --orders 3 --out runs/bench/tasks-v3
    python benchmarks/continual.py --eval-split dev --out runs/bench/dev         # evaluate the dev half instead
    python benchmarks/continual.py --chosen runs/bench/sweep/chosen.json --out runs/bench/v3   # see sweep.py
    python benchmarks/continual.py --model /models/llama-1b --device cuda --precision bf16-mixed \\
        --steps 500 --batch-size 16 --max-length 1024 --lr 2e-4 --interleave run --out runs/bench/1b
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<script>.py`: the repo root

from benchmarks import task_suite_base
from benchmarks.lib.bench_data import (
    check_pretrain_disjoint,
    check_texts_disjoint,
    domain_specs,
    fingerprint,
    resolve_domains,
)
from benchmarks.lib.intervals import benchmark_intervals, render_intervals
from benchmarks.lib.merged import MERGED_OF, merged_raw
from benchmarks.lib.orders import task_orders
from benchmarks.lib.pretrain import PretrainSettings, pretrained_base
from benchmarks.lib.results import (
    LORA_PAIRS,
    Null,
    aggregate,
    gap_to_joint,
    over_orders,
    pair_numbers,
    run_numbers,
    to_json,
    verdicts,
)
from benchmarks.lib.runs import ABLATION_SETTINGS, DEFAULT_SETTINGS, SETTINGS, V3_SETTINGS, describe, run_seed
from benchmarks.lib.splits import EVAL_SPLITS, with_eval_split
from benchmarks.lib.suites import SUITES, multitask_specs, resolve_tasks, task_fingerprint, task_specs, task_split_specs
from benchmarks.lib.table import render, render_orders, render_scores
from benchmarks.lib.variants import apply_chosen
from crma_lightning.routing.prototype import HYBRID_MARGIN

PRESETS: dict[str, dict[str, Any]] = {
    # ≤ 30 min on a shared 2-core CPU: 4 modes x 3 seeds x 4 stages x 150 steps, 4-layer model.
    "default": {
        "hidden": 128, "layers": 4, "heads": 4, "kv_heads": 2, "max_length": 128, "batch_size": 8,
        "eval_batch_size": 32, "steps": 150, "seeds": 3, "lr": 2e-3, "max_eval_rows": 128,
        "max_chars": 200_000, "pretrain_steps": 400, "pretrain_batch_size": 16, "pretrain_lr": 2e-3,
        "prefix_tokens": 32, "replay_buffer": 256, "ewc_fisher_samples": 32,
    },
    # ≤ 3 min (about 1-1.5 on a shared 2-core CPU): a 2-layer model, 50 steps per stage, two seeds.
    "quick": {
        "hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "max_length": 128, "batch_size": 8,
        "eval_batch_size": 32, "steps": 50, "seeds": 2, "lr": 2e-3, "max_eval_rows": 32,
        "max_chars": 60_000, "pretrain_steps": 150, "pretrain_batch_size": 16, "pretrain_lr": 2e-3,
        "prefix_tokens": 32, "replay_buffer": 128, "ewc_fisher_samples": 16,
    },
    # --suite tasks: configs/tasks.yaml's budgets and the base of benchmarks/task_suite_base.py (model sizes).
    "tasks": {
        "hidden": 128, "layers": 2, "heads": 4, "kv_heads": 2, "max_length": 32, "batch_size": 16,
        "eval_batch_size": 16, "steps": 300, "seeds": 3, "lr": 3e-3, "max_eval_rows": 64,
        "max_chars": 200_000, "pretrain_steps": 600, "pretrain_batch_size": 16, "pretrain_lr": 3e-3,
        "prefix_tokens": 8, "replay_buffer": 256, "ewc_fisher_samples": 32,
    },
    # Seconds: the test suite's smoke run (numbers mean nothing).
    "tiny": {
        "hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "max_length": 32, "batch_size": 4,
        "eval_batch_size": 8, "steps": 4, "seeds": 2, "lr": 1e-2, "max_eval_rows": 8,
        "max_chars": 20_000, "pretrain_steps": 8, "pretrain_batch_size": 4, "pretrain_lr": 1e-2,
        "prefix_tokens": 8, "replay_buffer": 16, "ewc_fisher_samples": 2,
    },
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench-continual"), help="output directory")
    p.add_argument("--overwrite", action="store_true", help="delete earlier run directories in --out first")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small model and budgets (≤ 3 min on CPU)")
    size.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds; numbers mean nothing)")
    g = p.add_argument_group("data")
    g.add_argument(
        "--suite",
        choices=SUITES,
        default="domains",
        help="'domains': text domains, loss only (built-in or --data-dir); 'tasks': the built-in task suite of "
        "configs/tasks.yaml (first shift sort length), scored by exact match (AP, BWT_score, forgetting)",
    )
    g.add_argument(
        "--orders",
        type=int,
        default=1,
        help="run K task orders: the given one, its reversal, a half rotation, ... (benchmarks/lib/orders.py); "
        "K > 1 puts runs in <out>/order<k>/seed<s>/<SETTING>",
    )
    g.add_argument("--data-dir", type=Path, help="directory of <domain>/train.jsonl + <domain>/holdout.jsonl")
    g.add_argument("--domains", nargs="+", help="domains in training order (default: all)")
    g.add_argument("--max-chars", type=int, help="size cap of each built-in domain, in characters")
    g.add_argument("--max-train-rows", type=int, help="keep at most this many training records per domain")
    g.add_argument("--max-eval-rows", type=int, help="held-out rows (of --max-length tokens) per domain")
    g.add_argument("--eval-domains", choices=("seen", "all"), default="seen", help="'all' also gives FWT")
    g.add_argument(
        "--eval-split",
        choices=EVAL_SPLITS,
        default=None,
        help="which part of each held-out file the runs evaluate: test (reported; the default), dev (for choosing "
        "settings: benchmarks/sweep.py) or full (both: protocols v1/v2); see benchmarks/lib/splits.py (--suite tasks: "
        "test = the first half of each task's held-out prompts, dev = the second half)",
    )
    g = p.add_argument_group("settings, methods and routing")
    g.add_argument(
        "--settings",
        nargs="+",
        default=None,
        help=f"settings to run, in table order (default: {' '.join(DEFAULT_SETTINGS)}); 'ablation' = "
        f"{' '.join(ABLATION_SETTINGS)}; 'v3' = the default ones and MULTITASK; "
        f"'all' = every one: {' '.join(SETTINGS)}",
    )
    g.add_argument("--replay-buffer", type=int, help="REPLAY: buffer rows (default 256; tiny 16, quick 128)")
    g.add_argument("--replay-ratio", type=float, default=0.25, help="REPLAY: buffer rows per batch, as a fraction")
    g.add_argument("--ewc-lam", type=float, default=1000.0, help="EWC: lambda (default: the library's, 1000)")
    g.add_argument("--ewc-fisher-samples", type=int, help="EWC: batches for the Fisher (default 32, the library's)")
    g.add_argument("--olora-lam", type=float, default=0.5, help="O-LORA: lambda (default: the paper's, 0.5)")
    g.add_argument("--mix-g-max", type=float, default=0.5, help="the -mix ablation settings: CRMA g_max")
    g.add_argument("--prefix-tokens", type=int, help="routed evaluation: prefix tokens P (default 32; tiny 8)")
    g.add_argument(
        "--chosen",
        type=Path,
        help="chosen.json of benchmarks/sweep.py: run the methods at the dev-chosen values (over the options "
        "above) and add a <SETTING>-apriori row at the a-priori values where they differ",
    )
    g.add_argument("--no-routing", action="store_true", help="skip the routed evaluation of FROZEN and MODULAR")
    g.add_argument(
        "--router",
        choices=("perplexity", "prototype", "hybrid"),
        help="how FROZEN and MODULAR are routed (default perplexity; prototype: the base model's features, default "
        "settings; hybrid: prototype, and perplexity for the sequences within --fallback-margin). --suite tasks "
        "routes only when --router is given (the instruction names the task, so routing there is a check)",
    )
    g.add_argument(
        "--fallback-margin",
        type=float,
        default=HYBRID_MARGIN,
        help=f"--router hybrid: the log-odds margin below which perplexity decides (default {HYBRID_MARGIN})",
    )
    g = p.add_argument_group("intervals")
    g.add_argument("--resamples", type=int, default=2000, help="bootstrap replicates of the intervals (B)")
    g.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the bootstrap resampling")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="local Hugging Face model path (default: the built-in pretrained tiny Llama)")
    g.add_argument("--tokenizer", help="tokenizer path (default: the model's own)")
    g.add_argument("--cache-dir", type=Path, default=Path("~/.cache/crma_lightning/bench").expanduser())
    g.add_argument("--hidden", type=int, help="built-in base: hidden size")
    g.add_argument("--layers", type=int, help="built-in base: decoder layers")
    g.add_argument(
        "--pretrain-builtin",
        nargs="+",
        metavar="DOMAIN",
        help="built-in base: pretrain on these built-in domains (e.g. prose code) instead of the benchmark's "
        "own domains, so that every stage meets text the base has never seen (protocol v2)",
    )
    g.add_argument("--pretrain-steps", type=int, help="built-in base: full fine-tuning steps on the mix")
    g.add_argument("--pretrain-batch-size", type=int)
    g.add_argument("--pretrain-lr", type=float)
    g = p.add_argument_group("training (per stage)")
    g.add_argument("--steps", type=int, help="optimizer steps per stage")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--eval-batch-size", type=int)
    g.add_argument("--max-length", type=int, help="tokens per packed row")
    g.add_argument("--lr", type=float, help="AdamW learning rate (constant)")
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument("--lora-targets", default="all-linear", help="'all-linear' or comma-separated module names")
    g.add_argument("--seeds", type=int, help="number of seeds: first-seed, first-seed + 1, ...")
    g.add_argument("--first-seed", type=int, default=0)
    g.add_argument("--grad-warmup", type=int, default=0, help="steps per stage left out of gradient statistics")
    g = p.add_argument_group("machine")
    g.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    g.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    g.add_argument("--dtype", default="float32", help="dtype of the frozen base weights")
    g.add_argument("--threads", type=int, help="torch CPU threads (default 1 on cpu: steadier on a shared machine)")
    g.add_argument("--interleave", choices=("step", "run"), default="step", help="how the modes share the machine")
    g.add_argument("--time-skip", type=int, default=3, help="first steps of each stage left out of step times")
    args = p.parse_args(argv)
    tasks_default = args.suite == "tasks" and not (args.tiny or args.quick)
    preset = PRESETS["tiny" if args.tiny else "quick" if args.quick else "tasks" if tasks_default else "default"]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.preset = "tiny" if args.tiny else "quick" if args.quick else "tasks" if tasks_default else "default"
    if args.seeds < 1:
        p.error(f"--seeds {args.seeds}: expected a number of seeds >= 1")
    if args.suite == "tasks":  # the instruction names the task: routing is a check there, run on request only
        args.no_routing = args.no_routing or args.router is None
    args.eval_split = args.eval_split or "test"
    args.router = args.router or "perplexity"
    args.seed_list = list(range(args.first_seed, args.first_seed + args.seeds))
    args.settings = _settings(p, args.settings)
    merged = [m for m in args.settings if "merge" in SETTINGS[m]]
    if merged and MERGED_OF not in args.settings:
        p.error(f"--settings {' '.join(merged)} merge the adapters of {MERGED_OF}: add {MERGED_OF} to --settings")
    try:
        args.chosen_record = apply_chosen(args, args.chosen) if args.chosen else None
    except ValueError as err:
        p.error(str(err))
    if args.domains and len(args.domains) == 1 and "," in args.domains[0]:
        args.domains = [d for d in args.domains[0].split(",") if d]
    return args


def _settings(p: argparse.ArgumentParser, names: list[str] | None) -> list[str]:
    """``--settings`` expanded (``ablation``, ``all``, commas) and put in table order, without repeats."""
    if not names:
        return list(DEFAULT_SETTINGS)
    wanted: list[str] = []
    for name in (n for item in names for n in item.split(",") if n):
        groups = {"ablation": ABLATION_SETTINGS, "all": list(SETTINGS), "default": DEFAULT_SETTINGS, "v3": V3_SETTINGS}
        group = groups.get(name, [name])
        for setting in group:
            if setting not in SETTINGS:
                p.error(f"--settings {setting}: unknown; expected some of {list(SETTINGS)}, 'ablation', 'v3' or 'all'")
            wanted.append(setting)
    return [s for s in SETTINGS if s in wanted]


def _device(name: str) -> tuple[str, str]:
    """``(torch device, Lightning accelerator)``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return name, ("gpu" if name.startswith("cuda") else name)


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), torch {torch.__version__}"


def _git_state() -> dict[str, Any]:
    """The library's commit and whether ``crma_lightning/`` had uncommitted changes when the run started."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "crma_lightning"], cwd=root, capture_output=True, text=True
        )
    except (OSError, subprocess.CalledProcessError) as err:
        return {"commit": f"unknown ({type(err).__name__})", "library_dirty": "unknown"}
    return {"commit": commit.stdout.strip(), "library_dirty": bool(dirty.stdout.strip())}


def _quiet() -> None:
    """Silence per-trainer chatter (GPU-available notes, worker hints): 4 modes x stages x seeds of it."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    # from_pretrained leaves the base in eval mode; Lightning keeps it. No dropout here either way.
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from datasets import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars, once per run
    disable_progress_bars()  # map/filter bars while the base model's data is prepared


def base_model(args: argparse.Namespace, specs: list[dict[str, Any]], device: str) -> dict[str, Any]:
    """The base every mode starts from: ``--model`` or the cached pretrained tiny Llama."""
    if args.model:
        return {"path": args.model, "tokenizer": args.tokenizer, "description": f"`{args.model}` (given)"}
    settings = PretrainSettings(
        model_config={
            "model_type": "llama",
            "hidden_size": args.hidden,
            "intermediate_size": 2 * args.hidden,
            "num_hidden_layers": args.layers,
            "num_attention_heads": args.heads,
            "num_key_value_heads": args.kv_heads,
            "max_position_embeddings": max(256, args.max_length),
        },
        steps=args.pretrain_steps,
        batch_size=args.pretrain_batch_size,
        max_length=args.max_length,
        lr=args.pretrain_lr,
        bf16="bf16" in args.precision,
    )
    if args.suite == "tasks":
        return _task_base(args, settings, device)
    path, info = pretrained_base(specs, settings, fingerprint(specs), args.cache_dir, device)
    curve = info["loss_curve"]
    desc = (
        f"tiny Llama {args.hidden}x{args.layers} ({info['parameters']:,} params, byte tokenizer), pretrained "
        f"{settings.steps} steps x {settings.batch_size} rows on an equal mix of the training text of "
        f"{', '.join(s['name'] for s in specs)} "
        f"(final train loss {curve[-1]['loss']:.3f}{', cached' if info['cached'] else ''})"
    )
    return {"path": str(path), "tokenizer": "byte", "description": desc, "pretrain": info}


def _task_base(args: argparse.Namespace, tiny: PretrainSettings, device: str) -> dict[str, Any]:
    """The task suite's base: ``task_suite_base.py``'s model and recipe (pretraining families), or at --tiny size."""
    settings = tiny if args.preset == "tiny" else task_suite_base.SETTINGS
    path, info = pretrained_base(task_suite_base.SPECS, settings, task_fingerprint(), args.cache_dir, device)
    cfg = settings.model_config
    desc = (
        f"tiny Llama {cfg['hidden_size']}x{cfg['num_hidden_layers']} ({info['parameters']:,} params, byte tokenizer), "
        f"fully trained {settings.steps} steps x {settings.batch_size} rows on the pretraining families' tasks "
        f"({', '.join(task_suite_base.PRETRAIN_FAMILIES)}; none of the suite's; "
        f"benchmarks/task_suite_base.py's recipe; final train loss {info['loss_curve'][-1]['loss']:.3f}"
        f"{', cached' if info['cached'] else ''})"
    )
    return {"path": str(path), "tokenizer": "byte", "description": desc, "pretrain": info}


def _domains(args: argparse.Namespace) -> tuple[list[str], list[dict[str, Any]]]:
    """Domain names in the given order and their ``DomainSpec`` fields (``--suite``)."""
    if args.suite == "tasks":
        if args.data_dir is not None:
            raise ValueError("--data-dir is for --suite domains; --suite tasks runs the built-in task suite")
        names = resolve_tasks(args.domains)
        return names, task_split_specs(task_specs(names, args.max_eval_rows), args.eval_split, args.cache_dir)
    names = resolve_domains(args.data_dir, args.domains)
    specs = domain_specs(names, args.data_dir, args.cache_dir, args.max_chars, args.max_train_rows)
    return names, with_eval_split(specs, args.eval_split, args.cache_dir)  # dev / test by document (protocol v3)


def _run_order(
    args: argparse.Namespace, cfg: dict[str, Any], order: list[str], out: Path, key: str
) -> dict[str, dict[str, Any]]:
    """Every seed of one task order: ``{run group key: {"order", "domains", "runs", "pairs"}}``.

    ``key`` is ``""`` for a single order (groups keyed by seed, as before ``--orders``) or ``order<k>``.
    """
    by_name = {d["name"]: d for d in cfg["domains"]}
    joint = {d["name"]: d for d in cfg["multitask_domains"]}
    cfg = {**cfg, "domains": [by_name[n] for n in order], "multitask_domains": [joint[n] for n in order]}
    modes = list(args.settings)
    trained = [m for m in modes if "merge" not in SETTINGS[m]]  # MERGED: evaluated after FROZEN, not trained
    groups: dict[str, Any] = {}
    for i, seed in enumerate(args.seed_list):
        rotation = trained[i % len(trained) :] + trained[: i % len(trained)]  # rotate: no mode always goes first
        raws = run_seed(seed, rotation, out, cfg, args.interleave)
        for m in modes:
            if m not in trained:
                raws[m] = merged_raw(m, SETTINGS[m]["merge"], seed, raws[MERGED_OF], out)
        runs = {m: run_numbers(raws[m], args.time_skip) for m in modes}
        gap_to_joint(runs)
        pairs = pair_numbers(runs, raws, args.time_skip, args.interleave == "step")
        groups[f"{key}/seed{seed}" if key else str(seed)] = {
            "order": rotation,
            "domains": list(order),
            "runs": runs,
            "pairs": pairs,
        }
    return groups


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the content of ``results.json``."""
    args = parse_args(argv)
    if args.suite != "tasks":
        check_pretrain_disjoint(resolve_domains(args.data_dir, args.domains), args.pretrain_builtin)  # before any work
    _quiet()
    t_start = time.perf_counter()
    git_start = _git_state()  # the shared checkout may move while a long run is going: record both ends
    device, accelerator = _device(args.device)
    if device == "cpu":
        torch.set_num_threads(args.threads or 1)
    elif args.threads:
        torch.set_num_threads(args.threads)
    out: Path = args.out
    old = sorted([*out.glob("seed*"), *out.glob("order*")])
    if old and not args.overwrite:
        raise SystemExit(f"{out} already holds runs ({old[0].name}, ...): pass --overwrite or another --out")
    names, specs = _domains(args)
    orders = task_orders(names, args.orders)  # before any work: a bad --orders fails here
    # Protocol v2 (--pretrain-builtin): the base's general text is disjoint from the benchmark domains
    # (checked before earlier runs are deleted: a refused run loses nothing).
    general = specs
    if args.pretrain_builtin:
        general = domain_specs(args.pretrain_builtin, None, args.cache_dir, args.max_chars)
        check_texts_disjoint(general, specs)
    for d in old:  # only once every check passed: a refused --overwrite run keeps the previous results
        shutil.rmtree(d)
    out.mkdir(parents=True, exist_ok=True)
    print("task orders:\n" + "\n".join(f"  {k}. {' -> '.join(o)}" for k, o in enumerate(orders, 1)), flush=True)
    base = base_model(args, general, device)
    targets = "all-linear" if args.lora_targets == "all-linear" else args.lora_targets.split(",")
    cfg = {
        "model_path": base["path"], "tokenizer": base["tokenizer"], "dtype": args.dtype, "lora_r": args.lora_r,
        "lora_targets": targets, "lr": args.lr, "domains": specs, "max_length": args.max_length,
        "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size, "eval_domains": args.eval_domains,
        "max_eval_rows": args.max_eval_rows, "token_cache": str(args.cache_dir / "tokens"),
        "accelerator": accelerator, "device": device, "precision": args.precision, "steps": args.steps,
        "log_every_n_steps": 10, "grad_warmup": args.grad_warmup, "prefix_tokens": args.prefix_tokens,
        "routing": not args.no_routing, "replay_buffer": args.replay_buffer, "replay_ratio": args.replay_ratio,
        "ewc_lam": args.ewc_lam, "ewc_fisher_samples": args.ewc_fisher_samples, "olora_lam": args.olora_lam,
        "mix_g_max": args.mix_g_max, "router": args.router, "fallback_margin": args.fallback_margin,
        "packing": args.suite != "tasks",
    }  # fmt: skip
    cfg["multitask_domains"] = multitask_specs(specs, args.cache_dir) if "MULTITASK" in args.settings else specs
    modes = list(args.settings)
    per_seed: dict[str, Any] = {}
    per_order: dict[str, Any] = {}
    for k, order in enumerate(orders, 1):
        if len(orders) == 1:  # one order: today's layout, <out>/seed<s>/<SETTING>, groups keyed by seed
            per_seed.update(_run_order(args, cfg, order, out, ""))
            continue
        print(f"order {k}/{len(orders)}: {' -> '.join(order)}", flush=True)
        groups = _run_order(args, cfg, order, out / f"order{k}", f"order{k}")
        per_seed.update(groups)
        per_order[str(k)] = {"domains": order, "groups": list(groups), "aggregates": aggregate(groups)}
    agg = aggregate(per_seed)  # pooled over every (order, seed): with equal seeds per order, the mean over orders
    pairs = {x: ref for x, ref in LORA_PAIRS.items() if x in modes and ref in modes}
    if per_order:  # per order: its domains' columns are in its own order, so each order is bootstrapped alone
        intervals = {
            k: benchmark_intervals({g: per_seed[g] for g in o["groups"]}, pairs, args.resamples, args.bootstrap_seed)
            for k, o in per_order.items()
        }
    else:
        intervals = benchmark_intervals(per_seed, pairs, args.resamples, args.bootstrap_seed)
    verdict = verdicts(agg)
    setup = {
        "command": "python benchmarks/continual.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "preset": args.preset, "suite": args.suite, "domains": names, "orders": orders, "domain_files": specs,
        "multitask_domain_files": cfg["multitask_domains"] if "MULTITASK" in modes else "MULTITASK not run",
        "base_model": base,
        "modes": {m: describe(m, cfg) for m in modes}, "settings": modes,
        "seeds": args.seed_list, "steps": args.steps, "batch_size": args.batch_size,
        "max_length": args.max_length, "lr": args.lr, "lora_r": args.lora_r, "lora_targets": args.lora_targets,
        "lora_alpha": 2.0 * args.lora_r,
        "crma": "CRMAConfig() defaults (write form, spectral norm, n=4, k=4, g_max=0.1, 5 Sinkhorn iterations + 3 "
        "Newton steps, implicit backward) unless the setting says otherwise (setup.modes)",
        "methods": {"replay_buffer": args.replay_buffer, "replay_ratio": args.replay_ratio, "ewc_lam": args.ewc_lam,
                    "ewc_fisher_samples": args.ewc_fisher_samples, "olora_lam": args.olora_lam,
                    "mix_g_max": args.mix_g_max},
        "routing": {"prefix_tokens": args.prefix_tokens, "enabled": not args.no_routing,
                    "router": Null("routing is off (--no-routing, or the task suite without --router)")
                    if args.no_routing else args.router,
                    **({"fallback_margin": args.fallback_margin}
                       if args.router == "hybrid" and not args.no_routing else {})},
        "chosen": args.chosen_record or Null("no --chosen: the a-priori values (or the options given)"),
        "max_eval_rows": args.max_eval_rows, "eval_split": args.eval_split,
        "eval_domains": args.eval_domains, "grad_warmup": args.grad_warmup,
        "time_skip": args.time_skip, "interleave": args.interleave, "device": device, "precision": args.precision,
        "git": {"at_start": git_start, "at_end": _git_state()}, "machine": _machine(device),
        "python": platform.python_version(), "threads": torch.get_num_threads(),
    }  # fmt: skip
    results: dict[str, Any] = {
        "benchmark": "crma_lightning continual (issue #7; methods, routing and the CRMA v2 ablation)",
        "setup": setup,
        "per_seed": per_seed,
        "aggregates": agg,
        **({"per_order": per_order, "over_orders": over_orders(per_order)} if per_order else {}),
        "intervals": intervals,
        "targets": verdict,
        "wall_s": time.perf_counter() - t_start,
    }
    table = render(results, agg, verdict) + render_orders(results) + render_scores(results, agg)
    if per_order:
        table += "".join(f"\n\nOrder {k}:" + render_intervals(iv) for k, iv in intervals.items())
    else:
        table += render_intervals(intervals)
    reasons: dict[str, str] = {}
    payload = to_json(results, reasons)
    payload["null_reasons"] = reasons
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    (out / "results.md").write_text(table)
    print("\n" + table)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'} ({results['wall_s'] / 60:.1f} min)")
    return payload


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # bad domains / orders: one line, before any run is written (argparse's exit code)
        print(f"continual.py: error: {err}", file=sys.stderr)
        sys.exit(2)
