"""Exports and models that benchmarks measure, built once per work folder and reused.

Every builder skips what its folder already holds (a ``peft_export.json`` for an export), so a re-run of a benchmark
reuses them; ``rebuild=True`` writes them again.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

# One PEFT merge written as each of these; the options each variant adds to the export.
VARIANT_OPTIONS = {"onnx-fp32": {}, "onnx-int8": {"quantize": "int8"}, "onnx-fp16": {"dtype": "fp16"},
                   "openvino-fp32": {}, "openvino-int8": {}, "openvino-int8-static": {"quantize": "int8-static"}}
OPENVINO_VARIANTS = ("openvino-fp32", "openvino-int8", "openvino-int8-static")


def _quiet(_msg: str) -> None:
    pass


def is_export(folder: Path) -> bool:
    return (Path(folder) / "peft_export.json").is_file()


def merged_variants(base: str, adapter: str, folder: Path, names: list[str] | tuple[str, ...], rebuild: bool = False,
                    log: Callable[[str], None] = print) -> dict[str, Path]:
    """``adapter`` merged into ``base`` once and written as each variant of ``names`` (keys of VARIANT_OPTIONS) in
    ``folder/<name>``; the folders by name."""
    from ..export.onnx import OnnxFormat
    from ..export.pipeline import ExportOptions, merge_and_reference, write_export

    def options(name: str) -> ExportOptions:
        return ExportOptions(model_id=adapter, output=folder / name, base=base, force=True,
                             **VARIANT_OPTIONS.get(name, {}))

    def export_format(name: str):
        if name.startswith("onnx"):
            return OnnxFormat(options(name))
        from ..export.openvino import OpenVinoFormat

        return OpenVinoFormat("int8" if name == "openvino-int8" else "fp32", options(name))

    todo = [name for name in names if rebuild or not is_export(folder / name)]
    if todo:
        merged = merge_and_reference(options("unused"), log=_quiet)
        for name in todo:
            log(f"exporting {name} ...")
            write_export(merged, options(name), export_format(name), log=_quiet)
    return {name: folder / name for name in names}


def onnx_export(adapter: str, out: Path, base: str | None = None, **options) -> tuple[Path, dict]:
    """`merge-onnx` of ``adapter`` (onto ``base``) at ``out`` unless there already; its folder and manifest (with
    ``bench_export_wall_s`` when it was exported now)."""
    from ..export.api import run_onnx_export
    from ..export.pipeline import ExportOptions
    from ..runtime.config import read_manifest

    out = Path(out)
    if is_export(out):
        return out, read_manifest(out)
    start = time.perf_counter()
    result = run_onnx_export(ExportOptions(model_id=adapter, output=out, base=base, **options), log=_quiet)
    result.manifest["bench_export_wall_s"] = time.perf_counter() - start
    return out, result.manifest


def demo_export(out: Path) -> Path:
    """all-MiniLM-L6-v2 merged with the bundled demo adapter, ONNX, at ``out``."""
    from ..demo import DEMO_ADAPTER_DIR, bundled_base_model_path

    return onnx_export(str(DEMO_ADAPTER_DIR), out, base=str(bundled_base_model_path()), force=True)[0]


def random_lora_adapters(base: str, workdir: Path, configs: dict[str, dict]) -> dict[str, Path]:
    """A PEFT LoRA folder ``workdir/adapter-<name>`` per entry of ``configs`` (LoraConfig arguments) on the Sentence
    Transformers model ``base``, initialised non-zero (torch seed: the entry's position) so it changes the
    embeddings; made once per workdir. The folders by name."""
    from peft import LoraConfig

    return random_adapters(base, workdir, {name: LoraConfig(init_lora_weights=False, **kwargs)
                                           for name, kwargs in configs.items()})


ADAPTER_PARAMETER_TAGS = ("lora_", "ia3_")  # in the names of PEFT's LoRA (DoRA's magnitude too) and IA3 tensors


def random_adapters(base: str, workdir: Path, configs: dict[str, object], noise: float = 0.0) -> dict[str, Path]:
    """A PEFT folder ``workdir/adapter-<name>`` per entry of ``configs`` (a PEFT config each: LoraConfig,
    IA3Config, ...) on the Sentence Transformers model ``base``, made once per workdir (torch seed: the entry's
    position). ``noise``: added (times a standard normal) to every adapter parameter after it is made, for methods
    that start as the identity (IA3's scales start at 1). The folders by name."""
    import torch
    from sentence_transformers import SentenceTransformer

    folders = {}
    for seed, (name, config) in enumerate(configs.items()):
        folder = Path(workdir) / f"adapter-{name}"
        if not folder.exists():
            model = SentenceTransformer(str(base), device="cpu")
            torch.manual_seed(seed)
            model.add_adapter(config)
            if noise:
                with torch.no_grad():
                    for param_name, param in model.named_parameters():
                        if any(tag in param_name for tag in ADAPTER_PARAMETER_TAGS):
                            param.add_(torch.randn_like(param) * noise)
            model.save_pretrained(str(folder))
        folders[name] = folder
    return folders


def switchable_export(base: str, adapters: dict[str, Path], out: Path, **options) -> Path:
    """A switchable ONNX export of ``base`` holding ``adapters`` (name -> PEFT folder) at ``out`` unless there."""
    from .. import export_onnx_model

    if not is_export(out):
        export_onnx_model(str(base), out, switchable=True, force=True, log=_quiet,
                          adapters=[f"{name}={folder}" for name, folder in adapters.items()], **options)
    return Path(out)


def tiny_bert_export(out: Path) -> Path:
    """The tests' tiny BERT Sentence Transformer (hidden 32, 2 layers; :mod:`.tiny_models`), exported to ONNX at
    ``out``: for measuring the pipeline's own memory and overhead on a busy machine. Needs torch."""
    import tempfile

    from .. import export_onnx_model
    from . import tiny_models
    from .texts import FALLBACK_SENTENCES, real_sentences

    root = Path(tempfile.mkdtemp(prefix="bench-tiny-"))
    texts = FALLBACK_SENTENCES + real_sentences(400, seed=1)
    st = tiny_models.build_st_model(tiny_models.build_hf_encoder("bert", root / "hf", texts), root / "st")
    return export_onnx_model(str(st), out, log=_quiet).path


def hand_merged_sequence_classifier(base: str | Path, adapter: str | Path, out: Path) -> Path:
    """What a user does today before sentence-transformers' ONNX / OpenVINO CrossEncoder backends, which take no
    adapters: the base as a transformers sequence-classification model, the PEFT adapter merged into it with
    ``merge_and_unload`` (its trained head, saved in ``modules_to_save``, replacing the base's), saved with its
    tokenizer as a plain transformers folder (which every sentence-transformers version's CrossEncoder reads). Made
    once: an existing ``out`` is reused."""
    out = Path(out)
    if (out / "config.json").is_file():
        return out
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(base))
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tmp = out.with_name(out.name + ".tmp")
    merged.save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(tmp))
    tmp.rename(out)
    return out
