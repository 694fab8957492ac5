"""Pretrain the base model of the built-in task suite (configs/tasks.yaml): run once, ~1 minute on 2 CPU cores.

Why: LoRA adapts a pretrained model; on the demo's randomly initialised tiny model it learns almost
nothing in a few hundred steps (held-out loss of a task 5.4 -> 4.4 in 150 steps at lr 0.02, exact match
0). A base that already knows the suite's row format and how to copy a word - full fine-tuning on the
``copy`` task (``"copy <word>\\n= <word>\\n"``, a task that is *not* in the suite) - is what a pretrained LLM
is to a user's tasks: the stages then learn each task's mapping in a few hundred LoRA steps.

    python benchmarks/task_suite_base.py --out runs/tasks-base
    crma-lightning fit --config configs/tasks.yaml --config configs/naive.yaml --run.dir runs/tasks-naive

The recipe is ``benchmarks/_pretrain.pretrain`` (AdamW, warm-up + cosine, packed rows); the directory holds
``save_pretrained`` weights, the byte tokenizer and ``pretrain.json`` (settings, loss curve, seconds). An
existing base with the same settings is kept.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from _pretrain import INFO_FILE, PretrainSettings, pretrain

MODEL_CONFIG = {
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
"""The demo's model size (configs/demo.yaml), with positions for the suite's short rows."""
SETTINGS = PretrainSettings(
    model_config=MODEL_CONFIG, steps=600, batch_size=16, max_length=64, lr=3e-3, weight_decay=0.0
)
SPECS = [{"name": "copy", "builtin": "copy", "prompt_field": "prompt", "response_field": "response"}]


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
