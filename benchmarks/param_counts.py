"""Parameter counts of a base model and of its LoRA / CRMA adapters, on the meta device (no memory).

    python benchmarks/param_counts.py                  # Mistral-7B-v0.1 shape, LoRA r=16 all-linear
    python benchmarks/param_counts.py --r 8 --targets q_proj v_proj

The numbers behind the memory arithmetic in docs/distributed.md.
"""

from __future__ import annotations

import argparse

import torch
from transformers import MistralConfig, MistralForCausalLM

from crma_lightning.adapters import LoRAConfig, attach_adapters, crma_adapters, lora_layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--targets", nargs="*", default=None, help="LoRA target suffixes (default: all-linear)")
    args = parser.parse_args()
    with torch.device("meta"):
        model = MistralForCausalLM(MistralConfig())  # the defaults are Mistral-7B-v0.1's shape
        base = sum(p.numel() for p in model.parameters())
        attach_adapters(model, "crma", LoRAConfig(r=args.r, target_modules=args.targets or "all-linear"))
    lora = sum(
        p.numel() for _, layer in lora_layers(model) for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters())
    )
    crma = sum(p.numel() for _, adapter in crma_adapters(model) for p in adapter.parameters())
    print(f"base {base:,}  LoRA per task {lora:,}  CRMA {crma:,}")


if __name__ == "__main__":
    main()
