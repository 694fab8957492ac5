"""Running the four settings through the user code path, with step times interleaved across modes.

Each setting is one ordinary run: ``ContinualLM`` + ``SequentialDomainDataModule`` +
``ContinualRunner`` in its own run directory, with two extra callbacks: the library's
``GradientStability`` (as users get it) and :class:`StepTimer` below.

Interleaving (``interleave="step"``, the default): the four runs of a seed live in four threads, and
a :class:`Baton` lets exactly one of them execute at any moment, passing it on after every optimizer
step - A, B, C, D, A, B, ... So all modes share the machine's slow and fast moments step by step (a
job starting on a shared machine slows every mode alike), and nothing ever runs concurrently: a
step is timed alone. Nothing in a training step reads global state that another run changes
between steps (no dropout; the samplers have their own generators), so the numbers equal those of
sequential runs; ``interleave="run"`` runs them one after another (rotated order per seed) for
models too large to keep four copies in memory.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch

from crma_lightning.adapters import CRMAConfig, LoRAConfig, crma_adapters
from crma_lightning.callbacks.domain_evaluation import DomainEvaluation
from crma_lightning.callbacks.gradient_stability import GradientStability
from crma_lightning.callbacks.routed_evaluation import RoutedEvaluation
from crma_lightning.data.datamodule import SequentialDomainDataModule
from crma_lightning.methods import EWC, ContinualMethod, OLoRA, Replay
from crma_lightning.model.continual_lm import ContinualLM
from crma_lightning.run.runner import ContinualRunner

SETTINGS: dict[str, dict[str, Any]] = {
    # The four adapter arrangements of docs/method.md.
    "NAIVE": {"adapter": "lora", "task_adapters": "shared", "routing": "none"},
    "FROZEN": {"adapter": "lora", "task_adapters": "per_task", "routing": "perplexity"},
    "MODULAR": {"adapter": "crma", "task_adapters": "per_task", "routing": "perplexity"},
    "CRMA-shared": {"adapter": "crma", "task_adapters": "shared", "routing": "none"},
    # The continual-learning methods (crma_lightning.methods), each on plain LoRA.
    "REPLAY": {"adapter": "lora", "task_adapters": "shared", "method": "replay", "routing": "none"},
    "EWC": {"adapter": "lora", "task_adapters": "shared", "method": "ewc", "routing": "none"},
    "O-LORA": {"adapter": "lora", "task_adapters": "per_task", "method": "olora", "routing": "none"},
    # The upper bound (issue 23): NAIVE's adapter, but every stage trains on the union of all domains
    # (``cfg["multitask_domains"]``, see suites.multitask_specs): joint training, same total step budget.
    "MULTITASK": {"adapter": "lora", "task_adapters": "shared", "routing": "none", "data": "union"},
    # CRMA v2 ablation (issue 15): MODULAR / CRMA-shared above are v2's defaults (write form, spectral norm,
    # g_max 0.1); "-v1" is the write form with v1's Frobenius norm; "-mix" is the mix form (g_max = --mix-g-max;
    # the mix form ignores ``norm``: its R has orthonormal rows, so there is no frobenius/spectral mix pair).
    "MODULAR-v1": {"adapter": "crma", "task_adapters": "per_task", "crma": {"norm": "frobenius"}, "routing": "oracle"},
    "MODULAR-mix": {"adapter": "crma", "task_adapters": "per_task", "crma": {"form": "mix"}, "routing": "oracle"},
    "CRMA-shared-v1": {"adapter": "crma", "task_adapters": "shared", "crma": {"norm": "frobenius"}, "routing": "none"},
    "CRMA-shared-mix": {"adapter": "crma", "task_adapters": "shared", "crma": {"form": "mix"}, "routing": "none"},
    # The write form with a larger gate (spectral norm): g_max 0.5, the capacity probe of issue 15.
    "MODULAR-g0.5": {"adapter": "crma", "task_adapters": "per_task", "crma": {"g_max": 0.5}, "routing": "oracle"},
    "CRMA-shared-g0.5": {"adapter": "crma", "task_adapters": "shared", "crma": {"g_max": 0.5}, "routing": "none"},
    # Not trained: the FROZEN run's per-task LoRAs merged into one adapter (issue 24, ``lib/merged.py``).
    "MERGED-mean": {"adapter": "lora", "task_adapters": "per_task", "merge": "mean", "routing": "merged"},
    "MERGED-ties": {"adapter": "lora", "task_adapters": "per_task", "merge": "ties", "routing": "merged"},
}
"""Every setting the benchmark can run, in table order. ``routing``: the run's ``RoutedEvaluation`` mode -
``perplexity`` for settings whose evaluation needs task identity (per-task adapters; also evaluated routed,
next to the oracle numbers), ``none`` for settings that need none (one shared adapter, or O-LoRA's stack:
the callback checks it, and routed = oracle), ``oracle`` for the per-task ablation variants (routing is not
what they are compared on; it would double their evaluation cost), ``merged`` for the MERGED settings (one
adapter for every domain: no task identity needed)."""

MODES = SETTINGS  # the name of earlier versions

DEFAULT_SETTINGS = ["NAIVE", "FROZEN", "MODULAR", "CRMA-shared", "REPLAY", "EWC", "O-LORA"]
"""What ``continual.py`` runs without ``--settings``."""

V3_SETTINGS = [*DEFAULT_SETTINGS, "MULTITASK"]
"""``--settings v3``: the default settings and the joint-training upper bound (protocol v3)."""

ABLATION_SETTINGS = ["NAIVE", "FROZEN", "CRMA-shared-v1", "MODULAR-v1", "CRMA-shared-mix", "MODULAR-mix"]
"""``--settings ablation``: the CRMA variants that are not in the default set, with their LoRA references."""


def mode_cfg(mode: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The benchmark settings as ``mode`` runs them: ``cfg`` with the setting's own ``params`` on top.

    ``params`` are set by the variants of :mod:`variants` (a method at other hyper-parameters: the dev
    sweep's grid points, the a-priori rows next to dev-chosen values).
    """
    return {**cfg, **SETTINGS[mode].get("params", {})}


def crma_config(mode: str, cfg: dict[str, Any]) -> CRMAConfig:
    """The CRMA configuration of ``mode``: library defaults, then the setting's overrides."""
    fields = dict(SETTINGS[mode].get("crma", {}))
    if fields.get("form") == "mix":
        fields.setdefault("g_max", cfg.get("mix_g_max", 0.5))
    return CRMAConfig(**fields)


def build_method(mode: str, seed: int, cfg: dict[str, Any]) -> ContinualMethod | None:
    """A fresh method object for one run of ``mode`` (``None``: plain fine-tuning)."""
    name = SETTINGS[mode].get("method")
    if name == "replay":
        return Replay(buffer_size=cfg["replay_buffer"], ratio=cfg["replay_ratio"], seed=seed)
    if name == "ewc":
        return EWC(lam=cfg["ewc_lam"], fisher_samples=cfg["ewc_fisher_samples"])
    if name == "olora":
        return OLoRA(lam=cfg["olora_lam"])
    return None


def routing_mode(mode: str, cfg: dict[str, Any]) -> str:
    """``RoutedEvaluation`` mode of ``mode``'s runs (``cfg["routing"] = False``: perplexity becomes oracle;
    ``cfg["router"] = "prototype"`` or ``"hybrid"``: the routed settings are routed by prototype instead of
    perplexity; the hybrid is prototype routing with ``cfg["fallback_margin"]``)."""
    wanted = SETTINGS[mode]["routing"]
    if wanted == "perplexity" and not cfg.get("routing", True):
        return "oracle"
    router = cfg.get("router", "perplexity")
    return ("prototype" if router == "hybrid" else router) if wanted == "perplexity" else wanted


def fallback_margin(mode: str, cfg: dict[str, Any]) -> float | None:
    """The hybrid's margin for ``mode``'s routed evaluation (``None``: not the hybrid)."""
    hybrid = cfg.get("router") == "hybrid" and routing_mode(mode, cfg) == "prototype"
    return cfg.get("fallback_margin") if hybrid else None


def describe(mode: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """What ``mode`` is, for ``results.json``: adapter, sharing, CRMA fields that differ, method, routing."""
    spec, cfg = SETTINGS[mode], mode_cfg(mode, cfg)
    out: dict[str, Any] = {"adapter": spec["adapter"], "task_adapters": spec["task_adapters"]}
    if spec["adapter"] == "crma":
        c = crma_config(mode, cfg)
        out["crma"] = {"form": c.form, "norm": c.norm if c.form == "write" else "(unused by mix)", "g_max": c.g_max}
    method = build_method(mode, 0, cfg)
    config = {k: v for k, v in (method.config() if method is not None else {}).items() if v is not None}
    out["method"] = {"name": method.name, **config} if method is not None else "none"
    if method is not None and "seed" in getattr(method, "__dict__", {}):
        out["method"]["seed"] = "the run's seed"
    mode_ = routing_mode(mode, cfg)
    routed = mode_ in ("perplexity", "prototype")
    out["routing"] = {"mode": mode_, **({"prefix_tokens": cfg["prefix_tokens"]} if routed else {})}
    if fallback_margin(mode, cfg) is not None:
        out["routing"]["fallback_margin"] = fallback_margin(mode, cfg)
    if "merge" in spec:
        out["merge"] = {"how": spec["merge"], "of": "FROZEN", **({"density": 0.2} if spec["merge"] == "ties" else {})}
    if spec.get("data") == "union":
        out["data"] = "every stage trains on the union of all domains' training rows (joint training)"
    if spec.get("params"):
        out["params"] = dict(spec["params"])
    return out


class Baton:
    """Strict round-robin among threads: only the holder runs; ``pass_on`` hands over and waits.

    Args:
        names: Participants in turn order; the first one holds the baton at the start.
    """

    def __init__(self, names: list[str]) -> None:
        self._order = list(names)
        self._turn = self._order[0] if self._order else None
        self._cv = threading.Condition()

    def acquire(self, name: str) -> None:
        """Block until it is ``name``'s turn."""
        with self._cv:
            self._cv.wait_for(lambda: self._turn == name)

    def pass_on(self, name: str) -> None:
        """Hand the baton to the next participant, then block until it comes back."""
        with self._cv:
            self._advance(name)
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._turn == name)

    def leave(self, name: str) -> None:
        """``name`` is done (or failed): drop it from the rotation, handing over if it held the baton."""
        with self._cv:
            if name in self._order:
                if self._turn == name:
                    self._advance(name)
                self._order.remove(name)
                if not self._order:
                    self._turn = None
            self._cv.notify_all()

    def _advance(self, name: str) -> None:
        i = self._order.index(name)
        self._turn = self._order[(i + 1) % len(self._order)]


class StepTimer(L.Callback):
    """Wall time of every training batch (= one optimizer step: no gradient accumulation here).

    ``perf_counter`` is read at ``on_train_batch_start`` and ``on_train_batch_end``, so a step is forward,
    loss, backward, gradient statistics and the optimizer update - the data loading before it is left
    out (it is the same for every mode). On CUDA the device is synchronised at both ends. The first
    ``skip`` steps of each stage are recorded but marked, for a median free of start-up effects.

    Args:
        device: Torch device type of the run (``cpu``/``cuda``).
        baton: When set, the baton is passed on after every step (step-interleaved modes).
        name: This run's name on the baton.
    """

    def __init__(self, device: str, baton: Baton | None = None, name: str = "") -> None:
        self.cuda = device.startswith("cuda")
        self.baton = baton
        self.name = name
        self.times: dict[str, list[float]] = {}  # stage (task) -> seconds per step, in order
        self._t0 = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int):
        if self.cuda:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        if self.cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._t0
        self.times.setdefault(str(pl_module.current_task), []).append(elapsed)
        if self.baton is not None:
            self.baton.pass_on(self.name)


def build_run(mode: str, seed: int, run_dir: Path, cfg: dict[str, Any], timer: StepTimer):
    """Model, datamodule and runner of one setting, exactly as a user would build them.

    Args:
        mode: One of :data:`SETTINGS`.
        seed: The run's seed (model adapters, data order, stage seeds).
        run_dir: The run's directory.
        cfg: Benchmark settings (see ``continual.run_config``).
        timer: The step timer for this run.

    Returns:
        ``(runner, model, datamodule)``.
    """
    cfg = mode_cfg(mode, cfg)
    lora = LoRAConfig(r=cfg["lora_r"], alpha=2.0 * cfg["lora_r"], target_modules=cfg["lora_targets"])
    model = ContinualLM(
        model_name_or_path=cfg["model_path"],
        tokenizer=cfg["tokenizer"],
        dtype=cfg["dtype"],
        lora=lora,
        crma=crma_config(mode, cfg),
        optimizer=partial(torch.optim.AdamW, lr=cfg["lr"], weight_decay=0.0),
        seed=seed,
        adapter=SETTINGS[mode]["adapter"],
        task_adapters=SETTINGS[mode]["task_adapters"],
        method=build_method(mode, seed, cfg),
    )
    dm = SequentialDomainDataModule(
        domains=cfg["multitask_domains"] if SETTINGS[mode].get("data") == "union" else cfg["domains"],
        max_length=cfg["max_length"],
        packing=cfg.get("packing", True),
        batch_size=cfg["batch_size"],
        eval_batch_size=cfg["eval_batch_size"],
        eval_domains=cfg["eval_domains"],
        max_eval_rows=cfg["max_eval_rows"],
        seed=seed,
        cache_dir=cfg["token_cache"],
    )
    trainer_kwargs = {
        "accelerator": cfg["accelerator"],
        "devices": 1,
        "precision": cfg["precision"],
        "max_steps": cfg["steps"],
        "log_every_n_steps": cfg["log_every_n_steps"],
        "check_val_every_n_epoch": 10**6,  # no validation inside fit: the runner evaluates after each stage
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    routing = RoutedEvaluation(
        routing_mode(mode, cfg), cfg["prefix_tokens"], fallback_margin=fallback_margin(mode, cfg)
    )
    # row_losses: each held-out row's numbers per stage (heldout_rows.json), for the bootstrap intervals.
    callbacks = [GradientStability(warmup_steps=cfg["grad_warmup"]), DomainEvaluation(row_losses=True), routing, timer]
    runner = ContinualRunner(
        run_dir=run_dir,
        trainer_kwargs=trainer_kwargs,
        callbacks=callbacks,
        seed=seed,
        resume="never",
        config={"benchmark": {"mode": mode, "seed": seed}},
    )
    return runner, model, dm


@torch.no_grad()
def crma_effect(model: ContinualLM, dm: SequentialDomainDataModule, device: str, rows: int = 8) -> dict[str, Any]:
    """How much the trained CRMA adapters actually change the residual stream, on held-out rows.

    For every CRMA block, ``||h' - h|| / ||h||`` per token on up to ``rows`` full held-out rows of each
    domain (with that domain's adapter active), next to the structural bound ``g_max`` and the
    operator bound ``||E||_2 · ||R||_2`` of the trained parameters (``E = effective_write()``: ``g W (M ⊗ I)``
    in the write form, ``g Rᵀ ((M - I) ⊗ I)`` in the mix form).

    Args:
        model: The trained model (after the last stage).
        dm: Its datamodule (prepared: the held-out rows are tokenised).
        device: Torch device for the forward passes.
        rows: Held-out rows per domain.

    Returns:
        ``{"rel_update_mean", "rel_update_max", "gate_mean", "operator_bound_mean", "g_max"}``, or an
        empty dict when the model has no CRMA adapters.
    """
    adapters = [a for _, a in crma_adapters(model.model)]
    if not adapters:
        return {}
    ratios: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        h = args[0].float()
        ratios.append(((out.float() - h).norm(dim=-1) / h.norm(dim=-1).clamp_min(1e-12)).flatten().cpu())

    handles = [a.register_forward_hook(hook) for a in adapters]
    model.to(device).eval()
    try:
        for name in dm.domain_names:
            ids = [r for r in dm.eval_sets[name]["input_ids"] if len(r) == dm.max_length][:rows]
            if ids:
                model.activate_task(name)
                model(torch.tensor(ids, device=device))
    finally:
        for handle in handles:
            handle.remove()
    # h' - h = E (R h) with E = effective_write() (g W (M ⊗ I) for the write form, g Rᵀ ((M - I) ⊗ I) for mix).
    bounds = [
        float(torch.linalg.matrix_norm(a.effective_write(), 2) * torch.linalg.matrix_norm(a.read(), 2))
        for a in adapters
    ]
    if not ratios:
        return {}
    every = torch.cat(ratios)
    return {
        "rel_update_mean": float(every.mean()),
        "rel_update_max": float(every.max()),
        "gate_mean": sum(float(a.gate()) for a in adapters) / len(adapters),
        "operator_bound_mean": sum(bounds) / len(bounds),
        "g_max": adapters[0].config.g_max,
    }


def _run_one(mode: str, seed: int, run_dir: Path, cfg: dict[str, Any], baton: Baton | None) -> dict[str, Any]:
    """One setting end to end; never raises (a failure is recorded, the other modes go on)."""
    timer = StepTimer(cfg["accelerator"], baton, mode)
    t0 = time.perf_counter()
    try:
        if baton is not None:
            baton.acquire(mode)
        runner, model, dm = build_run(mode, seed, run_dir, cfg, timer)
        report = runner.run(model, dm)
        effect = crma_effect(model, dm, cfg["device"])
        error = None
    except Exception as err:  # a diverging or crashing mode is a result, not the end of the benchmark
        report, effect, error = None, {}, f"{type(err).__name__}: {err}"
        traceback.print_exc()
    finally:
        if baton is not None:
            baton.leave(mode)
    return {
        "mode": mode,
        "seed": seed,
        "run_dir": str(run_dir),
        "report": report,
        "error": error,
        "step_times": timer.times,
        "crma_effect": effect,
        "wall_s": time.perf_counter() - t0,
    }


def run_seed(
    seed: int, order: list[str], out: Path, cfg: dict[str, Any], interleave: str, log: Callable[[str], None] = print
) -> dict[str, dict[str, Any]]:
    """All modes of one seed, in ``order``; returns ``{mode: raw result}``.

    Args:
        seed: The benchmark seed (the runs get it as their seed).
        order: Modes in the order they take turns (``step``) or run (``run``).
        out: The benchmark's output directory; run ``m`` goes to ``out/seed<seed>/<m>``.
        cfg: Benchmark settings.
        interleave: ``"step"`` (threads, one optimizer step per turn) or ``"run"`` (one run after another).
        log: Progress printer.
    """
    dirs = {m: out / f"seed{seed}" / m for m in order}
    results: dict[str, dict[str, Any]] = {}
    if interleave == "run":
        for m in order:
            log(f"seed {seed}: {m}")
            results[m] = _run_one(m, seed, dirs[m], cfg, None)
        return results
    baton = Baton(order)
    threads = []
    for m in order:
        t = threading.Thread(
            target=lambda m=m: results.__setitem__(m, _run_one(m, seed, dirs[m], cfg, baton)),
            name=f"bench-{m}-seed{seed}",
            daemon=True,  # Ctrl+C in the main thread ends the process
        )
        threads.append(t)
        t.start()
    log(f"seed {seed}: {', '.join(order)} interleaved step by step")
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.5)
    return {m: results[m] for m in order}
