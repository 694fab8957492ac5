"""Train on your own domains from JSON Lines files with the Python API (no YAML).

    python examples/own_domains.py --write-sample data/sample        # two small example domains
    python examples/own_domains.py --data-dir data/sample --steps 50

``--data-dir`` holds one folder per domain with ``train.jsonl`` and ``holdout.jsonl`` (``{"text": ...}``
per line); the folder names, sorted (or ``--domains``), give the training order.
"""

from __future__ import annotations

import argparse
import json
import random
from functools import partial
from pathlib import Path

import torch

from crma_lightning import ContinualLM, ContinualRunner, SequentialDomainDataModule
from crma_lightning.evaluation.report import render_markdown

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def write_sample(out: Path, rows: int = 200) -> None:
    """Two small made-up domains so the example runs anywhere."""
    rng = random.Random(0)
    foods = ["lentils", "rice", "tomatoes", "garlic", "onions", "basil", "chickpeas", "spinach"]
    issues = ["cannot log in", "was charged twice", "app crashes on start", "lost my password"]
    domains = {
        "recipes": lambda: (
            f"Cook {rng.randint(1, 5)} cups of {rng.choice(foods)} with {rng.choice(foods)} "
            f"for {rng.randint(5, 40)} minutes, then season with {rng.choice(foods)}."
        ),
        "support": lambda: (
            f"Ticket {rng.randint(1000, 9999)}: the customer {rng.choice(issues)}. "
            f"Agent: please try again in {rng.randint(2, 30)} minutes and reply to this message."
        ),
    }
    for name, make in domains.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", rows), ("holdout", rows // 5)):
            lines = [json.dumps({"text": " ".join(make() for _ in range(3))}) for _ in range(n)]
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    print(f"wrote {sorted(domains)} under {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-sample", type=Path, help="write two example domains here and exit")
    parser.add_argument("--data-dir", type=Path, help="one folder per domain with train.jsonl/holdout.jsonl")
    parser.add_argument("--domains", nargs="*", help="domain folders in training order (default: sorted)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/own-domains"))
    parser.add_argument("--adapter", default="crma", choices=["lora", "crma"])
    parser.add_argument("--task-adapters", default="per_task", choices=["shared", "per_task"])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per domain")
    args = parser.parse_args()
    if args.write_sample:
        write_sample(args.write_sample)
        return
    if args.data_dir is None:
        parser.error("give --data-dir (or --write-sample DIR first)")
    names = args.domains or sorted(p.name for p in args.data_dir.iterdir() if (p / "train.jsonl").exists())
    domains = [
        {"name": n, "path": str(d / "train.jsonl"), "holdout_path": str(d / "holdout.jsonl")}
        for n, d in ((n, args.data_dir / n) for n in names)
    ]  # the same as `data.domains` entries in YAML
    model = ContinualLM(
        model_config=TINY_LLAMA,
        adapter=args.adapter,
        task_adapters=args.task_adapters,
        optimizer=partial(torch.optim.AdamW, lr=3e-3),
    )
    data = SequentialDomainDataModule(domains=domains, max_length=64, batch_size=8)
    runner = ContinualRunner(
        run_dir=args.run_dir,
        trainer_kwargs={"accelerator": "cpu", "max_steps": args.steps, "enable_model_summary": False},
    )
    report = runner.run(model, data)
    print(render_markdown(report))


if __name__ == "__main__":
    main()
