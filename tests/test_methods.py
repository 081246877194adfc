"""The PEFT-method seam (issue 24 item 2): the registry picks a method module by ``peft_type``, refuses every other
method and the options a method cannot export with one set of messages; LoRA's checks live in its module with the
messages they had before; and a method registered by a test alone is parsed, described and refused by capability
without any other module knowing it."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from peft_export import ConfigError, export_onnx_model
from peft_export.cli import main as cli_main
from peft_export.methods import (LORA, MAX_RANK, AdapterConfig, BaseLayer, Capability, PeftMethod, RefusedOption,
                                 TensorInfo, TensorKey, method_for, method_names, register_method,
                                 supported_peft_types, unregister_method)
from peft_export.methods.base import refuse_options
from peft_export.source.adapter_config import check_adapter_config
from switchable_fixtures import base_model, edit_adapter_config, make_adapter

PACKAGE = Path(__file__).resolve().parents[1] / "peft_export"
WHERE = "x/adapter_config.json"
ALL = ("LORA", "ADALORA", "IA3", "LOHA", "LOKR", "OFT", "BOFT", "VERA", "FOURIERFT", "HRA", "MISS", "C3A", "RANDLORA",
       "SHIRA", "DELORA", "GRALORA", "VBLORA", "ROAD", "WAVEFT", "LN_TUNING", "BEFT", "DEFT", "HIRA",
       "PVERA", "TRAINABLE_TOKENS", "PEANUT", "SUPERTUNING", "TINYLORA", "OSF", "UNILORA", "PSOFT", "GLORA",
       "ADAMSS", "FROD")
NAMES = ("LoRA, AdaLoRA, IA3, LoHa, LoKr, OFT, BOFT, VeRA, FourierFT, HRA, MiSS, C3A, RandLoRA, SHiRA, DeLoRA, "
         "GraLoRA, VBLoRA, RoAd, WaveFT, LN tuning, BEFT, DeFT, HiRA, PVeRA, "
         "trainable tokens, PEANuT, SuperTuning, TinyLoRA, OSF, UniLoRA, PSOFT, GLoRA, AdaMSS, FRoD")
LORA_CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}


def _quiet(msg: str) -> None:
    return None


def _lora(**changes) -> dict[str, Any]:
    return {**LORA_CONFIG, **changes}


# ---- the registry and the one refusal of methods and options

def test_lora_is_registered_under_its_peft_type():
    assert supported_peft_types() == ALL
    assert method_for("LORA") is LORA
    config = check_adapter_config(_lora(), WHERE)
    assert config.method is LORA and config.peft_type == "LORA" and (config.r, config.lora_alpha) == (4, 8.0)
    assert config.describe() == "r=4 alpha=8.0 targets=['query', 'value']"
    assert config.summary() == {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "use_rslora": None,
                                "use_dora": None, "bias": None, "modules_to_save": None}


@pytest.mark.parametrize("peft_type", ["NOT_A_TUNER", "lora", None, ["LORA"]])
def test_registry_refuses_an_unknown_peft_type(peft_type):
    message = f"{WHERE}: peft_type is {peft_type!r}; peft_export supports {', '.join(ALL)} adapters only"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        check_adapter_config(_lora(peft_type=peft_type), WHERE)
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        method_for(peft_type, WHERE)


@pytest.mark.parametrize("key, value", [
    ("layer_replication", [[0, 1]]), ("alora_invocation_tokens", [1]), ("arrow_config", {"a": 1}),
    ("target_parameters", ["x"]), ("trainable_token_indices", [1, 2]), ("use_qalora", True), ("use_bdlora", True),
])
def test_lora_options_refused_everywhere_keep_their_message(key, value):
    message = f"{WHERE}: {key!r} is set ({value!r}); peft_export cannot export it exactly"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        check_adapter_config(_lora(**{key: value}), WHERE)


def test_modules_to_save_is_accepted_merged_and_switchable():
    config = check_adapter_config(_lora(modules_to_save=["classifier"]), WHERE)  # a merged export takes it
    LORA.check_switchable(config, WHERE)  # and a switchable one: saved-copy inputs (tests/test_switchable_methods.py)
    with pytest.raises(ConfigError, match=r"'modules_to_save' must be a list of module names, found 'classifier'"):
        check_adapter_config(_lora(modules_to_save="classifier"), WHERE)


@pytest.mark.parametrize("key, value, why", [
    ("lora_bias", True, "it trains a bias on lora_B"),
    ("kasa_config", {"k": 1}, "KaSA changes the LoRA forward"),
    ("monteclora_config", {"k": 1}, "MonteCLoRA changes the LoRA forward"),
    ("velora_config", {"k": 1}, "VeLoRA changes the LoRA forward"),
])
def test_lora_options_refused_in_switchable_exports_keep_their_message(key, value, why):
    config = check_adapter_config(_lora(**{key: value}), WHERE)  # accepted for a merged export
    found = (f"{WHERE}: {key!r} is set ({value!r}); a switchable export cannot reproduce it exactly ({why}). "
             "Export this adapter merged instead")
    with pytest.raises(ConfigError, match=re.escape(f"{found} (export_onnx_model without switchable=True).")) as info:
        LORA.check_switchable(config, WHERE)
    assert info.value.for_cli() == f"{found} (merge-onnx without --switchable)."


def test_lora_trained_bias_is_refused_in_switchable_exports_with_its_message():
    config = check_adapter_config(_lora(bias="all"), WHERE)
    with pytest.raises(ConfigError) as info:
        LORA.check_switchable(config, WHERE)
    found = (f"{WHERE}: 'bias' is 'all': the adapter trains the base layers' biases, which a switchable export shares "
             "between adapters. Export it merged instead")
    assert str(info.value) == f"{found} (export_onnx_model without switchable=True)."
    assert info.value.for_cli() == f"{found} (merge-onnx without --switchable)."
    LORA.check_switchable(check_adapter_config(_lora(bias="none"), WHERE), WHERE)  # the default passes


@pytest.mark.parametrize("changes, message", [
    ({"r": 0}, f"'r' must be an integer in 1..{MAX_RANK}, found 0"),
    ({"r": True}, f"'r' must be an integer in 1..{MAX_RANK}, found True"),
    ({"lora_alpha": float("nan")}, "'lora_alpha' must be a finite number, found nan"),
    ({"rank_pattern": {"query": 2.5}}, f"rank_pattern['query'] must be an integer rank <= {MAX_RANK}, found 2.5"),
    ({"alpha_pattern": [1]}, "'alpha_pattern' must be a mapping, found list"),
    ({"target_modules": [""]}, "'target_modules' must be a non-empty list of module names or a regex string"),
])
def test_lora_config_fields_keep_their_messages(changes, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(f'{WHERE}: {message}')}$"):
        check_adapter_config(_lora(**changes), WHERE)


# ---- LoRA's tensor checks (the messages export/merge.py gave before the seam)

LAYERS = {"enc.query": BaseLayer("Linear", True, (32, 16)), "enc.norm": BaseLayer("LayerNorm", False, (16,))}
WEIGHTS = "x/adapter_model.safetensors"
PREFIX = "base_model.model."


def _good(r: int = 4) -> dict[str, TensorInfo]:
    return {f"{PREFIX}enc.query.lora_A.weight": TensorInfo((r, 16), "torch.float32", True, True),
            f"{PREFIX}enc.query.lora_B.weight": TensorInfo((32, r), "torch.float32", True, True)}


def _check(tensors: dict[str, TensorInfo], config: AdapterConfig | None = None, targeted=("enc.query",)) -> None:
    config = config or check_adapter_config(_lora(target_modules=["query"]), WHERE)
    LORA.check_tensors(config, WEIGHTS, sorted(tensors), tensors.__getitem__, LAYERS, "TinyModel", lambda: targeted)


def test_lora_tensor_checks_pass_a_complete_adapter():
    _check(_good())
    _check({**_good(), "base_model.model.pooler.dense.lora_A.weight": TensorInfo((4, 16), "torch.float32", True,
                                                                                True)})  # absent unused head


def test_lora_tensor_checks_refuse_a_missing_lora_b():
    tensors = _good()
    del tensors[f"{PREFIX}enc.query.lora_B.weight"]
    with pytest.raises(ConfigError) as info:
        _check(tensors)
    assert str(info.value) == (
        f"{WEIGHTS}: tensor {PREFIX}enc.query.lora_B.weight is missing: target_modules ['query'] put a LoRA on "
        "'enc.query', but the file has no complete lora_A/lora_B pair for it. The file is incomplete or belongs to "
        "another adapter; save the adapter again.")


def test_lora_tensor_checks_refuse_a_targeted_module_without_tensors():
    with pytest.raises(ConfigError, match=r"tensor base_model\.model\.enc\.key\.lora_A\.weight is missing: "
                                          r"target_modules \['query'\] put a LoRA on 'enc\.key'"):
        _check(_good(), targeted=("enc.query", "enc.key"))


@pytest.mark.parametrize("key, info, message", [
    ("enc.query.lora_A.weight", TensorInfo((4, 19), "torch.float32", True, True),
     "'base_model.model.enc.query.lora_A.weight' has shape (4, 19) but the base layer takes 16 inputs; was this "
     "adapter trained on another base?"),
    ("enc.query.lora_B.weight", TensorInfo((31, 4), "torch.float32", True, True),
     "'base_model.model.enc.query.lora_B.weight' has shape (31, 4) but the base layer has 32 outputs; was this "
     "adapter trained on another base?"),
    ("enc.query.lora_A.weight", TensorInfo((4, 16, 1), "torch.float32", True, True),
     "'base_model.model.enc.query.lora_A.weight' has shape (4, 16, 1), expected a matrix"),
    ("enc.query.lora_B.weight", TensorInfo((32, 4), "torch.int32", False, True),
     "tensor 'base_model.model.enc.query.lora_B.weight' has dtype torch.int32, expected a float type"),
    ("enc.query.lora_A.weight", TensorInfo((4, 16), "torch.float32", True, False),
     "tensor 'base_model.model.enc.query.lora_A.weight' contains NaN or Inf values"),
])
def test_lora_tensor_checks_keep_their_messages(key, info, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(f'{WEIGHTS}: {message}')}$"):
        _check({**_good(), PREFIX + key: info})


def test_lora_tensor_checks_refuse_other_modules_keys_and_layers():
    extra = TensorInfo((4, 16), "torch.float32", True, True)
    with pytest.raises(ConfigError, match=r"^x/adapter_model\.safetensors: tensor 'base_model\.model\.enc\.key\.lora_A"
                                          r"\.weight' targets module 'enc\.key', which the base model \(TinyModel\) "
                                          r"does not have; was this adapter trained on another base\?$"):
        _check({**_good(), f"{PREFIX}enc.key.lora_A.weight": extra})
    with pytest.raises(ConfigError, match=r"^x/adapter_model\.safetensors: tensor 'classifier\.weight' is not a LoRA "
                                          r"weight \(lora_A/lora_B\); only LoRA tensors \(and modules_to_save copies "
                                          r"the config names\) are exported$"):
        _check({**_good(), "classifier.weight": extra})
    with pytest.raises(ConfigError, match=r"^x/adapter_model\.safetensors: 'base_model\.model\.enc\.norm\.lora_A"
                                          r"\.weight' targets a LayerNorm; only Linear layers are supported$"):
        _check({**_good(), f"{PREFIX}enc.norm.lora_A.weight": extra})
    with pytest.raises(ConfigError, match=r"^x/adapter_model\.safetensors holds no tensors$"):
        _check({})


def test_lora_tensor_checks_refuse_a_rank_the_config_does_not_give():
    config = check_adapter_config(_lora(target_modules=["query"], rank_pattern={"query": 2}), WHERE)
    with pytest.raises(ConfigError, match=re.escape(
            f"{WEIGHTS}: '{PREFIX}enc.query.lora_A.weight' has shape (4, 16), but adapter_config.json gives "
            "'enc.query' rank rank_pattern['query']=2; the config and the weights disagree (was the config edited?)")):
        _check(_good(4), config)
    _check(_good(2), config)


# ---- a second method, registered by the test alone

class FakeScales(PeftMethod):
    """A made-up merged-only method: one scale vector per targeted Linear, "<module>.fake_scale"."""

    peft_type = "FAKE_SCALES"
    name = "FakeScales"
    switchable = Capability(False, "a scale vector has no low-rank branch in the graph")
    refused_options = PeftMethod.refused_options + (RefusedOption("fake_extra"),)
    key_pattern = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>fake_scale)$")
    required_parts = ("fake_scale",)

    def check_config(self, raw: dict[str, Any], where: str) -> None:
        size = raw.get("fake_size")
        if not isinstance(size, int) or size <= 0:
            raise ConfigError(f"{where}: 'fake_size' must be a positive integer, found {size!r}")

    def summary(self, config: AdapterConfig) -> dict[str, Any]:
        return {"fake_size": config.raw["fake_size"], "target_modules": config.target_modules}

    def tensor_name(self, prefix: str, module: str, part: str) -> str:
        return f"{prefix}{module}.{part}"

    def check_tensor_shape(self, config, where, key: TensorKey, shape, layer: BaseLayer) -> None:
        if tuple(shape) != (layer.out_features,):
            raise ConfigError(f"{where}: {key.key!r} has shape {tuple(shape)}, expected ({layer.out_features},)")

    def peft_config_class(self) -> type:
        raise NotImplementedError

    def peft_layers(self, model, adapter_name: str) -> list:
        raise NotImplementedError


class UnmergeableScales(FakeScales):
    peft_type = "UNMERGEABLE_SCALES"
    name = "UnmergeableScales"
    merged = Capability(False, "its scales depend on the input")


@pytest.fixture
def fake_methods():
    methods = [register_method(FakeScales()), register_method(UnmergeableScales())]
    yield methods
    for method in methods:
        unregister_method(method.peft_type)
    assert supported_peft_types() == ALL


def _fake_adapter(tmp_path: Path, peft_type: str = "FAKE_SCALES", **changes) -> Path:
    return edit_adapter_config(make_adapter("attn"), tmp_path / peft_type.lower(), peft_type=peft_type, fake_size=4,
                               **changes)


def test_a_registered_method_is_picked_by_adapter_config_parsing(fake_methods, tmp_path):
    from peft_export.source.resolve import load_adapter_source

    fake = fake_methods[0]
    assert supported_peft_types() == (*ALL, "FAKE_SCALES", "UNMERGEABLE_SCALES")
    adapter = load_adapter_source(str(_fake_adapter(tmp_path)), name="x")
    assert adapter.config.method is fake and adapter.config.peft_type == "FAKE_SCALES"
    assert adapter.config.summary() == {"fake_size": 4, "target_modules": adapter.config.raw["target_modules"]}
    with pytest.raises(ConfigError, match=r"'fake_size' must be a positive integer, found 0"):
        check_adapter_config({"peft_type": "FAKE_SCALES", "fake_size": 0}, WHERE)
    with pytest.raises(ConfigError, match=r"^x/adapter_config\.json: 'fake_extra' is set \(1\); peft_export cannot "
                                          r"export it exactly$"):
        check_adapter_config({"peft_type": "FAKE_SCALES", "fake_size": 1, "fake_extra": 1}, WHERE)
    saved = check_adapter_config({"peft_type": "FAKE_SCALES", "fake_size": 1, "modules_to_save": ["x"]}, WHERE)
    refuse_options(saved.raw, WHERE, fake.refused_options, fake.name, switchable=True)  # PEFT-wide: not refused
    with pytest.raises(ConfigError, match=rf"peft_type is 'NOT_A_TUNER'; peft_export supports {', '.join(ALL)}, "
                                          r"FAKE_SCALES, UNMERGEABLE_SCALES adapters only"):
        method_for("NOT_A_TUNER", WHERE)


def test_a_registered_method_brings_its_own_tensor_checks(fake_methods):
    fake = fake_methods[0]
    config = check_adapter_config({"peft_type": "FAKE_SCALES", "fake_size": 1, "target_modules": ["query"]}, WHERE)
    good = {"enc.query.fake_scale": TensorInfo((32,), "float32", True, True)}
    fake.check_tensors(config, WEIGHTS, list(good), good.__getitem__, LAYERS, "TinyModel", lambda: ["enc.query"])
    with pytest.raises(ConfigError, match=r"'enc\.query\.fake_scale' has shape \(16,\), expected \(32,\)"):
        bad = {"enc.query.fake_scale": TensorInfo((16,), "float32", True, True)}
        fake.check_tensors(config, WEIGHTS, list(bad), bad.__getitem__, LAYERS, "TinyModel", lambda: [])
    with pytest.raises(ConfigError, match=r"tensor enc\.key\.fake_scale is missing: target_modules \['query'\] put a "
                                          r"FakeScales on 'enc\.key', but the file has no complete fake_scale set"):
        fake.check_tensors(config, WEIGHTS, list(good), good.__getitem__, LAYERS, "TinyModel",
                           lambda: ["enc.query", "enc.key"])
    with pytest.raises(ConfigError, match=r"tensor 'enc\.query\.lora_A\.weight' is not a FakeScales weight "
                                          r"\(fake_scale\)$"):
        fake.parse_key("enc.query.lora_A.weight", WEIGHTS)


def test_a_merged_only_method_is_refused_for_switchable_with_its_reason(fake_methods, tmp_path, capsys):
    adapter = _fake_adapter(tmp_path)
    found = (f"{adapter / 'adapter_config.json'}: FakeScales adapters (peft_type 'FAKE_SCALES') cannot be exported "
             "switchable: a scale vector has no low-rank branch in the graph. Export this adapter merged instead")
    with pytest.raises(ConfigError) as info:
        export_onnx_model(str(base_model()), tmp_path / "out", adapters=[f"x={adapter}"], switchable=True, log=_quiet)
    assert str(info.value) == f"{found} (export_onnx_model without switchable=True)."
    assert not (tmp_path / "out").exists()
    code = cli_main(["merge-onnx", str(base_model()), "--adapter", f"x={adapter}", "--switchable",
                     "-o", str(tmp_path / "cli")])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"peft-export: error: {found} (merge-onnx without --switchable).")
    assert not (tmp_path / "cli").exists()
    fake_methods[0].check_mergeable(check_adapter_config({"peft_type": "FAKE_SCALES", "fake_size": 1}, WHERE), WHERE)


def test_an_unmergeable_method_is_refused_for_merged_exports_with_its_reason(fake_methods, tmp_path):
    adapter = _fake_adapter(tmp_path, "UNMERGEABLE_SCALES")
    with pytest.raises(ConfigError, match=r"^.*adapter_config\.json: UnmergeableScales adapters \(peft_type "
                                          r"'UNMERGEABLE_SCALES'\) cannot be exported merged: its scales depend on "
                                          r"the input$"):
        export_onnx_model(str(base_model()), tmp_path / "out", adapters=[f"x={adapter}"], log=_quiet)
    assert not (tmp_path / "out").exists()


def test_help_names_the_registered_methods_by_mode(fake_methods, capsys):
    assert method_names() == f"{NAMES}, FakeScales or UnmergeableScales"
    assert method_names("merged") == f"{NAMES} or FakeScales"
    assert method_names("switchable") == "LoRA, AdaLoRA, IA3 or VeRA"
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"Export {NAMES}, FakeScales or UnmergeableScales-adapted" in out
    assert f"merge a {NAMES} or FakeScales adapter into its base" in out
    assert "add a PEFT LoRA, AdaLoRA, IA3 or VeRA adapter to a switchable export" in out
    with pytest.raises(SystemExit):
        cli_main(["merge-onnx", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"PEFT {NAMES}, FakeScales or UnmergeableScales adapter to apply" in out


# ---- layering and single definitions

def test_methods_import_without_torch_and_only_allowed_modules():
    script = ("import sys; import peft_export.methods; "
              "print(sorted(m for m in ('torch', 'peft', 'transformers', 'onnx', 'openvino') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr
    for path in sorted((PACKAGE / "methods").glob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only: torch-side hooks import inside functions
            if isinstance(node, ast.ImportFrom):
                names = ["." * node.level + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                allowed = (name == "..errors" or (name.startswith(".") and not name.startswith(".."))
                           or name.split(".")[0] in sys.stdlib_module_names | {"numpy", "safetensors"})
                assert allowed, f"methods/{path.name} imports {name}"


@pytest.mark.parametrize("name", ["MAX_RANK", "UNUSED_HEADS", "_UNUSED_HEADS", "SUPPORTED_PEFT_TYPES", "_LORA_KEY"])
def test_method_constants_are_defined_once(name):
    pattern = re.compile(rf"^{name}\s*[:=]", re.MULTILINE)
    defined = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text())]
    assert len(defined) <= 1 and all(d.startswith("methods/") for d in defined), defined


@pytest.mark.parametrize("module", ["export/merge.py", "export/switchable_adapters.py", "export/switchable.py",
                                    "export/pipeline.py", "source/adapter_config.py"])
def test_code_outside_the_method_modules_names_no_lora_internals(module):
    """PEFT's LoRA classes, LoRA's config fields and tensor names belong to methods/lora.py (docstrings aside)."""
    tree = ast.parse((PACKAGE / module).read_text())
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    names |= {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
              for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    lora = {"LoraConfig", "LoraLayer", "peft.tuners.lora", "lora_A", "lora_B", "lora_alpha", "r", "use_dora",
            "use_rslora", "scaling", "_LORA_KEY"}
    assert names & lora == set()
