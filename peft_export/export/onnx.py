"""Trace an EmbeddingPipeline to ONNX with torch.onnx, dynamic batch and sequence axes."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .graph import EmbeddingPipeline

DEFAULT_OPSET = 17
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx_data"
OUTPUT_NAMES = ["sentence_embedding", "token_embeddings"]
_TWO_GIB = 2 * 1024**3


def input_names(pipeline: EmbeddingPipeline) -> list[str]:
    names = ["input_ids", "attention_mask"]
    if pipeline.uses_token_type_ids:
        names.append("token_type_ids")
    return names


def dummy_inputs(pipeline: EmbeddingPipeline, batch: int = 2, seq: int = 16) -> tuple[torch.Tensor, ...]:
    """Tracing inputs; validation deliberately uses other shapes."""
    vocab = int(getattr(pipeline.encoder.config, "vocab_size", 1000))
    input_ids = torch.randint(5, min(vocab, 1000), (batch, seq), dtype=torch.int64)
    attention_mask = torch.ones(batch, seq, dtype=torch.int64)
    attention_mask[1:, seq // 2 :] = 0  # a padded row, so masking is traced
    tensors = [input_ids, attention_mask]
    if pipeline.uses_token_type_ids:
        tensors.append(torch.zeros(batch, seq, dtype=torch.int64))
    return tuple(tensors)


def export_onnx(pipeline: EmbeddingPipeline, folder: Path, opset: int = DEFAULT_OPSET) -> Path:
    """Write ``folder/model.onnx`` (plus ``model.onnx_data`` when the weights exceed protobuf's 2 GiB)."""
    import onnx

    path = folder / MODEL_FILE
    names = input_names(pipeline)
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    axes["sentence_embedding"] = {0: "batch"}
    axes["token_embeddings"] = {0: "batch", 1: "sequence"}
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns about its own deprecation and about tracing constants; neither
        # affects this graph, whose correctness the validation stage checks numerically.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            pipeline,
            dummy_inputs(pipeline),
            str(path),
            input_names=names,
            output_names=OUTPUT_NAMES,
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    size = sum(p.numel() * p.element_size() for p in pipeline.parameters())
    if size >= _TWO_GIB:
        # Large models: move weights to one external file with a fixed relative name, so the folder can move.
        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=EXTERNAL_DATA_FILE, size_threshold=1024)
    return path
