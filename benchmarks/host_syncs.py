"""Host syncs per training step: each ``Tensor.item/tolist/__bool__/__float__/__int__`` in training, by call site.

On a GPU each of these waits for the device to finish everything queued, so a step that makes one per
parameter tensor runs at the pace of the host. Counted at steady state (after ``--warmup`` steps) in
NAIVE (one shared LoRA) and MODULAR (CRMA, an adapter per task), through the real stage driver with
ZClip, GradientStability and the non-finite guard on, on CPU (the calls are the same on a GPU).
``--optimizer-foreach false`` builds AdamW with ``foreach=False`` (torch's per-tensor path, which the
module then keeps) to show what the fused default saves.

Example::

    python benchmarks/host_syncs.py                       # ~30 s
    python benchmarks/host_syncs.py --optimizer-foreach false
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import traceback
from functools import partial
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch

SYNCS = ("item", "tolist", "__bool__", "__float__", "__int__")
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


class _Window(L.Callback):
    def __init__(self, state: dict, warmup: int) -> None:
        self.state, self.warmup = state, warmup

    def on_train_batch_start(self, trainer: L.Trainer, *args) -> None:
        self.state["on"] = trainer.global_step >= self.warmup

    def on_validation_start(self, *args) -> None:
        self.state["on"] = False

    def on_train_end(self, *args) -> None:
        self.state["on"] = False


def _site(frames: list[traceback.FrameSummary]) -> str:
    for frame in reversed(frames):
        name = frame.filename.replace("\\", "/")
        if "/torch/" not in name or "/optim/" in name:
            short = name.split("site-packages/")[-1]
            return f"{short.split('crma_lightning/', 1)[-1] if 'crma_lightning/' in short else short}:{frame.lineno}"
    return "torch"


def count(adapter: str, task_adapters: str, steps: int, warmup: int, every: int, foreach: bool | None) -> tuple:
    from crma_lightning.callbacks.zclip import ZClip
    from crma_lightning.data.datamodule import SequentialDomainDataModule
    from crma_lightning.model.continual_lm import ContinualLM
    from crma_lightning.run.runner import ContinualRunner

    state = {"on": False}
    sites: collections.Counter = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNCS}

    def counting(name):
        def method(self, *args, **kwargs):
            if state["on"]:
                sites[f"{name} {_site(traceback.extract_stack(limit=10)[:-1])}"] += 1
            return originals[name](self, *args, **kwargs)

        return method

    optimizer = partial(torch.optim.AdamW, lr=1e-3) if foreach is None else partial(
        torch.optim.AdamW, lr=1e-3, foreach=foreach)
    model = ContinualLM(model_config=TINY, adapter=adapter, task_adapters=task_adapters, optimizer=optimizer)
    dm = SequentialDomainDataModule(domains=["prose"], max_length=32, batch_size=4, max_chars_per_domain=8000,
                                    max_eval_rows=4)
    with tempfile.TemporaryDirectory() as tmp:
        runner = ContinualRunner(run_dir=Path(tmp) / "run", resume="never", callbacks=[ZClip(), _Window(state, warmup)],
                                 trainer_kwargs={"accelerator": "cpu", "max_steps": steps, "log_every_n_steps": every,
                                                 "enable_progress_bar": False, "enable_model_summary": False})
        for name in SYNCS:
            setattr(torch.Tensor, name, counting(name))
        try:
            runner.run(model, dm)
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
    return sites, steps - warmup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=45)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--optimizer-foreach", choices=["default", "false"], default="default")
    args = parser.parse_args()
    foreach = None if args.optimizer_foreach == "default" else False
    print(f"host syncs per step over {args.steps - args.warmup} steps, log_every_n_steps={args.log_every}, "
          f"AdamW foreach={foreach}")
    for label, adapter, mode in (("NAIVE", "lora", "shared"), ("MODULAR", "crma", "per_task")):
        sites, n = count(adapter, mode, args.steps, args.warmup, args.log_every, foreach)
        print(f"{label}: {sum(sites.values()) / n:.2f} syncs/step ({sum(sites.values())} in {n} steps)")
        for site, c in sites.most_common(8):
            print(f"  {c / n:6.2f}/step  {site}")


if __name__ == "__main__":
    main()
