"""fp16 graphs for GPUs (``merge-onnx --dtype fp16``): ONNX Runtime's own float16 converter, numerically fragile
operators kept in fp32, behind the quality gate against the validated fp32 graph.

Kept in fp32, and why:

* LayerNormalization: the variance of 384-wide activations overflows fp16's range on outliers;
* Softmax: exp of attention scores saturates in fp16;
* the pooling and Normalize tail (ReduceSum, Div, Clip, ReduceL2, Sqrt, Pow): sums over up to max_seq_length
  tokens and the L2 norm lose digits in fp16;
* Erf (GELU): cheap, and its fp16 kernels differ between execution providers.

Graph inputs and outputs stay int64 / float32 (``keep_io_types``), so the runtime feeds and reads the same types
for every dtype. ONNX Runtime's CPU provider runs these graphs too (some operators through casts), which is how
the gate is measured on a machine without a GPU; the speed-up is for CUDA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..tasks import Task
from .gate import QualityGate, backend_embedder, enforce, fp16_gate, gate_dict, measure_quality

FP32_OPS = ["LayerNormalization", "Softmax", "ReduceSum", "ReduceMean", "ReduceL2", "Div", "Clip", "Sqrt", "Pow",
            "Erf"]
DTYPES = ("fp32", "fp16")


def convert_to_fp16(fp32_path: Path, out_path: Path) -> Path:
    """Write the fp16 graph of ``fp32_path`` to ``out_path``. An fp32 graph with external data (weights over 2 GiB:
    a large reranker such as bge-reranker-v2-m3 or Qwen3-Reranker-4B) keeps its weights in one external file
    (``out_path.name + "_data"``): half of a 16 GB graph is still over protobuf's 2 GiB cap on one file."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from .external_data import uses_external_data

    model = onnx.load(str(fp32_path))
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS)
    if uses_external_data(fp32_path):
        onnx.save_model(converted, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out_path.name + "_data", size_threshold=1024)
    else:
        onnx.save_model(converted, str(out_path))
    return out_path


def fp16_with_gate(fp32_path: Path, out_path: Path, tokenizer, fp32_backend, pairs: list[dict[str, str]],
                   gate: QualityGate, task: Task) -> dict[str, Any]:
    """Write the fp16 graph next to the fp32 one and check it against fp32 on the gate pairs (fails loudly)."""
    from ..runtime.onnxruntime_backend import OnnxRuntimeBackend

    convert_to_fp16(fp32_path, out_path)
    gate = fp16_gate(gate)
    try:
        quality = measure_quality(backend_embedder(tokenizer, fp32_backend, task=task),
                                  backend_embedder(tokenizer, OnnxRuntimeBackend(out_path), task=task), pairs, task)
        enforce(gate, quality, "The fp16 graph", task)
    except BaseException:
        out_path.unlink(missing_ok=True)
        out_path.with_name(out_path.name + "_data").unlink(missing_ok=True)
        raise
    return {**quality, "fp32_ops": FP32_OPS, "measured_on": "CPUExecutionProvider", "gate": gate_dict(gate, task)}
