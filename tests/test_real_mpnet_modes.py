"""Every export mode on the real all-mpnet-base-v2 (110M, trained weights) with a LoRA adapter trained for real:
merged and switchable, ONNX and OpenVINO, each equal to sentence-transformers with the PEFT adapter loaded within
1e-5 on real texts of mixed length (batch 1 and mixed batches, one text past max_seq_length); the adapter moves the
embeddings (so equality is not the base's); OpenVINO bf16 stays above a cosine of 0.999. Slow: minutes on 2 cores."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SENTENCE_ATOL, max_unit_diff, unit
from fixtures import text

from peft_export import EmbeddingModel, export_onnx_model, export_openvino_model

pytestmark = pytest.mark.slow

MODES = ["merged-onnx", "switchable-onnx", "merged-openvino", "switchable-openvino"]


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return text.real_sentences(40, seed=3) + ["Hi", " ".join(["A sentence past the maximum length."] * 80)]


@pytest.fixture(scope="module")
def eager(real_mpnet, texts):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(real_mpnet.base), device="cpu")
    base = model.encode(texts, batch_size=8)
    model.load_adapter(str(real_mpnet.adapter))
    return model.encode(texts, batch_size=8), base


@pytest.fixture(scope="module")
def exports(real_mpnet, tmp_path_factory):
    root = tmp_path_factory.mktemp("real-mpnet-modes")
    built = {}

    def export(mode: str):
        if mode not in built:
            exporter = export_openvino_model if mode.endswith("openvino") else export_onnx_model
            out = root / mode
            if mode.startswith("switchable"):
                exporter(str(real_mpnet.base), out, adapters=[f"tuned={real_mpnet.adapter}"], switchable=True,
                         log=lambda message: None)
            else:
                exporter(str(real_mpnet.adapter), out, base=str(real_mpnet.base), log=lambda message: None)
            built[mode] = out
        return built[mode]
    return export


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_equals_eager_peft_on_the_real_model(mode, exports, eager, texts):
    adapted, base = eager
    assert float((unit(adapted) * unit(base)).sum(1).mean()) < 0.995  # the trained adapter moves the embeddings
    kwargs = {"inference_precision": "f32"} if mode.endswith("openvino") else {}
    model = EmbeddingModel(exports(mode), **kwargs)
    adapter = {"adapter": "tuned"} if mode.startswith("switchable") else {}
    mixed = model.encode(texts, batch_size=7, **adapter)
    single = np.stack([model.encode(t, **adapter) for t in texts[:8]])
    assert max_unit_diff(mixed, adapted) < SENTENCE_ATOL
    assert max_unit_diff(single, adapted[:8]) < SENTENCE_ATOL
    if mode.startswith("switchable"):  # no adapter is the base model
        assert max_unit_diff(model.encode(texts, batch_size=7), base) < SENTENCE_ATOL


def test_openvino_bf16_stays_close_on_the_real_model(exports, eager, texts):
    got = EmbeddingModel(exports("merged-openvino"), inference_precision="bf16").encode(texts, batch_size=7)
    cosines = (unit(got) * unit(eager[0])).sum(1)
    assert cosines.min() > 0.999
