"""``compile: true``: ``torch.compile`` each decoder layer, LoRA included, in place (parameter names unchanged).

What is compiled: every decoder layer (``CRMABlock.base_layer`` when CRMA is attached), with the LoRA
layers inside it - the bulk of the work. CRMA's application stays eager: its factors are computed for all
blocks at once per step outside the blocks (:mod:`crma_lightning.adapters.crma_batch`), and the lookup of a
block's slice (a weak mapping, parameter version checks) would be a graph break inside the compiled
region; what is left per block is two thin matmuls. Per layer, not the whole model: that is the unit FSDP2
shards and gathers (compile after ``fully_shard``), and one compiled graph serves every layer.
``nn.Module.compile`` compiles in place, so state dicts, checkpoints and adapter files are unchanged.
"""

from __future__ import annotations

from torch import nn

from crma_lightning import _compat
from crma_lightning.adapters import CRMABlock, find_decoder_layers

BACKEND = "inductor"  # needs a C compiler on CPU; tests use "aot_eager" (same graphs, no code generation)


def compile_decoder_layers(model: nn.Module) -> int:
    """Compile every decoder layer of ``model`` not compiled yet; returns how many were compiled now."""
    _, layers = find_decoder_layers(model)
    count = 0
    for block in layers:
        layer = block.base_layer if isinstance(block, CRMABlock) else block
        if _compat.is_compiled(layer):  # the layer itself records it: a second call compiles nothing again
            continue
        layer.compile(backend=BACKEND)
        count += 1
    return count
