"""peft_export: LoRA-adapted sentence-embedding models to ONNX or OpenVINO, served without torch.

Names are imported lazily so that ``import peft_export`` stays cheap and never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import (
    AdapterNotFoundError,
    ConfigError,
    InputError,
    InvalidInputError,
    MissingDependencyError,
    ModelNotFoundError,
    NonFiniteEmbeddingError,
    OutputExistsError,
    PeftExportError,
    ToolError,
    UnsafeModelError,
    ValidationError,
)

__version__ = "0.1.0"

__all__ = [
    "AdapterNotFoundError",
    "ConfigError",
    "CrossEncoderModel",
    "InvalidInputError",
    "EmbeddingModel",
    "InputError",
    "MissingDependencyError",
    "ModelNotFoundError",
    "NonFiniteEmbeddingError",
    "OpenVinoSettings",
    "OutputExistsError",
    "PeftExportError",
    "ToolError",
    "SessionSettings",
    "UnsafeModelError",
    "ValidationError",
    "__version__",
    "embed_corpus",
    "export_onnx_model",
    "export_openvino_model",
    "load",
]

if TYPE_CHECKING:
    from .corpus import embed_corpus
    from .export.api import export_onnx_model, export_openvino_model
    from .runtime.model import EmbeddingModel
    from .runtime.onnxruntime_backend import SessionSettings
    from .runtime.openvino_backend import OpenVinoSettings
    from .runtime.reranker_model import CrossEncoderModel
    from .tasks.loading import load


def __getattr__(name: str):
    if name == "EmbeddingModel":
        from .runtime.model import EmbeddingModel

        return EmbeddingModel
    if name == "CrossEncoderModel":
        from .runtime.reranker_model import CrossEncoderModel

        return CrossEncoderModel
    if name == "SessionSettings":
        from .runtime.onnxruntime_backend import SessionSettings

        return SessionSettings
    if name == "OpenVinoSettings":
        from .runtime.openvino_backend import OpenVinoSettings

        return OpenVinoSettings
    if name == "embed_corpus":
        from .corpus import embed_corpus

        return embed_corpus
    if name == "export_onnx_model":
        from .export.api import export_onnx_model

        return export_onnx_model
    if name == "export_openvino_model":
        from .export.api import export_openvino_model

        return export_openvino_model
    if name == "load":
        from .tasks.loading import load

        return load
    raise AttributeError(f"module 'peft_export' has no attribute {name!r}")
