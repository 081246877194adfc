"""Torch-free runtime: ``EmbeddingModel`` (on the shared ``ExportedModel``) and the similarity helpers.

Every runtime class (a subclass of ``ExportedModel``, one per task) is imported here, so that the class an
export's task needs is known whichever runtime module is imported first (``exported_model.runtime_class_for``).
"""

from .exported_model import ExportedModel
from .model import EmbeddingModel
from .reranker_model import CrossEncoderModel
from .onnxruntime_backend import SessionSettings
from .openvino_backend import OpenVinoSettings
from .similarity import similarity, similarity_pairwise

__all__ = ["CrossEncoderModel", "EmbeddingModel", "ExportedModel", "OpenVinoSettings", "SessionSettings", "similarity",
           "similarity_pairwise"]
