"""One module per PEFT method (config fields, tensors and their checks, merged/switchable capability and branch
factors), and the registry that picks one by ``peft_type``. Torch-free at import; see docs/peft-methods.md."""

from .base import (EXPORT_MERGED, MAX_RANK, UNUSED_HEADS, AdapterConfig, BaseLayer, Capability, PeftMethod,
                   RefusedOption, TensorInfo, TensorKey, is_unused_head)
from .lora import LORA, Lora, LoraAdapterConfig
from .registry import (NOT_MERGEABLE, method_for, method_names, register_method, supported_peft_types,
                       unregister_method)
from .tuner import TunerMethod

__all__ = [
    "EXPORT_MERGED", "LORA", "MAX_RANK", "NOT_MERGEABLE", "UNUSED_HEADS", "AdapterConfig", "BaseLayer", "Capability",
    "Lora", "LoraAdapterConfig", "PeftMethod", "RefusedOption", "TensorInfo", "TensorKey", "TunerMethod",
    "is_unused_head", "method_for", "method_names", "register_method", "supported_peft_types", "unregister_method",
]
