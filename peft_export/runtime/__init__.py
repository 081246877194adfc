"""Torch-free runtime: ``EmbeddingModel`` and the similarity helpers."""

from .model import EmbeddingModel
from .onnxruntime_backend import SessionSettings
from .openvino_backend import OpenVinoSettings
from .similarity import similarity, similarity_pairwise

__all__ = ["EmbeddingModel", "OpenVinoSettings", "SessionSettings", "similarity", "similarity_pairwise"]
