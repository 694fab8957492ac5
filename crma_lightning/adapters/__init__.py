"""Pure-PyTorch adapters: LoRA and CRMA, attaching them to Hugging Face models, saving them.

LoRA keeps a bank of named adapters per linear layer; CRMA is a bounded residual mixer after every
decoder layer. Nothing in this package imports Lightning.
"""

from crma_lightning.adapters.crma import CRMAAdapter, CRMABlock, CRMAConfig, sinkhorn
from crma_lightning.adapters.inject import (
    ADAPTER_TYPES,
    AdapterType,
    AttachedAdapters,
    adapter_parameter_names,
    attach_adapters,
    check_adapter_type,
    crma_adapters,
    detach_adapters,
    find_decoder_layers,
    hidden_size_of,
    linear_module_names,
    lora_adapter_names,
    lora_layers,
    resolve_lora_targets,
)
from crma_lightning.adapters.lora import LoRAConfig, LoRALinear, check_adapter_name
from crma_lightning.adapters.serialization import (
    adapter_state_dict,
    export_peft_adapter,
    load_adapters,
    read_adapter_metadata,
    save_adapters,
)
from crma_lightning.adapters.switching import (
    active_adapter_names,
    add_lora_adapter,
    delete_lora_adapter,
    merge_lora,
    set_active_adapter,
    set_active_adapters,
    set_adapter_trainable,
    set_crma_enabled,
    set_crma_trainable,
    unmerge_lora,
)

__all__ = [
    "ADAPTER_TYPES",
    "AdapterType",
    "AttachedAdapters",
    "CRMAAdapter",
    "CRMABlock",
    "CRMAConfig",
    "LoRAConfig",
    "LoRALinear",
    "active_adapter_names",
    "adapter_parameter_names",
    "adapter_state_dict",
    "add_lora_adapter",
    "attach_adapters",
    "check_adapter_name",
    "check_adapter_type",
    "crma_adapters",
    "delete_lora_adapter",
    "detach_adapters",
    "export_peft_adapter",
    "find_decoder_layers",
    "hidden_size_of",
    "linear_module_names",
    "load_adapters",
    "lora_adapter_names",
    "lora_layers",
    "merge_lora",
    "read_adapter_metadata",
    "resolve_lora_targets",
    "save_adapters",
    "set_active_adapter",
    "set_active_adapters",
    "set_adapter_trainable",
    "set_crma_enabled",
    "set_crma_trainable",
    "sinkhorn",
    "unmerge_lora",
]
