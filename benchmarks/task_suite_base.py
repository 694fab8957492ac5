"""Pretrain the base model of the built-in task suite (configs/tasks.yaml): run once, ~2 minutes on 2 CPU cores.

Why: LoRA adapts a pretrained model; on the demo's randomly initialised tiny model it learns almost
nothing in a few hundred steps (held-out loss of a task 5.4 -> 4.4 in 150 steps at lr 0.02, exact match
0). The base is what a pretrained LLM is to a user's tasks: full fine-tuning on a broad mix of string
operations given as instructions - every task of the *pretraining* operation families
(``crma_lightning.data.builtin_tasks.PRETRAIN_FAMILIES``: editing, predicates, comparisons) - and never on
an operation of the held-out families the suite's tasks come from (extraction, reordering, letter maps,
counting). So a stage learns an operation that is new to the base, as a user's own task is. The model
size and pretraining budget are the ones chosen on dev prompts by benchmarks/task_learnability.py (grid
point ``CHOSEN``; docs/benchmarks.md has the table).

    python benchmarks/task_suite_base.py --out runs/tasks-base
    crma-lightning fit --config configs/tasks.yaml --config configs/naive.yaml --run.dir runs/tasks-naive

The recipe is ``benchmarks.lib.pretrain.pretrain`` (AdamW, warm-up + cosine, packed rows); the directory holds
``save_pretrained`` weights, the byte tokenizer and ``pretrain.json`` (settings, loss curve, seconds). An
existing base with the same settings is kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/<script>.py`: the repo root

from benchmarks.lib.pretrain import INFO_FILE, PretrainSettings, pretrain
from crma_lightning.data.builtin_tasks import FAMILIES, PRETRAIN_FAMILIES


def model_config(hidden: int, layers: int) -> dict:
    """A tiny Llama of ``hidden`` x ``layers``, with positions for the suite's short rows."""
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    }


def recipe(hidden: int, layers: int, steps: int) -> PretrainSettings:
    """The pretraining recipe at one model size and budget (the grid of benchmarks/task_learnability.py)."""
    return PretrainSettings(
        model_config=model_config(hidden, layers), steps=steps, batch_size=16, max_length=64, lr=3e-3, weight_decay=0.0
    )


CHOSEN = (128, 2, 1500)
"""(hidden, layers, pretraining steps): grid point ``a`` of benchmarks/task_learnability.py, chosen on dev."""
MODEL_CONFIG = model_config(*CHOSEN[:2])
SETTINGS = recipe(*CHOSEN)
SPECS = [
    {"name": t, "builtin": t, "prompt_field": "prompt", "response_field": "response"}
    for family in PRETRAIN_FAMILIES
    for t in FAMILIES[family]
]
"""Every task of the pretraining families, as the prompt/response domains the pretraining mixes in equal shares."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/tasks-base", help="directory for the base (default: runs/tasks-base)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    out = Path(args.out)
    info_file = out / INFO_FILE
    if info_file.is_file() and json.loads(info_file.read_text()).get("settings") == asdict(SETTINGS):
        print(f"{out}: a base with these settings exists; kept")
        return
    torch.set_num_threads(1)  # a model this small is fastest on one thread (and shares a small CPU)
    out.mkdir(parents=True, exist_ok=True)
    info = pretrain(SPECS, SETTINGS, out, args.device)
    print(f"{out}: pretrained in {info['seconds']:.0f} s, final loss {info['loss_curve'][-1]['loss']:.3f}")


if __name__ == "__main__":
    main()
