"""Data: everything from a domain's text to the batches of one stage.

Domains (spec, sources, checks), row formats, tokenisation and packing, one domain's preparation, the
held-out prompts it is scored on, samplers, the tokenizer, the built-in domains and tasks, and the
sequential DataModule that chains them.

``crma_lightning.data.SequentialDomainDataModule`` is the YAML ``class_path``. Nothing here imports the
model, routing or evaluation: a domain is prepared from text and a tokenizer alone.
"""

from __future__ import annotations

from crma_lightning._lazy import lazy_exports

_LAZY = {
    "SequentialDomainDataModule": "crma_lightning.data.datamodule",
    "DEFAULT_DOMAINS": "crma_lightning.data.datamodule",
    "DomainSpec": "crma_lightning.data.domains",
    "as_domain_spec": "crma_lightning.data.domains",
    "describe_row": "crma_lightning.data.domains",
    "load_raw": "crma_lightning.data.domains",
    "validate_domains": "crma_lightning.data.domains",
    "Collator": "crma_lightning.data.sampling",
    "extract_text": "crma_lightning.data.row_formats",
    "scored_targets": "crma_lightning.data.packing",
    "tokenize": "crma_lightning.data.packing",
}

__all__ = list(_LAZY)
__getattr__ = lazy_exports(__name__, _LAZY)
