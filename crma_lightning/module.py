"""``ContinualLM``: a Hugging Face causal LM with LoRA/CRMA adapters, one task (domain) at a time.

Research code subclasses it and overrides small hooks:

* :meth:`ContinualLM.compute_loss` - the training objective (e.g. add a regulariser);
* :meth:`ContinualLM.on_task_start` - what happens when a new task begins (after its adapter exists);
* :meth:`ContinualLM.trainable_parameters` / :meth:`ContinualLM.param_groups` - what trains, and how
  parameters are grouped for the optimizer.

Checkpoints hold only what trains - every LoRA adapter, the CRMA backbone, any parameter a subclass
unfreezes - plus the continual state; never the frozen base weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from transformers import PreTrainedTokenizerBase

from crma_lightning.adapters import (
    CRMAConfig,
    LoRAConfig,
    add_lora_adapter,
    attach_adapters,
    crma_adapters,
    lora_adapter_names,
    lora_layers,
    set_active_adapter,
    set_adapter_trainable,
    set_crma_trainable,
)
from crma_lightning.adapters.lora import check_adapter_name
from crma_lightning.distributed import AdapterFSDPStrategy, AdapterModelParallelStrategy
from crma_lightning.models import build_model, load_model_tokenizer
from crma_lightning.module_state import AdapterCheckpointMixin
from crma_lightning.nonfinite import NonFiniteGuard
from crma_lightning.sharding import (
    apply_fsdp1,
    apply_fsdp2,
    data_parallel_mesh,
    fsdp2_mixed_precision,
)

TASK_ADAPTER_MODES = ("shared", "per_task")
SHARED_ADAPTER = "shared"


class ContinualLM(AdapterCheckpointMixin, L.LightningModule):
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
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        adapter: str = "crma",
        task_adapters: str = "per_task",
        lora: LoRAConfig | None = None,
        crma: CRMAConfig | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        crma_structural_lr: float | None = None,
        seed: int = 0,
        gradient_checkpointing: bool = False,
        max_nonfinite_steps: int = 10,
        fsdp_mixed_precision: str | None = None,
        fsdp_activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if task_adapters not in TASK_ADAPTER_MODES:
            raise ValueError(f"task_adapters={task_adapters!r} is invalid: expected one of {list(TASK_ADAPTER_MODES)}")
        lora, crma = _as_config(lora, LoRAConfig), _as_config(crma, CRMAConfig)
        self.save_hyperparameters(
            {
                "model_name_or_path": model_name_or_path,
                "model_config": model_config,
                "tokenizer": tokenizer,
                "dtype": dtype,
                "adapter": adapter,
                "task_adapters": task_adapters,
                "lora": dataclasses.asdict(lora),
                "crma": dataclasses.asdict(crma),
                "crma_structural_lr": crma_structural_lr,
                "seed": seed,
            }
        )
        self.adapter = adapter
        self.task_adapters = task_adapters
        self.lora_config = lora
        self.crma_config = crma
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.crma_structural_lr = crma_structural_lr
        self.nonfinite = NonFiniteGuard(max_nonfinite_steps)
        fsdp2_mixed_precision(fsdp_mixed_precision)  # validate now, not when the strategy shards
        self.fsdp_mixed_precision = fsdp_mixed_precision
        self.fsdp_activation_checkpointing = fsdp_activation_checkpointing

        self.tokenizer: PreTrainedTokenizerBase = load_model_tokenizer(model_name_or_path, tokenizer, trust_remote_code)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = build_model(model_name_or_path, model_config, self.tokenizer, dtype, trust_remote_code)
            # Validates everything (adapter type, targets, ranks, CRMA sizes) before touching the model.
            self.attached = attach_adapters(
                self.model, adapter, lora, crma, adapter_name=SHARED_ADAPTER if task_adapters == "shared" else None
            )
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # `from_pretrained` returns the model in eval mode and Lightning keeps submodules' modes: without this
        # the base model's dropout would be silently off in training (unlike a model built from a config).
        self.model.train()
        self.tasks: list[str] = []
        self.current_task: str | None = None
        self._seed = seed

    # ------------------------------------------------------------------ tasks
    def adapter_for(self, task: str) -> str:
        """Name of the LoRA adapter that serves ``task``."""
        return SHARED_ADAPTER if self.task_adapters == "shared" else task

    def prepare_tasks(self, tasks: list[str]) -> None:
        """Register the run's tasks up front and create their adapters (frozen, inactive).

        Creating every adapter before training keeps the parameter set fixed for the whole run, which
        sharded (FSDP) and replicated (DDP) training need. Adapter ``i`` is initialised from
        ``seed + i``, so it is the same whether it is created here or by :meth:`begin_task`.
        """
        for task in tasks:
            self._ensure_task(task)

    def _ensure_task(self, task: str) -> None:
        check_adapter_name(task)
        if task not in self.tasks:
            self.tasks.append(task)
        name = self.adapter_for(task)
        if name not in lora_adapter_names(self.model):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self._seed + 1 + self.tasks.index(task))
                add_lora_adapter(self.model, name, self.lora_config, trainable=False)

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
        self._train_task(task)
        if not resumed:
            self.on_task_start(task, self.tasks.index(task))

    def _train_task(self, task: str) -> None:
        self._ensure_task(task)
        active = self.adapter_for(task)
        for name in lora_adapter_names(self.model):
            set_adapter_trainable(self.model, name, name == active)
        set_crma_trainable(self.model, True)
        set_active_adapter(self.model, active)
        self.current_task = task

    def activate_task(self, task: str | None) -> None:
        """Make ``task``'s adapter the active one (evaluation); ``None``: LoRA off."""
        name = None if task is None else self.adapter_for(task)
        if name is not None and name not in lora_adapter_names(self.model):
            raise ValueError(f"unknown task {task!r}; known tasks: {self.tasks}")
        for _, layer in lora_layers(self.model):
            if layer.active_adapter != name:
                layer.set_adapter(name)

    def on_task_start(self, task: str, index: int) -> None:
        """Hook: called by :meth:`begin_task` once the task's adapter is active and trainable."""

    # ------------------------------------------------------------------ multi-device
    def configure_model(self) -> None:
        """Shard the model for FSDP; a no-op on one device and under DDP.

        Lightning calls this at the start of every ``fit``/``validate``, inside the strategy's contexts.

        * ``ModelParallelStrategy`` / :class:`~crma_lightning.distributed.AdapterModelParallelStrategy`
          (FSDP2, ``self.device_mesh`` is set): ``fully_shard`` on every decoder block - the
          ``CRMABlock`` wrapper when CRMA is attached - then on the root
          (:func:`~crma_lightning.sharding.apply_fsdp2`).
        * :class:`~crma_lightning.distributed.AdapterFSDPStrategy` / ``FSDPStrategy`` (FSDP1): LoRA factors,
          CRMA adapters, blocks and the root become FSDP units
          (:func:`~crma_lightning.sharding.apply_fsdp1`).

        Idempotent - the stage driver makes a new ``Trainer`` per stage, and what is already sharded is
        skipped. All per-task adapters exist before the first ``fit`` (:meth:`prepare_tasks`), so the
        sharded parameter set never changes; only ``requires_grad`` flips between stages.
        """
        if self._device_mesh is not None:
            if not isinstance(self._trainer.strategy if self._trainer else None, AdapterModelParallelStrategy):
                rank_zero_warn(
                    "ContinualLM under a plain ModelParallelStrategy: its checkpoints gather the whole frozen base "
                    "model, and uneven evaluation shards can hang. Use "
                    "crma_lightning.distributed.AdapterModelParallelStrategy instead."
                )
            mesh = data_parallel_mesh(self._device_mesh)
            apply_fsdp2(self.model, mesh, self.fsdp_mixed_precision, self.fsdp_activation_checkpointing)
        elif self._trainer is not None and isinstance(self._trainer.strategy, FSDPStrategy):
            if not isinstance(self._trainer.strategy, AdapterFSDPStrategy):
                rank_zero_warn(
                    "ContinualLM under a plain FSDPStrategy: its checkpoints gather the whole frozen base model "
                    "onto rank 0. Use crma_lightning.distributed.AdapterFSDPStrategy instead."
                )
            if "auto_wrap_policy" in self._trainer.strategy.kwargs:
                raise ValueError(
                    "FSDPStrategy(auto_wrap_policy=...) with ContinualLM: leave auto_wrap_policy unset, "
                    "configure_model wraps adapters and blocks itself"
                )
            self.model = apply_fsdp1(self.model, self.fsdp_activation_checkpointing)

    # ------------------------------------------------------------------ parameters
    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Hook: the ``(name, parameter)`` pairs that train in the current task."""
        return ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    def param_groups(self) -> list[dict[str, Any]]:
        """Hook: optimizer parameter groups, named ``lora``, ``crma``, ``crma_structural`` and ``other``.

        ``crma_structural`` (the mixing logits ``Λ``) gets ``crma_structural_lr`` when it is set; the
        other groups use the optimizer's learning rate. Empty groups are left out.
        """
        structural = {id(m.mix_logits) for _, m in crma_adapters(self.model)}
        crma = {id(p) for _, m in crma_adapters(self.model) for p in m.parameters()}
        lora = {
            id(p)
            for _, layer in lora_layers(self.model)
            for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters())
        }
        groups: dict[str, list[nn.Parameter]] = {"lora": [], "crma": [], "crma_structural": [], "other": []}
        for _, p in self.trainable_parameters():
            key = (
                "crma_structural"
                if id(p) in structural
                else "crma"
                if id(p) in crma
                else "lora"
                if id(p) in lora
                else "other"
            )
            groups[key].append(p)
        out = []
        for name, params in groups.items():
            if params:
                group: dict[str, Any] = {"params": params, "name": name}
                if name == "crma_structural" and self.crma_structural_lr is not None:
                    group["lr"] = self.crma_structural_lr
                out.append(group)
        return out

    def configure_optimizers(self) -> Any:
        groups = self.param_groups()
        if not groups:
            raise ValueError("nothing to train: no parameter requires grad (did begin_task() run?)")
        optimizer = self.optimizer_factory(groups)
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
        shift_logits = logits[:, :-1].float()  # (B, T-1, V)
        shift_labels = labels[:, 1:]  # (B, T-1)
        total = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        return total, (shift_labels != -100).sum()

    def compute_loss(self, batch: dict[str, Any], logits: torch.Tensor) -> torch.Tensor:
        """Hook: the training loss for one batch - by default the mean next-token cross-entropy."""
        total, count = self.token_losses(logits, batch["labels"])
        return total / count.clamp_min(1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        loss = self.compute_loss(batch, logits)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        """Evaluate one held-out batch of ``batch["domain"]`` with that domain's adapter active.

        Returns the summed loss and token count; ``DomainEvaluation`` turns them into token-weighted
        means per domain (``val/<domain>/loss``) and into the loss matrix.
        """
        domain = batch["domain"]
        self.activate_task(domain if domain in self.tasks else None)
        logits = self(batch["input_ids"], batch.get("attention_mask"))
        total, count = self.token_losses(logits, batch["labels"])
        return {"loss_sum": total.detach(), "tokens": count.detach(), "domain": domain}

    def on_validation_end(self) -> None:
        # Validation switched adapters per domain; training continues with the current task's.
        if self.current_task is not None:
            self.activate_task(self.current_task)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Non-finite loss or gradient: drop this step's gradients so the optimizer skips it.
        self.nonfinite.check(optimizer, step=self.global_step)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompt: str | list[str], task: str | None = None, **generate_kwargs: Any) -> list[str]:
        """Continue ``prompt`` with ``task``'s adapter (default: the current task); returns the new text."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        previous = self.current_task
        self.activate_task(task if task is not None else previous)
        was_training = self.model.training
        self.model.eval()
        try:
            side = self.tokenizer.padding_side
            self.tokenizer.padding_side = "left"
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            self.tokenizer.padding_side = side
            generate_kwargs.setdefault("max_new_tokens", 32)
            generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
            out = self.model.generate(**enc, **generate_kwargs)
            return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        finally:
            self.model.train(was_training)
            self.activate_task(previous)


def _as_config(value: Any, cls: type) -> Any:
    """A fresh ``cls`` from ``None``, an instance or a dict (hyper-parameters saved in a checkpoint)."""
    if value is None:
        return cls()
    if isinstance(value, dict):
        return cls(**value)
    return dataclasses.replace(value)
