"""The benchmark's default base model: a tiny Llama-style model, briefly pretrained on a general mix.

Why pretrain at all: with a randomly initialised base, ``L[0][j]`` is ~ln(259) for every domain and
any training at all beats it, so base-relative forgetting is trivially very negative and "worse than
the base model" says nothing. The base here is a model that already knows *something* about every
domain, as a real pretrained LLM does.

The general mix: the training text of all the benchmark's domains, in equal shares (each batch row is
drawn round-robin from the domains, a uniformly random packed row within the domain), with full
fine-tuning of every weight for a small budget (a few hundred AdamW steps). So the base is a
generalist with an equal, shallow exposure to every domain - no domain is privileged by the training
order - and the held-out rows are unseen by it (they are never in a training file). A held-apart
general corpus would be the other option; the shared real corpora are too small (500 records per
domain) to give up a separate general slice, and the built-in domains have nothing in common to draw
one from. The consequence to keep in mind when reading the tables: the stages re-train on text the
base has seen once, in a mixed batch - a stage specialises, it does not meet new text.

The result is saved with ``save_pretrained`` (model and byte tokenizer) under
``<cache_dir>/base/<name>-<key>``, ``key`` a hash of every setting and of the training files, and is
reused by later runs with the same settings. ``pretrain.json`` next to the weights records the
settings, the loss curve and the time it took.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from crma_lightning.data.datamodule import DomainSpec, extract_text, load_raw, tokenize
from crma_lightning.data.tokenizer import byte_tokenizer
from crma_lightning.model.base_model import build_model

FORMAT_VERSION = 1  # bump when the recipe changes, so that old cached bases are not reused
INFO_FILE = "pretrain.json"


@dataclass
class PretrainSettings:
    """Everything that determines the pretrained base (all of it goes into the cache key).

    Attributes:
        model_config: ``ContinualLM``-style ``model_config`` of the base (``model_type`` + sizes).
        steps: Full fine-tuning AdamW steps on the mix.
        batch_size: Packed rows per step.
        max_length: Tokens (bytes) per row.
        lr: Peak learning rate (linear warm-up over the first 10% of steps, cosine decay to 10%).
        weight_decay: AdamW weight decay.
        seed: Seed of the initialisation and of the batch sampling.
        bf16: Train under bfloat16 autocast (GPU runs); float32 otherwise.
    """

    model_config: dict[str, Any] = field(default_factory=dict)
    steps: int = 400
    batch_size: int = 16
    max_length: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.1
    seed: int = 0
    bf16: bool = False

    def key(self, data_fingerprint: str) -> str:
        blob = json.dumps({"v": FORMAT_VERSION, "data": data_fingerprint, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _packed_rows(spec: dict[str, Any], tokenizer: Any, max_length: int) -> torch.Tensor:
    """The domain's training text as packed rows ``(n, max_length)`` - the same packing the stages use."""
    domain = DomainSpec(**spec)
    train, _ = load_raw(domain, seed=0)
    ds = tokenize(extract_text(domain, train, "train"), tokenizer, max_length, packing=True, drop_last=True)
    if len(ds) == 0:
        raise ValueError(f"domain {domain.name!r}: not one full row of {max_length} tokens to pretrain on")
    return torch.tensor(ds["input_ids"], dtype=torch.long)


def _lr_factor(step: int, total: int) -> float:
    warmup = max(1, total // 10)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def pretrain(
    specs: list[dict[str, Any]], settings: PretrainSettings, out: Path, device: str, log_every: int = 50
) -> dict[str, Any]:
    """Build the base from ``settings.model_config``, train it on the domain mix, save it to ``out``.

    Args:
        specs: The domains (``DomainSpec`` fields with local ``path`` files).
        settings: The recipe.
        out: Directory for ``save_pretrained`` (model, tokenizer) and ``pretrain.json``.
        device: Torch device to train on.
        log_every: Print the mean training loss every this many steps.

    Returns:
        The content of ``pretrain.json``.
    """
    tokenizer = byte_tokenizer()
    rows = [_packed_rows(s, tokenizer, settings.max_length) for s in specs]
    torch.manual_seed(settings.seed)
    model = build_model(None, settings.model_config, tokenizer).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, settings.steps))
    gen = torch.Generator().manual_seed(settings.seed)
    curve, window, t0 = [], [], time.perf_counter()
    for step in range(settings.steps):
        picks = []
        for i in range(settings.batch_size):  # round-robin over domains: equal shares, no order
            domain_rows = rows[(step * settings.batch_size + i) % len(rows)]
            picks.append(domain_rows[torch.randint(len(domain_rows), (1,), generator=gen).item()])
        ids = torch.stack(picks).to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=settings.bf16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        window.append(float(loss.detach()))
        if (step + 1) % log_every == 0 or step + 1 == settings.steps:
            curve.append({"step": step + 1, "loss": sum(window) / len(window)})
            window = []
            print(f"[pretrain] step {step + 1}/{settings.steps}: loss {curve[-1]['loss']:.4f}", flush=True)
    info = {
        "recipe": "full fine-tuning of a randomly initialised model on an equal-share mix of the domains' "
        "training text (round-robin rows), AdamW, warm-up + cosine",
        "settings": asdict(settings),
        "domains": [s["name"] for s in specs],
        "train_rows": {s["name"]: len(r) for s, r in zip(specs, rows)},
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss_curve": curve,
        "seconds": time.perf_counter() - t0,
        "device": device,
    }
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def pretrained_base(
    specs: list[dict[str, Any]], settings: PretrainSettings, data_fingerprint: str, cache_dir: Path, device: str
) -> tuple[Path, dict[str, Any]]:
    """The cached base for these settings and data, pretraining it first if it is not there yet.

    Args:
        specs: The domains whose training text forms the mix.
        settings: The recipe.
        data_fingerprint: Hash of the training files (see ``bench_data.fingerprint``).
        cache_dir: Root of the benchmark cache.
        device: Torch device for pretraining.

    Returns:
        ``(path, info)``: the ``from_pretrained`` directory and its ``pretrain.json`` (plus ``cached``).
    """
    cfg = settings.model_config
    name = f"{cfg.get('model_type', 'model')}-{cfg.get('hidden_size')}x{cfg.get('num_hidden_layers')}"
    path = cache_dir / "base" / f"{name}-{settings.key(data_fingerprint)}"
    if (path / INFO_FILE).is_file():
        info = json.loads((path / INFO_FILE).read_text())
        return path, {**info, "cached": True}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"[pretrain] no cached base at {path}: pretraining one ({settings.steps} steps)", flush=True)
    info = pretrain(specs, settings, tmp, device)
    try:
        os.replace(tmp, path)  # atomic: a reader sees a complete base or none
    except OSError:  # another process finished the same base first; theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return path, {**info, "cached": False}
