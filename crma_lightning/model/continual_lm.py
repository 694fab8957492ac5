"""``ContinualLM``: a Hugging Face causal LM with LoRA/CRMA adapters, one task (domain) at a time.

Research code subclasses it and overrides small hooks:

* :meth:`ContinualLM.compute_loss` - the training objective (e.g. add a regulariser);
* :meth:`ContinualLM.on_task_start` - what happens when a new task begins (after its adapter exists);
* :meth:`ContinualLM.trainable_parameters` / :meth:`ContinualLM.param_groups` - what trains, and how
  parameters are grouped for the optimizer.

A continual-learning ``method`` (replay, EWC, O-LoRA) is called from here: :mod:`crma_lightning.methods.hooks`.

Checkpoints hold only what trains - every LoRA adapter, the CRMA backbone, any parameter a subclass
unfreezes - plus the continual state; never the frozen base weights.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from transformers import PreTrainedTokenizerBase

from crma_lightning.adapters import AdapterType, CRMAConfig, LoRAConfig, attach_adapters, check_adapter_type
from crma_lightning.callbacks.domain_evaluation import DomainEvaluation
from crma_lightning.callbacks.guards import FollowDataModuleStage, RestoreTrainingAdapter, SkipNonFiniteSteps
from crma_lightning.losses import row_token_losses, token_losses
from crma_lightning.methods import ContinualMethod
from crma_lightning.methods import hooks as method_hooks
from crma_lightning.model import hparams
from crma_lightning.model.base_model import build_model, load_model_tokenizer
from crma_lightning.model.checkpoint_state import AdapterStateMixin
from crma_lightning.model.compile import compile_decoder_layers
from crma_lightning.model.identity import model_identity_differences
from crma_lightning.model.nonfinite import NonFiniteGuard
from crma_lightning.model.optim import adapter_param_groups, prefer_fused
from crma_lightning.model.rng import rng_state, set_rng_state
from crma_lightning.model.task_adapters import SHARED_ADAPTER, TASK_ADAPTER_MODES, TaskAdapterMode, TaskAdapters
from crma_lightning.model.task_generation import TaskGeneration
from crma_lightning.parallel.dist import is_global_zero
from crma_lightning.parallel.fsdp2 import fsdp2_mixed_precision
from crma_lightning.parallel.plain import shard_under_plain_strategy
from crma_lightning.parallel.rank0_init import has_meta_tensors
from crma_lightning.routing.prototype import PrototypeRouter

ROUTER_KEY = "prototype_router"
"""Checkpoint entry of the prototype routing statistics (``ContinualLM.router``)."""


class ContinualLM(AdapterStateMixin, TaskGeneration, L.LightningModule):
    """A causal LM fine-tuned on a sequence of tasks with LoRA (``adapter="lora"``) or LoRA + CRMA.

    Args:
        model_name_or_path: Local path or hub id for ``AutoModelForCausalLM.from_pretrained``.
        model_config: Instead, build a randomly initialised model from this config dict (it must hold
            ``model_type``; ``vocab_size`` defaults to the tokenizer's) - tests and the demo use this.
        tokenizer: Tokenizer path/hub id, ``"byte"`` for the built-in byte tokenizer, or ``None`` for
            the model's own (``"byte"`` when the model is built from a config).
        dtype: dtype of the frozen base weights (``float32``, ``bfloat16``, ``float16`` or ``auto``).
            Adapters always keep float32 weights.
        trust_remote_code: Allow a hub model's own Python code to run. Off unless you set it.
        adapter: ``"lora"`` or ``"crma"`` (LoRA plus a CRMA adapter after every decoder layer).
        task_adapters: ``"shared"`` (one LoRA trains through every stage) or ``"per_task"`` (a fresh
            LoRA per task; earlier ones are frozen and each domain is evaluated with its own).
        lora: LoRA hyper-parameters.
        crma: CRMA hyper-parameters (used with ``adapter="crma"``).
        optimizer: Optimizer class path + init args (LightningCLI style); called with the parameter groups.
        lr_scheduler: Optional LR scheduler class path + init args; stepped every optimizer step.
        crma_structural_lr: Learning rate of the CRMA mixing logits ``Λ`` (default: the optimizer's).
        crma_gate_lr: Learning rate of the CRMA gate logits ``γ`` (default: the optimizer's).
        crma_projection_lr: Learning rate of the CRMA projections ``R~``/``W~`` (default: the optimizer's).
        seed: Seed for building the model from a config and for the adapters' initialisation.
        gradient_checkpointing: Recompute activations in the backward pass (less memory, more time).
        max_nonfinite_steps: Stop with an error after this many consecutive steps with a non-finite
            loss or gradient; such steps are skipped (no parameter update) and counted.
        fsdp_mixed_precision: FSDP2 only (``AdapterModelParallelStrategy``): ``"bf16"`` all-gathers and
            computes in bf16 and reduces gradients in float32; the sharded parameters and the optimizer
            keep their own dtype (CRMA adapters keep float32 throughout). ``None``: no policy. Under
            FSDP1 use the strategy's ``mixed_precision``/the trainer's ``precision`` instead.
        fsdp_activation_checkpointing: FSDP1/FSDP2 only: recompute each decoder block's activations in
            the backward pass (per block, CRMA included; parameter names are unchanged).
        init_on_rank0: FSDP1/FSDP2 only: only global rank 0 reads the base weights and initialises the
            adapters; every other rank builds the model on the meta device (no host memory) and receives
            its shards from rank 0 when the strategy shards (docs/distributed.md, "Start-up memory").
            The numbers are those of a run without it.
        compile: ``torch.compile`` every decoder layer (LoRA included; CRMA's per-block application stays
            eager) when the model is configured, after sharding (:mod:`crma_lightning.model.compile`).
        method: A continual-learning method (``class_path: crma_lightning.methods.Replay`` / ``EWC`` /
            ``OLoRA`` + ``init_args``); ``None``: plain sequential fine-tuning.
    """

    keep_row_losses: bool = False
    """``validation_step`` also returns per-row loss sums and token counts (``DomainEvaluation`` sets it)."""

    def __init__(
        self,
        model_name_or_path: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        adapter: AdapterType = "crma",
        task_adapters: TaskAdapterMode = "per_task",
        lora: LoRAConfig | None = None,
        crma: CRMAConfig | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        crma_structural_lr: float | None = None,
        crma_gate_lr: float | None = None,
        crma_projection_lr: float | None = None,
        seed: int = 0,
        gradient_checkpointing: bool = False,
        max_nonfinite_steps: int = 10,
        fsdp_mixed_precision: str | None = None,
        fsdp_activation_checkpointing: bool = False,
        method: ContinualMethod | None = None,
        init_on_rank0: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        # Checked before the base model loads (minutes for a large one), not when adapters are attached.
        check_adapter_type(adapter)
        if task_adapters not in TASK_ADAPTER_MODES:
            raise ValueError(f"task_adapters={task_adapters!r} is invalid: expected one of {list(TASK_ADAPTER_MODES)}")
        lora, crma = _as_config(lora, LoRAConfig), _as_config(crma, CRMAConfig)
        # Every init argument of the class chain (a subclass's own too), as plain values (hparams.py).
        recorded = hparams.init_arguments(inspect.currentframe(), ContinualLM)
        self.save_hyperparameters(hparams.plain({**recorded, "lora": lora, "crma": crma, "method": method}))
        self.adapter = adapter
        self.task_adapters = task_adapters
        self.lora_config = lora
        # The one home of the run's CRMA settings (None without CRMA): the adapters hold this object, and the
        # identity, the report and every adapter file read it from there.
        self.crma_config: CRMAConfig | None = crma if adapter == "crma" else None
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.crma_lrs = {
            "crma_structural": crma_structural_lr,
            "crma_gate": crma_gate_lr,
            "crma": crma_projection_lr,
        }
        _check_optimizer(optimizer, lr_scheduler, self.crma_lrs)  # before any model is built or file written
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        self.optimizer_settings: dict[str, Any] = {}  # filled when the optimizer is built
        fsdp2_mixed_precision(fsdp_mixed_precision)  # validate now, not when the strategy shards
        self.fsdp_mixed_precision = fsdp_mixed_precision
        self.fsdp_activation_checkpointing = fsdp_activation_checkpointing
        self.init_on_rank0 = init_on_rank0
        self.compile_layers = compile
        self.method = method_hooks.check_method(method, task_adapters)
        self.method_set_up = False  # method.setup ran (once, when the task adapters exist: prepare_tasks)

        self.tokenizer: PreTrainedTokenizerBase = load_model_tokenizer(model_name_or_path, tokenizer, trust_remote_code)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            meta = init_on_rank0 and not is_global_zero()  # filled from rank 0 when sharded
            self.model = build_model(model_name_or_path, model_config, self.tokenizer, dtype, trust_remote_code, meta)
            # Validates everything (adapter type, targets, ranks, CRMA sizes) before touching the model.
            self.attached_adapters = attach_adapters(
                self.model, adapter, lora, crma, adapter_name=SHARED_ADAPTER if task_adapters == "shared" else None
            )
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # `from_pretrained` returns the model in eval mode and Lightning keeps submodules' modes: without this
        # the base model's dropout would be silently off in training (unlike a model built from a config).
        self.model.train()
        self.task_adapter_state = TaskAdapters(self.model, task_adapters, lora, seed)
        # Held-out domain -> the task whose adapter evaluates it (None: LoRA off), where not the domain's own.
        self.evaluation_tasks: dict[str, str | None] = {}
        # Prototype routing statistics (``routing: {mode: prototype}`` fits them at each stage's end), else None.
        self.router: PrototypeRouter | None = None

    # ------------------------------------------------------------------ tasks
    @property
    def tasks(self) -> list[str]:
        """The run's tasks (domains) in training order."""
        return self.task_adapter_state.tasks

    @property
    def current_task(self) -> str | None:
        """The task now training (``None`` before the first stage)."""
        return self.task_adapter_state.current

    @current_task.setter
    def current_task(self, task: str | None) -> None:
        self.task_adapter_state.current = task

    def adapter_for(self, task: str) -> str:
        """Name of the LoRA adapter that serves ``task``."""
        return self.task_adapter_state.adapter_for(task)

    def prepare_tasks(self, tasks: list[str]) -> None:
        """Register the run's tasks up front and create their adapters (frozen, inactive).

        Creating every adapter before training keeps the parameter set fixed for the whole run, which
        sharded (FSDP) and replicated (DDP) training need.
        """
        for task in tasks:
            self.task_adapter_state.ensure(task)
        method_hooks.setup(self)

    def begin_task(self, task: str, resumed: bool = False) -> None:
        """Start training ``task``: create/activate its adapter, freeze the other tasks' adapters.

        ``per_task``: a fresh adapter for the task, all earlier ones frozen. ``shared``: the one adapter
        keeps training. CRMA adapters (``adapter="crma"``) train in every stage.

        Args:
            task: The task (domain) name.
            resumed: The stage continues from a mid-stage checkpoint: :meth:`on_task_start` already ran
                when the stage first began and is not called again (keep per-task state of a subclass in
                ``on_save_checkpoint``/``on_load_checkpoint``, as ``examples/anchored_crma.py`` does).
        """
        self.task_adapter_state.train(task)
        if not resumed:
            self.on_task_start(task, self.tasks.index(task))
        method_hooks.start_task(self)

    def evaluation_task(self, domain: str) -> str | None:
        """The task whose adapter evaluates held-out ``domain`` (``None``: LoRA off).

        As set in :attr:`evaluation_tasks` (``crma-lightning evaluate --data`` sets it), else the domain's
        own task, else ``None``.
        """
        if domain in self.evaluation_tasks:
            return self.evaluation_tasks[domain]
        return domain if domain in self.tasks else None

    def activate_task(self, task: str | None) -> None:
        """Activate ``task``'s adapter(s) (the method's choice, else the task's own); ``None``: LoRA off."""
        # The method chooses for the run's tasks only: another adapter (a merge) is activated as itself.
        chosen = method_hooks.active_adapters(self, task) if task is None or task in self.tasks else None
        self.task_adapter_state.activate(task, chosen)

    def end_task(self, task: str, train_batches: Any = None, train_rows: Any = None) -> None:
        """Stage ``task`` finished training: :meth:`on_task_end`, then the method's (batches in a fixed order, rows)."""
        index = self.tasks.index(task)
        self.on_task_end(task, index)
        method_hooks.end_task(self, task, index, train_batches, train_rows)

    def on_task_start(self, task: str, index: int) -> None:
        """Hook: called by :meth:`begin_task` once the task's adapter is active and trainable."""

    def on_task_end(self, task: str, index: int) -> None:
        """Hook: called by :meth:`end_task` after the stage's last optimizer step, before its evaluation."""

    # ------------------------------------------------------------------ multi-device

    def configure_model(self) -> None:
        """Shard the model for FSDP; a no-op on one device and under DDP.

        Lightning calls this at the start of every ``fit``/``validate``, inside the strategy's contexts.
        A strategy that has ``shard_continual_model(module)`` - :mod:`crma_lightning.parallel`'s
        ``AdapterModelParallelStrategy`` (FSDP2) and ``AdapterFSDPStrategy`` (FSDP1) - shards it; under
        Lightning's plain ``ModelParallelStrategy`` / ``FSDPStrategy`` the same layout is applied with a
        warning (their checkpoints gather the whole frozen base). Idempotent: what is already sharded
        is skipped. All per-task adapters exist before the first ``fit`` (:meth:`prepare_tasks`), so the
        sharded parameter set never changes; only ``requires_grad`` flips between stages.
        """
        strategy = self._trainer.strategy if self._trainer is not None else None
        shard = getattr(strategy, "shard_continual_model", None)
        if shard is not None:
            shard(self)
        else:
            shard_under_plain_strategy(self, strategy)
        if self.compile_layers:
            compile_decoder_layers(self.model)
        if self.init_on_rank0 and has_meta_tensors(self.model):
            raise ValueError(
                f"init_on_rank0=True needs a sharding strategy (FSDP1/FSDP2) to fill this rank's model from rank 0; "
                f"got {type(strategy).__name__}: use init_on_rank0=False"
            )

    def configure_callbacks(self) -> list[L.Callback]:
        """Callbacks the module brings to every trainer (the guards, and evaluation when the trainer has none).

        The non-finite step guard, the adapter restore, the stage follower of a plain ``trainer.fit``
        loop, and ``DomainEvaluation`` unless the trainer has one. They live in callbacks (run after the
        trainer's own, e.g. ``GradientStability``) rather than in module hooks, so a subclass overriding
        ``on_before_optimizer_step``, ``on_validation_end`` or ``setup`` without calling ``super()``
        cannot drop them. Extend with ``[*super().configure_callbacks(), ...]``.
        """
        present = [] if self._trainer is None else self._trainer.callbacks
        if any(isinstance(cb, SkipNonFiniteSteps) for cb in present):
            return []  # already attached to this trainer (a validate after its fit): nothing to replace
        # Without DomainEvaluation, validation_step's sums would reach no logger: `trainer.validate` would return
        # [{}]. One given to the trainer (the stage driver's, which holds the run's matrix) is never replaced.
        evaluation = [] if any(isinstance(cb, DomainEvaluation) for cb in present) else [DomainEvaluation()]
        return [SkipNonFiniteSteps(), RestoreTrainingAdapter(), FollowDataModuleStage(), *evaluation]

    # ------------------------------------------------------------------ parameters

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Hook: the ``(name, parameter)`` pairs that train in the current task."""
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    def param_groups(self) -> list[dict[str, Any]]:
        """Hook: optimizer parameter groups ``lora``, ``crma``, ``crma_structural``, ``crma_gate``, ``other``.

        ``crma`` holds the projections ``R~``, ``W~``, ``crma_structural`` the logits ``Λ``, ``crma_gate``
        ``γ``. A CRMA group gets its own learning rate when ``crma_projection_lr`` / ``crma_structural_lr`` /
        ``crma_gate_lr`` is set; the rest use the optimizer's. Empty groups are left out
        (:func:`~crma_lightning.model.optim.adapter_param_groups`).
        """
        params = (p for _, p in self.trainable_parameters())
        return adapter_param_groups(self.model, params, self.crma_lrs)

    def configure_optimizers(self) -> Any:
        groups = self.param_groups()
        if not groups:
            raise ValueError(
                "nothing to train: no parameter requires grad. Fit with a SequentialDomainDataModule "
                "(dm.set_stage(i); trainer.fit(model, datamodule=dm) begins task i), or call "
                "model.begin_task(name) first (docs/subclassing.md, 'Training from Python')"
            )
        optimizer = prefer_fused(self.optimizer_factory(groups))
        # For the HParams tab: the factory is a callable, its settings show only on the built optimizer.
        self.optimizer_settings = {"class": hparams.class_path(optimizer), "lr": optimizer.defaults.get("lr")}
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ steps

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(batch, seq, vocab)``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    @staticmethod
    def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed next-token cross-entropy and the number of target tokens (labels -100 are ignored)."""
        return token_losses(logits, labels)

    def compute_loss(self, batch: dict[str, Any], logits: torch.Tensor) -> torch.Tensor:
        """Hook: the training loss for one batch - by default the mean next-token cross-entropy."""
        total, count = self.token_losses(logits, batch["labels"])
        return total / count.clamp_min(1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        loss = self.compute_loss(batch, logits)
        loss = method_hooks.add_penalty(self, loss, batch_size=batch["input_ids"].size(0))
        # Not prog_bar: Lightning would turn it into a number after every batch (a host sync per step);
        # the stage progress bar shows it as of each logging step (callbacks/progress.py).
        self.log("train/loss", loss, batch_size=batch["input_ids"].size(0))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Evaluate one held-out batch of ``batch["domain"]`` with that domain's adapter active.

        Returns the summed loss and token count; ``DomainEvaluation`` turns them into token-weighted
        means per domain (``val/<domain>/loss``) and into the loss matrix. With ``keep_row_losses``
        (set by ``DomainEvaluation(row_losses=True)``) also each row's summed loss and token count.
        """
        domain = batch["domain"]
        self.activate_task(self.evaluation_task(domain))
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        total, count = self.token_losses(logits, batch["labels"])
        out = {"loss_sum": total.detach(), "tokens": count.detach(), "domain": domain}
        if self.keep_row_losses:  # a second, per-row reduction: only when asked (default runs pay nothing)
            rows, counts = row_token_losses(logits, batch["labels"])
            out.update(row_loss_sums=rows.detach(), row_tokens=counts.detach())
        return out

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["continual_model"] = {
            "class_path": hparams.class_path(self),  # load_from_checkpoint rebuilds this class (a subclass too)
            "tasks": list(self.tasks),
            "current_task": self.current_task,
            "identity": self.identity(),
            "nonfinite": self.nonfinite.state_dict(),
            "rng": rng_state(),
        }
        checkpoint[method_hooks.CHECKPOINT_KEY] = method_hooks.save_state(self.method)
        if self.router is not None:
            checkpoint[ROUTER_KEY] = self.router.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("continual_model")
        if state is None:
            raise ValueError("not a crma_lightning checkpoint: it has no 'continual_model' entry")
        problems = model_identity_differences(state["identity"], self.identity())
        if problems:
            raise ValueError("checkpoint was written by a different model setup; " + "; ".join(problems))
        self.prepare_tasks(state["tasks"])  # adapters must exist before their weights load
        if state["current_task"] is not None:
            self.task_adapter_state.train(state["current_task"])
        method_hooks.load_state(self.method, checkpoint.get(method_hooks.CHECKPOINT_KEY))
        method_hooks.start_task(self)
        self.nonfinite.load_state_dict(state.get("nonfinite", {}))
        saved_router = checkpoint.get(ROUTER_KEY)
        self.router = None if saved_router is None else PrototypeRouter.from_state(saved_router)
        set_rng_state(state.get("rng"))

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """Lightning's ``load_from_checkpoint``, building the class that wrote the checkpoint.

        ``ContinualLM.load_from_checkpoint`` on a subclass's checkpoint returns that subclass with its
        own init arguments (Lightning would build the class it is called on and drop the arguments that
        class does not take). The subclass must be importable here.

        Raises:
            ValueError: The checkpoint's class cannot be imported (with how to fix it).
        """
        written_by = checkpoint_class(checkpoint_path, cls)
        if written_by is not cls and issubclass(written_by, cls):
            return written_by.load_from_checkpoint(checkpoint_path, *args, **kwargs)
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be resumed into this model (model, tokenizer, adapters).

        The base's identity is what decides its weights and numerics: the model (hub id/path or config),
        its ``dtype``, and - for a base built from ``model_config``, whose weights are drawn at random -
        the ``seed`` it was drawn with (``base_seed``; ``None`` for a pretrained base).
        """
        hp = self.hparams
        return {
            "model": hp["model_name_or_path"] or hp["model_config"],
            "base_seed": hp["seed"] if hp["model_name_or_path"] is None else None,
            "dtype": hp["dtype"],
            "vocab_size": len(self.tokenizer),
            "adapter": self.adapter,
            "task_adapters": self.task_adapters,
            "lora": {k: v for k, v in hp["lora"].items() if k != "dropout"},
            "crma": None if self.crma_config is None else self.crma_config.identity(),
            "method": method_hooks.identity(self.method),
        }

    def method_summary(self) -> dict[str, Any] | None:
        """The method's report entry (hyper-parameters, what it holds, ``state_bytes``); ``None``: no method."""
        return method_hooks.summary(self.method)


def _check_optimizer(optimizer: Any, lr_scheduler: Any, crma_lrs: dict[str, float | None]) -> None:
    """Build the optimizer (and scheduler) once on a probe parameter: their own checks run now.

    Without this a negative learning rate surfaced only when the first stage built its optimizer -
    after the base evaluation and after ``config.yaml`` was written. Only ``ValueError`` (the torch
    optimizers' way to reject a setting) is reported; a custom class that cannot be built on a probe
    is left to fail where it always did.
    """
    names = {"crma_structural": "crma_structural_lr", "crma_gate": "crma_gate_lr", "crma": "crma_projection_lr"}
    for group, lr in crma_lrs.items():
        if lr is not None and not lr >= 0:
            raise ValueError(f"{names[group]}={lr!r} is invalid: expected a learning rate >= 0")
    probe = nn.Parameter(torch.zeros(1))
    try:
        built = optimizer([{"params": [probe]}])
        if lr_scheduler is not None:
            lr_scheduler(built)
    except ValueError as err:
        what = getattr(optimizer, "__name__", None) or type(optimizer).__name__
        raise ValueError(f"model.init_args.optimizer ({what}) is invalid: {err}") from err


def checkpoint_class(path: Any, cls: type) -> type:
    """The class recorded in a ``ContinualLM`` checkpoint file; ``cls`` when it is ``cls`` or none is recorded.

    ``cls`` is also the answer when ``path`` is not a local file or not a weights-only checkpoint:
    Lightning's own loading then reports what is wrong.
    """
    if not isinstance(path, str | os.PathLike) or not os.path.isfile(path):
        return cls
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises several types here; Lightning's loading names the problem
        return cls
    name = (ckpt.get("continual_model") or {}).get("class_path") if isinstance(ckpt, dict) else None
    if not name or name == hparams.class_path(cls):
        return cls
    module, _, qualname = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"{path} was written by {name}, which is not importable here ({err}): set PYTHONPATH to the "
            "directory that holds its module, or install your package"
        ) from err


def _as_config(value: Any, cls: type) -> Any:
    """A fresh ``cls`` from ``None``, an instance or a dict (hyper-parameters saved in a checkpoint)."""
    if value is None:
        return cls()
    if isinstance(value, dict):
        return cls(**value)
    return dataclasses.replace(value)
