"""Tiny transformers models built from configs (no downloads, seconds on CPU), and an in-memory logger."""

from __future__ import annotations

import torch
from lightning.pytorch.loggers import Logger

TINY_LLAMA_CONFIG = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
"""``ContinualLM(model_config=...)`` for the tests' tiny Llama-style model (vocab from the byte tokenizer)."""


def tiny_llama(seed: int = 0, vocab_size: int = 128, hidden: int = 32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0, vocab_size: int = 128, hidden: int = 32, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=256,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg).eval()


def tiny_neox(seed: int = 0, vocab_size: int = 128, hidden: int = 32, layers: int = 2):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPTNeoXForCausalLM(cfg).eval()


MODEL_FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "neox": tiny_neox}


class MemoryLogger(Logger):
    """Records every ``log_metrics`` call as ``(metrics, step)``."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[dict[str, float], int]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None) -> None:
        self.records.append((dict(metrics), step))

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def with_key(self, key: str) -> list[tuple[dict[str, float], int]]:
        return [(m, s) for m, s in self.records if key in m]

