"""The PEFT method x export-mode parity table: every method peft_export exports, as an adapter on the tiny BERT of
peft_export.bench.tiny_models (attention query/value, or the layer norms for LN tuning; every trained tensor moved off
its initial value), exported in the four modes and compared with sentence-transformers whose encoder PEFT loaded the
adapter into (``PeftModel.from_pretrained``; for a stack, both adapters loaded and both active).

Each cell is the max difference of normalised sentence embeddings over real texts (one over max_seq_length tokens) in
mixed batches; "no" where the mode refuses the method (the reason is printed above the table).

    python scripts/method_table.py [--methods lora dora ia3] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import tempfile
import warnings
from pathlib import Path

from peft_export.bench import texts, tiny_models

MODES = ("merged-onnx", "switchable-onnx", "merged-openvino", "switchable-openvino")
QV = ["query", "value"]


def method_configs() -> dict[str, list]:
    """name -> the PEFT configs of its adapters (two for a stack), the same shapes as tests/test_methods_merged.py."""
    import peft

    return {
        "lora": [peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights=False)],
        "rslora": [peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, use_rslora=True, init_lora_weights=False)],
        "dora": [peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, use_dora=True, init_lora_weights=False)],
        "lora + modules_to_save": [peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights=False,
                                                   modules_to_save=["encoder.layer.1.output.dense"])],
        "lora + lora (stacked)": [peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV, init_lora_weights=False),
                                  peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "key"],
                                                  init_lora_weights=False)],
        "adalora": [peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8, target_modules=QV, total_step=10,
                                       init_lora_weights=False)],
        "ia3": [peft.IA3Config(target_modules=["query", "value", "output.dense"], feedforward_modules=["output.dense"],
                               init_ia3_weights=False)],
        "loha": [peft.LoHaConfig(r=4, alpha=8, target_modules=QV, init_weights=False)],
        "lokr": [peft.LoKrConfig(r=2, alpha=8, target_modules=QV, init_weights=False, decompose_both=True,
                                 decompose_factor=4)],
        "oft": [peft.OFTConfig(r=0, oft_block_size=8, target_modules=QV, init_weights=False)],
        "boft": [peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=QV, init_weights=False)],
        "vera": [peft.VeraConfig(r=4, target_modules=QV, init_weights=False)],
        "fourierft": [peft.FourierFTConfig(n_frequency=10, target_modules=QV, init_weights=False)],
        "hra": [peft.HRAConfig(r=4, target_modules=QV, init_weights=False)],
        "miss": [peft.MissConfig(r=4, target_modules=QV)],
        "c3a": [peft.C3AConfig(block_size=8, target_modules=QV)],
        "randlora": [peft.RandLoraConfig(r=4, randlora_alpha=8, target_modules=QV)],
        "shira": [peft.ShiraConfig(r=2, target_modules=QV)],
        "delora": [peft.DeloraConfig(r=4, target_modules=QV)],
        "gralora": [peft.GraloraConfig(r=4, gralora_k=2, hybrid_r=2, alpha=8, target_modules=QV)],
        "vblora": [peft.VBLoRAConfig(r=4, num_vectors=16, vector_length=8, init_vector_bank_bound=0.5,
                                     target_modules=QV)],
        "road": [peft.RoadConfig(variant="road_2", group_size=8, target_modules=QV)],
        "waveft": [peft.WaveFTConfig(n_frequency=20, target_modules=QV)],
        "ln_tuning": [peft.LNTuningConfig(target_modules=["LayerNorm"])],
        "beft": [peft.BeftConfig(target_modules=QV)],
        "deft": [peft.DeftConfig(r=4, target_modules=QV)],
        "hira": [peft.HiraConfig(r=4, target_modules=QV)],
        "pvera": [peft.PveraConfig(r=4, target_modules=QV)],
        "trainable tokens": [peft.TrainableTokensConfig(target_modules=["word_embeddings"],
                                                        token_indices=[1, 2, 3])],
        "peanut": [peft.PeanutConfig(r=8, depth=1, target_modules=QV)],
        "supertuning": [peft.SupertuningConfig(sparsity=0.9, r=2, target_modules=QV)],
        "tinylora": [peft.TinyLoraConfig(r=2, u=4, weight_tying=0.5, target_modules=QV)],
        "osf": [peft.OSFConfig(target_modules=QV)],
        "adamss": [peft.AdamssConfig(r=16, num_subspaces=3, subspace_rank=2, target_modules=QV)],
        "frod": [peft.FrodConfig(sparse_rate=0.05, target_modules=QV)],
        "glora": [peft.GloraConfig(r=4, target_modules=QV)],
        "psoft": [peft.PsoftConfig(r=4, psoft_alpha=8, target_modules=QV)],
        "unilora": [peft.UniLoraConfig(r=4, theta_d_length=64, target_modules=QV)],
    }


# RoAd's angles, HiRA's element-wise factor, PVeRA's scales, PEANuT's small B, TinyLoRA's and UniLoRA's few
# values, PSOFT's rotation: a nudge of 0.05 barely moves the embeddings
NUDGE = {"road": 0.5, "hira": 0.5, "pvera": 0.5, "peanut": 0.5, "tinylora": 0.5, "unilora": 0.5,
         "psoft": 0.5}


def make_adapter(st_folder: Path, folder: Path, config, name: str, seed: int) -> Path:
    """A PEFT adapter over the Sentence Transformer's encoder, every trained tensor moved off its initial value."""
    import torch
    from peft import get_peft_model
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(str(st_folder), device="cpu")[0].auto_model
    torch.manual_seed(seed)
    model = get_peft_model(encoder, config)
    with torch.no_grad():
        for param in (p for p in model.parameters() if p.requires_grad):
            param.add_(NUDGE.get(name, 0.05) * torch.randn_like(param))
    model.save_pretrained(str(folder))
    return folder


def eager_peft(st_folder: Path, adapters: list[Path]):
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(st_folder), device="cpu")
    names = [f"a{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(model[0].auto_model, str(adapters[0]), adapter_name=names[0])
    for name, folder in zip(names[1:], adapters[1:]):
        peft_model.load_adapter(str(folder), adapter_name=name)
    peft_model.base_model.set_adapter(names)
    model[0].auto_model = peft_model
    return model.eval()


def export(mode: str, st_folder: Path, adapters: list[Path], out: Path) -> tuple[Path, object]:
    """The export of ``adapters`` in ``mode``, and what the runtime's encode takes as ``adapter``."""
    from peft_export import export_onnx_model, export_openvino_model

    exporter = export_onnx_model if mode.endswith("onnx") else export_openvino_model
    names = [f"a{i}" for i in range(len(adapters))]
    specs = [f"{n}={a}" for n, a in zip(names, adapters)]
    if mode.startswith("switchable"):
        exporter(str(st_folder), out, adapters=specs, switchable=True, log=lambda _: None)
        return out, names if len(names) > 1 else names[0]
    exporter(str(st_folder), out, adapters=specs, stack_adapters=len(specs) > 1, log=lambda _: None)
    return out, None


def measure(name: str, configs: list, st_folder: Path, root: Path, sample: list[str]) -> dict[str, object]:
    from peft_export import ConfigError, EmbeddingModel

    adapters = [make_adapter(st_folder, root / f"adapter{i}", c, name, seed=7 + i) for i, c in enumerate(configs)]
    reference = eager_peft(st_folder, adapters).encode(sample, batch_size=8)
    row: dict[str, object] = {}
    for mode in MODES:
        try:
            out, adapter = export(mode, st_folder, adapters, root / mode)
        except ConfigError as err:
            row[mode] = "no"
            print(f"{name:22s} {mode:20s} refused: {str(err)[:160]}", flush=True)
            continue
        got = EmbeddingModel(out).encode(sample, batch_size=8, adapter=adapter)
        row[mode] = max_unit_diff(got, reference)
        print(f"{name:22s} {mode:20s} {row[mode]:.1e}", flush=True)
    return row


def max_unit_diff(a, b) -> float:
    import numpy as np

    a, b = (np.asarray(x, np.float64) for x in (a, b))
    a, b = (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12) for x in (a, b))
    return float(np.abs(a - b).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", help="names from the table (default: all)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    configs = method_configs()
    unknown = sorted(set(args.methods or []) - set(configs))
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; choose from {', '.join(configs)}")
    sample = texts.real_sentences(14, seed=0) + [" ".join(texts.FALLBACK_SENTENCES[:12]), "ok"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="method-table-") as tmp:
        hf = tiny_models.build_hf_encoder("bert", Path(tmp) / "hf", texts.FALLBACK_SENTENCES)
        st_folder = tiny_models.build_st_model(hf, Path(tmp) / "st")
        for name in args.methods or configs:
            folder = Path(tmp) / name.replace(" ", "").replace("(", "").replace(")", "").replace("+", "_")
            results[name] = measure(name, configs[name], st_folder, folder, sample)
    print("\n| method | " + " | ".join(MODES) + " |")
    print("|---" * (len(MODES) + 1) + "|")
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(v if isinstance(v, str) else f"{v:.1e}" for v in row.values()) + " |")
    worst = max((v for row in results.values() for v in row.values() if not isinstance(v, str)), default=0.0)
    print(f"\nworst {worst:.2e} (limit 1e-5); python {platform.python_version()}, {platform.machine()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if worst < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
