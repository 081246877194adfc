"""``import peft_export`` and the runtime never import torch, transformers or peft (checked in fresh interpreters)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "peft", "sentence_transformers")


def _run(code: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def _report(extra: str = "") -> str:
    return (
        "import json, sys\n"
        f"{extra}\n"
        f"print(json.dumps({{'heavy': sorted(m for m in {HEAVY!r} if m in sys.modules), 'ok': True}}))\n"
    )


@pytest.mark.parametrize("statement", ["import peft_export", "import peft_export.runtime",
                                       "from peft_export import EmbeddingModel, ConfigError",
                                       "import peft_export.cli"])
def test_import_leaves_heavy_libraries_out(statement):
    assert _run(_report(statement)) == {"heavy": [], "ok": True}


def test_loading_and_encoding_stays_torch_free(bert_case):
    code = _report(
        "import numpy as np\n"
        "import peft_export\n"
        f"model = peft_export.EmbeddingModel({str(bert_case.export)!r})\n"
        "e = model.encode(['a torch-free sentence', 'another one'], normalize_embeddings=True)\n"
        "assert e.shape == (2, model.get_sentence_embedding_dimension())\n"
        "assert model.similarity(e, e).shape == (2, 2)\n"
        "assert model.encode('x', precision='ubinary').dtype == np.uint8\n"
        "assert len(model.encode(['x'], output_value='token_embeddings')) == 1\n"
    )
    assert _run(code) == {"heavy": [], "ok": True}


def test_cli_encode_and_info_stay_torch_free(bert_case):
    code = _report(
        "import contextlib, io\n"
        "from peft_export.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['encode', {str(bert_case.export)!r}, 'text', '--json']) == 0\n"
        f"    assert main(['info', {str(bert_case.export)!r}]) == 0\n"
    )
    assert _run(code) == {"heavy": [], "ok": True}


def test_merge_adapter_with_attention_fusion_stays_torch_free():
    """merge_adapter runs ONNX Runtime's transformer optimizer on the merged graph (a serving process: onnxruntime
    and onnx, no torch)."""
    from switchable_fixtures import switchable_export

    code = _report(
        "import peft_export\n"
        f"model = peft_export.EmbeddingModel({str(switchable_export())!r})\n"
        "assert model.manifest['export']['attention']\n"
        "model.merge_adapter('attn')\n"
        "assert model.merged_adapters() == ['attn']\n"
        "assert model.encode(['merged and fused'], adapter='attn').shape[0] == 1\n"
    )
    assert _run(code) == {"heavy": [], "ok": True}


def test_the_heavy_check_would_notice_torch():
    """Guard against a check that cannot fail: importing the exporter does bring torch in."""
    report = _run(_report("import peft_export.export.pipeline"))
    assert "torch" in report["heavy"]
