"""The sequential DataModule: one domain per stage, every seen domain in validation.

Every domain (see :mod:`crma_lightning.data.domains`) is loaded and checked in
:meth:`SequentialDomainDataModule.prepare`, before any training, so a bad file fails the run at
once with the domain, file and row in the message.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
from datasets import Dataset, disable_progress_bars
from transformers import PreTrainedTokenizerBase

from crma_lightning.data.domains import (
    DomainSpec,
    DomainValue,
    as_domain_spec,
    describe_row,
    domain_config,
    load_raw,
    source_identity,
    validate_domains,
)
from crma_lightning.data.packing import scored_targets, tokenize
from crma_lightning.data.prepare import prepare_domain, rows_digest
from crma_lightning.data.row_formats import extract_text
from crma_lightning.data.sampling import (
    Collator,
    EvalShardSampler,
    GlobalBatchSampler,
    ResumableLoader,
    equalize_eval_batches,
)
from crma_lightning.data.tokenizer import load_tokenizer, pad_id, tokenizer_difference

EVAL_DOMAINS = ("seen", "all")
DEFAULT_DOMAINS = ("prose", "code", "arithmetic", "unicode")


# ---------------------------------------------------------------------- the DataModule
class SequentialDomainDataModule(L.LightningDataModule):
    """An ordered list of domains; stage ``i`` trains on domain ``i`` and validates on the seen ones.

    Args:
        domains: Domains in training order: built-in names, mappings of :class:`DomainSpec` fields or
            ``DomainSpec`` objects. Default: the four built-in demo domains. A list given later (a
            second ``--config``, ``--data.domains=[...]``) replaces the earlier one as a whole.
        tokenizer: Tokenizer name/path (``"byte"`` for the built-in byte-level one) or object. ``None``:
            the model's tokenizer, handed over by the stage driver.
        max_length: Tokens per training row.
        packing: Join texts with EOS and cut full rows (no padding) instead of truncating each text.
            Prompt/response and chat domains pack too: each token's scored flag travels with it, so a
            packed row masks exactly the prompt tokens it holds.
        batch_size: Rows per batch *per process* (the global batch is ``batch_size × world size``).
        eval_batch_size: Rows per validation batch (default ``batch_size``).
        eval_domains: ``"seen"`` (domains trained so far, incl. the current one) or ``"all"`` (also the
            future ones, for forward transfer).
        eval_every: Evaluate every domain of that scope after every k-th stage and the last one only; after
            the other stages just the domain trained (its diagonal entry). Bounds the O(T²) end-of-stage
            evaluation of a long run to O(T + T²/k) (docs/metrics.md, "Evaluation cost").
        max_chars_per_domain: Size cap for the built-in domains.
        max_eval_rows: Evaluate at most this many held-out rows per domain (``None``: all).
        num_workers: DataLoader worker processes.
        seed: Seed of the held-out split and of the training order.
        cache_dir: Directory for tokenised datasets (reused across runs); ``None``: ``datasets``' default.
        dev_rows: Training rows per domain held back as its *dev* slice (the last ``dev_rows`` rows, never
            trained on and disjoint from the held-out rows the loss and score matrices measure): the signal
            of a train-until-learned budget (:class:`~crma_lightning.callbacks.TrainUntilLearned`). 0: none.
    """

    def __init__(
        self,
        # Typed as plain mappings, not DomainSpec, on purpose: jsonargparse merges a later list of
        # dataclasses into an earlier one of the same length entry by entry (a domain would inherit
        # the previous one's fields); mappings are replaced whole and checked by `as_domain_spec`.
        domains: list[str | dict[str, DomainValue] | DomainSpec] | None = None,
        tokenizer: str | None = None,
        max_length: int = 128,
        packing: bool = True,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        eval_domains: str = "seen",
        eval_every: int = 1,
        max_chars_per_domain: int | None = 200_000,
        max_eval_rows: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        dev_rows: int = 0,
    ) -> None:
        super().__init__()
        self.specs = [as_domain_spec(d) for d in (domains if domains is not None else DEFAULT_DOMAINS)]
        validate_domains(self.specs)
        if eval_domains not in EVAL_DOMAINS:
            raise ValueError(f"eval_domains={eval_domains!r} is invalid: expected one of {list(EVAL_DOMAINS)}")
        for key, value in (("max_length", max_length), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{key}={value!r} is invalid: expected an integer >= 1")
        # Zero or negative sizes would not fail here but later and obscurely (an empty held-out set,
        # "0 rows" from the built-in domains), so they are rejected with the key's name.
        optional = {
            "eval_batch_size": eval_batch_size,
            "max_chars_per_domain": max_chars_per_domain,
            "max_eval_rows": max_eval_rows,
        }
        for key, value in optional.items():
            if value is not None and value < 1:
                raise ValueError(f"{key}={value!r} is invalid: expected an integer >= 1 or null (no limit)")
        if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
            raise ValueError(
                f"eval_every={eval_every!r} is invalid: expected an integer >= 1 (1: every stage evaluates all)"
            )
        if isinstance(dev_rows, bool) or not isinstance(dev_rows, int) or dev_rows < 0:
            raise ValueError(f"dev_rows={dev_rows!r} is invalid: expected an integer >= 0 (0: no dev slice)")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r} is invalid: expected an integer >= 0")
        if max_length < 2:
            raise ValueError(f"max_length={max_length!r} is invalid: expected >= 2 (inputs and shifted labels)")
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.tokenizer_name = tokenizer if isinstance(tokenizer, str) else None
        self.max_length = max_length
        self.packing = packing
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.eval_domains = eval_domains
        self.eval_every = eval_every
        self.max_chars_per_domain = max_chars_per_domain
        self.max_eval_rows = max_eval_rows
        self.num_workers = num_workers
        self.seed = seed
        self.cache_dir = cache_dir
        self.dev_rows = dev_rows
        self.stage = 0
        self._eval_override: str | None = None
        self.train_sets: dict[str, Dataset] = {}
        self.eval_sets: dict[str, Dataset] = {}
        self.dev_sets: dict[str, Dataset] = {}  # domain -> dev rows (``dev_rows`` > 0), cut from the training rows
        self.holdout_tokens: dict[str, int] = {}
        self.dropped_rows: dict[str, dict[str, int]] = {}
        self.row_formats: dict[str, dict[str, Any]] = {}
        self._digests: dict[str, tuple[tuple[int, int], str]] = {}  # content_digests() per domain, by dataset
        self.task_metrics: dict[str, Any] = {}  # domain -> TaskMetric, for the domains that declare one
        self.score_rows: dict[str, list[dict[str, Any]]] = {}  # domain -> held-out prompts and references

    # -------------------------------------------------------------- domains and stages
    @property
    def domain_names(self) -> list[str]:
        """Domain names in training order."""
        return [s.name for s in self.specs]

    @property
    def num_stages(self) -> int:
        return len(self.specs)

    @property
    def current_domain(self) -> str:
        return self.specs[self.stage].name

    def set_stage(self, stage: int) -> None:
        """Select the domain trained by the next ``fit`` (0-based)."""
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} is out of range: expected 0 <= stage < {self.num_stages}")
        self.stage = stage

    def eval_domain_names(self, stage: int | None = None) -> list[str]:
        """Domains evaluated after ``stage`` (default: the current one), per ``eval_domains``."""
        stage = self.stage if stage is None else stage
        if self._eval_override is None and not self.full_row(stage):
            return [self.domain_names[stage]]  # the diagonal entry only: drift and plasticity need it
        scope = self._eval_override or self.eval_domains
        return self.domain_names if scope == "all" else self.domain_names[: stage + 1]

    def full_row(self, stage: int) -> bool:
        """Whether the evaluation after ``stage`` covers every domain of its scope (``eval_every``).

        With ``eval_every=k`` only every k-th stage and the last one do; after the others only the domain
        just trained is evaluated. The end-of-run metrics (drift, BWT, plasticity: the last row and the
        diagonal) are unchanged; the forgetting maximum and the per-stage ``cl/*`` curves see fewer rows.
        """
        return (stage + 1) % self.eval_every == 0 or stage == self.num_stages - 1

    @contextmanager
    def evaluating_all_domains(self) -> Iterator[None]:
        """Within the block, validation covers every domain (the base-model row of the loss matrix)."""
        previous, self._eval_override = self._eval_override, "all"
        try:
            yield
        finally:
            self._eval_override = previous

    # -------------------------------------------------------------- preparation

    def prepare_data(self) -> None:
        """Download hub datasets once per node (Lightning calls this on local rank 0 only)."""
        for spec in self.specs:
            if spec.hub:
                load_raw(spec, self.seed)

    def prepare(self, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        """Load, check and tokenise every domain. Idempotent; call before training to fail fast."""
        if tokenizer is not None and self.tokenizer is None:
            self.tokenizer = tokenizer
        elif tokenizer is not None and (difference := tokenizer_difference(self.tokenizer, tokenizer)) is not None:
            raise ValueError(
                f"data tokenizer={self.tokenizer_name or type(self.tokenizer).__name__!r} is not the model's "
                f"tokenizer ({difference}): leave the data module's tokenizer unset (null) to use the model's"
            )
        if self.tokenizer is None:
            raise ValueError(
                "SequentialDomainDataModule has no tokenizer: pass tokenizer=..., call dm.prepare(model.tokenizer), "
                "or let trainer.fit(model, datamodule=dm) hand over the model's (docs/subclassing.md, "
                "'Training from Python')"
            )
        if self.tokenizer.eos_token_id is None and self.packing:
            raise ValueError("packing needs an EOS token to separate texts; the tokenizer has none")
        if self.train_sets:
            return
        disable_progress_bars()
        # Filled locally and published at the end: a failure part-way must not leave a half-prepared
        # module that the next call would take as ready.
        train_sets: dict[str, Dataset] = {}
        eval_sets: dict[str, Dataset] = {}
        holdout_tokens: dict[str, int] = {}
        dropped: dict[str, dict[str, int]] = {}
        formats: dict[str, dict[str, Any]] = {}
        task_metrics: dict[str, Any] = {}
        scored_rows: dict[str, list[dict[str, Any]]] = {}
        for spec in self.specs:
            ready = prepare_domain(
                spec,
                self.tokenizer,
                seed=self.seed,
                max_chars=self.max_chars_per_domain,
                max_length=self.max_length,
                packing=self.packing,
                max_eval_rows=self.max_eval_rows,
                cache_dir=self.cache_dir,
            )
            train_sets[spec.name], eval_sets[spec.name] = ready.train, ready.holdout
            holdout_tokens[spec.name], formats[spec.name] = ready.holdout_tokens, ready.row_format
            if ready.dropped:
                dropped[spec.name] = ready.dropped
            if ready.metric is not None:
                task_metrics[spec.name], scored_rows[spec.name] = ready.metric, ready.score_rows
        dev_sets = {}
        if self.dev_rows:
            for name, rows in list(train_sets.items()):
                if len(rows) <= self.dev_rows:
                    raise ValueError(
                        f"domain {name!r} has {len(rows)} training rows: dev_rows={self.dev_rows} would leave none "
                        "to train on; lower dev_rows or add data"
                    )
                keep = len(rows) - self.dev_rows
                dev_sets[name] = rows.select(range(keep, len(rows)))
                train_sets[name] = rows.select(range(keep))
        self.train_sets, self.eval_sets, self.dropped_rows = train_sets, eval_sets, dropped
        self.dev_sets = dev_sets
        self.holdout_tokens, self.row_formats = holdout_tokens, formats
        self.task_metrics, self.score_rows = task_metrics, scored_rows

    def setup(self, stage: str | None = None) -> None:
        self.prepare(self._model_tokenizer())

    def _model_tokenizer(self) -> PreTrainedTokenizerBase | None:
        trainer = getattr(self, "trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        return getattr(module, "tokenizer", None)

    def check_batches(self, world_size: int = 1) -> None:
        """Every domain must fill at least one global training batch (raise before training if not)."""
        sources = {spec.name: spec.source() for spec in self.specs}
        for name, ds in self.train_sets.items():
            if len(ds) < self.batch_size * world_size:
                raise ValueError(
                    f"domain {name!r} has {len(ds)} training rows of {self.max_length} tokens (from "
                    f"{sources[name]}), fewer than one global batch ({self.batch_size} x {world_size} "
                    "processes); add data or lower batch_size"
                )

    # -------------------------------------------------------------- loaders

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return trainer.world_size, trainer.global_rank

    def _progress(self) -> tuple[int, int]:
        trainer = self.trainer
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> ResumableLoader:
        """The stage's rows in seeded global batches; the module's ``method`` may replace them (replay)."""
        world, rank = self._world()
        self.check_batches(world)
        name = self.current_domain
        ds = self.train_sets[name]
        seed = self.seed + self.stage
        method = getattr(self.trainer.lightning_module, "method", None) if self._has_trainer() else None
        mixed = None if method is None else method.train_data(self.stage, name, ds, self.batch_size, world, rank, seed)
        if mixed is not None:
            ds, sampler = mixed
        else:
            sampler = GlobalBatchSampler(ds, self.batch_size, world, rank, seed=seed)
        return ResumableLoader(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=Collator(self._pad_id(), name),
            num_workers=self.num_workers,
            drop_last=True,
            progress=self._progress,
        )

    def _has_trainer(self) -> bool:
        return getattr(self, "trainer", None) is not None

    def fisher_batches(self, stage: int, max_batches: int | None = None) -> Iterator[dict[str, Any]]:
        """Collated training batches of ``stage``'s domain in a fixed order, the same on every rank (lazy).

        For a method's end-of-stage estimate (EWC's Fisher): batches of ``batch_size x world size`` rows
        (the global batch, so a run on N processes estimates what one process does), in a permutation
        seeded by ``(seed, stage)`` alone - independent of how far training got or of a resume.
        """
        world, _ = self._world()
        name = self.domain_names[stage]
        rows, size = self.train_sets[name], self.batch_size * world
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed + 7919 * (stage + 1)))
        collate = Collator(self._pad_id(), name)
        count = len(rows) // size if max_batches is None else min(max_batches, len(rows) // size)
        for b in range(count):
            batch = collate([rows[i] for i in order[b * size : (b + 1) * size].tolist()])
            yield batch

    def dev_dataloader(self, domain: str) -> Any:
        """The dev rows of ``domain`` (``dev_rows``), sharded over ranks like the held-out rows."""
        if domain not in self.dev_sets:
            raise ValueError(f"domain {domain!r} has no dev rows: set data.dev_rows > 0 (got {self.dev_rows})")
        world, rank = self._world()
        ds = self.dev_sets[domain]
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=self.eval_batch_size,
            sampler=EvalShardSampler(ds, world, rank),
            collate_fn=Collator(self._pad_id(), domain),
        )
        return equalize_eval_batches(loader)

    def val_dataloader(self) -> list[Any]:
        """One loader per evaluated domain; every rank gets as many batches (padding adds zero tokens)."""
        world, rank = self._world()
        loaders = []
        for name in self.eval_domain_names():
            ds = self.eval_sets[name]
            loader = torch.utils.data.DataLoader(
                ds,
                batch_size=self.eval_batch_size,
                sampler=EvalShardSampler(ds, world, rank),
                collate_fn=Collator(self._pad_id(), name),
                num_workers=self.num_workers,
            )
            loaders.append(equalize_eval_batches(loader))
        return loaders

    def _pad_id(self) -> int:
        return pad_id(self.tokenizer)

    # -------------------------------------------------------------- state and summary

    def identity(self) -> dict[str, Any]:
        """Settings that change what the loss matrix measures: a resumed run must keep them.

        Left out on purpose: budgets (``max_steps``), batch sizes, workers and the cache directory, which
        change how training proceeds or how fast, not which held-out text a loss is measured on.
        """
        return {
            "max_length": self.max_length,
            "packing": self.packing,
            "max_chars_per_domain": self.max_chars_per_domain,
            "max_eval_rows": self.max_eval_rows,
            "eval_domains": self.eval_domains,
            "seed": self.seed,
            **({"dev_rows": self.dev_rows} if self.dev_rows else {}),  # older runs' identities stay as they were
            **({"eval_every": self.eval_every} if self.eval_every != 1 else {}),
            "sources": [source_identity(s) for s in self.specs],
            **{f"content.{name}": digest for name, digest in self.content_digests().items()},
        }

    def content_digests(self) -> dict[str, str]:
        """Domain -> digest of its prepared rows (training and held-out token ids): what the losses read.

        A domain's source (its path) says where the data comes from, not what it is: a file replaced
        mid-run would give a base row and a stage row measured on different held-out text. Empty
        before :meth:`prepare`.
        """
        out = {}
        for name, train in self.train_sets.items():
            held = self.eval_sets[name]
            key = (id(train), id(held))  # the same Dataset objects: the same rows (every report write asks)
            cached = self._digests.get(name)
            if cached is None or cached[0] != key:
                self._digests[name] = cached = (key, rows_digest(train, held))
            out[name] = cached[1]
        return out

    def config(self) -> dict[str, Any]:
        """The init arguments that rebuild this data module: the ``data:`` section of a run's ``config.yaml``.

        A tokenizer given as an object is recorded as ``null`` (the model's tokenizer).
        """
        return {
            "domains": [domain_config(s) for s in self.specs],
            "tokenizer": self.tokenizer_name,
            "max_length": self.max_length,
            "packing": self.packing,
            "batch_size": self.batch_size,
            "eval_batch_size": self.eval_batch_size,
            "eval_domains": self.eval_domains,
            "eval_every": self.eval_every,
            "max_chars_per_domain": self.max_chars_per_domain,
            "max_eval_rows": self.max_eval_rows,
            "num_workers": self.num_workers,
            "seed": self.seed,
            "cache_dir": self.cache_dir,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "domains": self.domain_names}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("domains") not in (None, self.domain_names):
            raise ValueError(
                f"checkpoint was written for domains {state_dict['domains']}, this run has {self.domain_names}"
            )
        self.stage = int(state_dict["stage"])

    def describe(self) -> list[str]:
        """One line per domain, in training order: name, source, row type and sizes (after :meth:`prepare`).

        The stage driver prints these when training starts, so the domain list a stack of configs
        resolved to is visible before any step runs.
        """
        lines = []
        for i, spec in enumerate(self.specs, start=1):
            formats = self.row_formats.get(spec.name, {})
            rows = formats.get("rows", "?")
            line = f"{i}. {spec.name}: {spec.source()}, {rows} rows (loss on {formats.get('scored', '?')} tokens)"
            if spec.name in self.train_sets:
                line += f", {len(self.train_sets[spec.name])} train / {len(self.eval_sets[spec.name])} held-out rows"
            lines.append(line)
        return lines

    def summary(self) -> dict[str, Any]:
        """Per-domain sizes and sources, for the run report.

        After :meth:`prepare`, each domain also says which tokens the loss scores: ``rows`` (``text``,
        ``prompt_response`` or ``chat``), ``scored`` (``all``, ``response`` or ``assistant``),
        ``chat_template`` for chat rows (``tokenizer`` or ``fallback``), and ``train_scored_tokens`` /
        ``holdout_scored_tokens``: the next-token targets that enter the loss (the held-out ones are
        what each held-out loss averages over).
        """
        out: dict[str, Any] = {}
        for spec in self.specs:
            entry = {k: v for k, v in asdict(spec).items() if v not in (None, "", [])}
            formats = self.row_formats.get(spec.name, {})
            # Defaults that mean nothing for the domain's row format would only mislead in the report.
            if formats.get("rows") != "chat":
                entry.pop("messages_field", None)
            if formats.get("rows") in ("chat", "prompt_response"):
                entry.pop("text_field", None)
            if spec.name in self.train_sets:
                entry["train_rows"] = len(self.train_sets[spec.name])
                entry["holdout_rows"] = len(self.eval_sets[spec.name])
                entry["holdout_tokens"] = self.holdout_tokens[spec.name]
                entry["rows_sha256"] = self.content_digests()[spec.name]
                if spec.name in self.task_metrics:  # the metric with its defaults filled in, and its rows
                    entry["metric"] = self.task_metrics[spec.name].to_dict()
                    entry["score_rows"] = len(self.score_rows[spec.name])
                entry.update(formats)
            if spec.name in self.dropped_rows:
                entry["dropped_rows"] = dict(self.dropped_rows[spec.name])
            out[spec.name] = entry
        return out


__all__ = [
    "DEFAULT_DOMAINS",
    "Collator",
    "DomainSpec",
    "SequentialDomainDataModule",
    "as_domain_spec",
    "describe_row",
    "extract_text",
    "load_raw",
    "scored_targets",
    "tokenize",
    "validate_domains",
]
