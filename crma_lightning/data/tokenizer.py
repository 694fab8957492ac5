"""Tokenizers: the offline byte-level tokenizer of the demo, and loading any Hugging Face tokenizer."""

from __future__ import annotations

from functools import lru_cache

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from crma_lightning.hub import load_pretrained

BYTE_TOKENIZER = "byte"
"""Name that selects :func:`byte_tokenizer` wherever a tokenizer path is accepted."""


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    visible += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in visible:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer that needs no files or downloads: one token per UTF-8 byte.

    Ids 0-255 are the bytes, 256 is ``<|pad|>``, 257 ``<|bos|>`` and 258 ``<|eos|>`` (vocabulary 259).
    It is a real ``PreTrainedTokenizerFast`` (``save_pretrained`` / ``decode`` / batching all work), so
    everything downstream treats it like any Hugging Face tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"pad_token": "<|pad|>", "bos_token": "<|bos|>", "eos_token": "<|eos|>"})
    fast.model_max_length = 1 << 30
    return fast


def load_tokenizer(
    name_or_path: str, trust_remote_code: bool = False, what: str = "tokenizer"
) -> PreTrainedTokenizerBase:
    """``"byte"`` gives :func:`byte_tokenizer`; anything else goes to ``AutoTokenizer.from_pretrained``.

    A tokenizer without a pad token gets its EOS token as pad (the usual causal-LM convention); the
    padding positions are masked out of the loss anyway. A missing directory or an unreachable Hub is
    a one-line ``ValueError`` naming ``what`` (the setting) and the path (:mod:`crma_lightning.hub`).
    """
    if name_or_path == BYTE_TOKENIZER:
        return byte_tokenizer()
    tokenizer = load_pretrained(AutoTokenizer.from_pretrained, name_or_path, what, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer {name_or_path!r} has neither a pad nor an EOS token; set one with "
                "tokenizer.add_special_tokens(...) and pass the tokenizer object"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id right- or left-padding fills with: the pad token, else EOS, else 0.

    Padded positions are masked (attention mask 0, label -100), so the id only has to be a valid one;
    every padded batch of the package takes it from here.
    """
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    return int(tokenizer.eos_token_id) if tokenizer.eos_token_id is not None else 0


def tokenizer_difference(data: PreTrainedTokenizerBase, model: PreTrainedTokenizerBase) -> str | None:
    """How the data's tokenizer differs from the model's (vocabulary, EOS), or ``None`` when they agree.

    Token ids index the model's embeddings: rows tokenised with another vocabulary train and evaluate
    on the wrong tokens without any error, so a data module's own tokenizer must be the model's.
    """
    if data is model:
        return None
    if len(data) != len(model):
        return f"{len(data)} tokens vs the model's {len(model)}"
    if data.eos_token_id != model.eos_token_id:
        return f"EOS id {data.eos_token_id} vs the model's {model.eos_token_id}"
    if data.get_vocab() != model.get_vocab():
        different = sorted(set(data.get_vocab().items()) ^ set(model.get_vocab().items()))[:3]
        return f"the vocabularies differ (e.g. {different})"
    return None
