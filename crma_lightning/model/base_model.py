"""Loading or building the base causal LM and its tokenizer."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from crma_lightning.data.tokenizer import BYTE_TOKENIZER, load_tokenizer
from crma_lightning.hub import load_pretrained

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}
_DTYPE_KWARG = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def resolve_dtype(dtype: str) -> torch.dtype | str:
    """``"bfloat16"`` -> ``torch.bfloat16`` etc.; raises ``ValueError`` listing the valid names."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: expected one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def load_model_tokenizer(
    model_name_or_path: str | None, tokenizer: str | None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The tokenizer named by ``tokenizer``, else the model's own, else (model from config) the byte one."""
    if tokenizer is None:
        if model_name_or_path is not None:
            return load_tokenizer(model_name_or_path, trust_remote_code=trust_remote_code, what="model_name_or_path")
        tokenizer = BYTE_TOKENIZER
    return load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)


def build_model(
    model_name_or_path: str | None,
    model_config: dict[str, Any] | None,
    tokenizer: PreTrainedTokenizerBase,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    meta: bool = False,
) -> PreTrainedModel:
    """``from_pretrained(model_name_or_path)`` or ``from_config(model_config)``; the result is frozen-ready.

    With a config, ``vocab_size`` defaults to the tokenizer's size and the special token ids to the
    tokenizer's. Either way the tokenizer must fit the model's embedding table.

    With ``meta`` the model is built on the meta device: the same modules, parameter names, shapes and
    dtypes, but no memory and no values (no weights are read). The sharding strategy materialises it
    and fills it from rank 0 (``ContinualLM(init_on_rank0=True)``, docs/distributed.md).
    """
    torch_dtype = resolve_dtype(dtype)
    if (model_name_or_path is None) == (model_config is None):
        raise ValueError("give exactly one of `model_name_or_path` and `model_config`")
    if model_name_or_path is not None and meta:
        config = load_pretrained(
            AutoConfig.from_pretrained, model_name_or_path, "model_name_or_path", trust_remote_code=trust_remote_code
        )
        if torch_dtype == "auto":  # what from_pretrained would pick: the checkpoint's dtype
            torch_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        model = model.to(resolve_dtype(torch_dtype) if isinstance(torch_dtype, str) else torch_dtype)
    elif model_name_or_path is not None:
        model = load_pretrained(
            AutoModelForCausalLM.from_pretrained,
            model_name_or_path,
            "model_name_or_path",
            trust_remote_code=trust_remote_code,
            **{_DTYPE_KWARG: torch_dtype},
        )
    else:
        cfg = dict(model_config)
        model_type = cfg.pop("model_type", None)
        if model_type is None:
            raise ValueError(f"model_config needs a `model_type` (e.g. 'llama'); got keys {sorted(model_config)}")
        cfg.setdefault("vocab_size", len(tokenizer))
        if cfg["vocab_size"] < len(tokenizer):
            raise ValueError(
                f"model_config vocab_size={cfg['vocab_size']} is too small: the tokenizer has {len(tokenizer)} "
                "tokens; leave vocab_size out to use the tokenizer's size"
            )
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            cfg.setdefault(key, getattr(tokenizer, key))
        try:
            config = AutoConfig.for_model(model_type, **cfg)
        except ValueError as err:
            raise ValueError(f"model_config: {err}") from err
        with torch.device("meta") if meta else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        if isinstance(torch_dtype, torch.dtype):
            model = model.to(torch_dtype)
    vocab = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embedding table has {vocab} rows; "
            "use the model's own tokenizer or a model_config with a larger vocab_size"
        )
    model.config.use_cache = False
    return model


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "seq_length")
"""Config attributes that name a model's number of positions (Llama/NeoX/Mistral, GPT-2, older GPTs)."""


def check_context(model: Any, max_length: int) -> None:
    """``ValueError`` when ``max_length`` exceeds the positions of ``model`` (a transformers model).

    Past its learned position table a GPT-2 raises an ``IndexError`` mid-run; a rotary model (Llama)
    silently trains on positions it never saw. Models whose config names no such limit are not checked.
    """
    config = getattr(model, "config", None)
    for key in CONTEXT_KEYS:
        limit = getattr(config, key, None)
        if isinstance(limit, int) and limit > 0:
            if max_length > limit:
                raise ValueError(
                    f"data.max_length={max_length} is above the model's context: {key}={limit} "
                    f"({type(model).__name__}); lower data.max_length to at most {limit}"
                )
            return
