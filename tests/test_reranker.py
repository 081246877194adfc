"""Rerankers (issue 25), first pass: a sentence-transformers CrossEncoder (and one with a LoRA adapter on its
encoder) exported to one ONNX graph on the task seam, opened by ``peft_export.load`` as a ``CrossEncoderModel`` whose
predict()/rank() match eager sentence-transformers + PEFT within 1e-5; task detection; each runtime class refuses the
other task's export."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import peft_export
from fixtures import tiny_models
from peft_export import ConfigError, CrossEncoderModel, EmbeddingModel, InvalidInputError, UnsafeModelError
from peft_export.source.resolve import resolve_model
from peft_export.tasks import EMBEDDING, RERANKER
from peft_export.tasks.reranker import VALIDATION_PAIRS, quality_against, spearman, top_k_overlap

TOLERANCE = 1e-5
QUERY = "How do I reset my password?"
PASSAGES = [
    "Open the settings page, choose Security and click 'Reset password'.",
    "Paris is the capital and most populous city of France.",
    "Hi",
    "Passwords can be reset from the account page; a link is sent to your e-mail address within a minute.",
    " ".join(["A passage far longer than the model's maximum sequence length, truncated with its query."] * 40),
    "The weather is nice today.",
    "Reset",
]


def _pairs(query: str = QUERY, passages=PASSAGES) -> list[tuple[str, str]]:
    return [(query, p) for p in passages]


# ----- task detection (source/) -----
def test_crossencoder_folders_are_detected_as_rerankers(reranker, zoo, tmp_path):
    assert resolve_model(str(reranker["base"])).task is RERANKER
    assert resolve_model(str(reranker["adapter"])).task is RERANKER  # adapter-only folder: its own config
    # A plain transformers model (no Sentence Transformers files): its architecture says so.
    plain = tmp_path / "plain"
    shutil.copytree(reranker["base"], plain)
    for name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"):
        (plain / name).unlink()
    assert json.loads((plain / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]
    assert resolve_model(str(plain)).task is RERANKER
    assert resolve_model(str(zoo.st("mean", "bert"))).task is EMBEDDING


def test_unknown_sentence_transformers_class_is_refused(reranker, tmp_path):
    folder = tmp_path / "odd"
    shutil.copytree(reranker["base"], folder)
    config = json.loads((folder / "config_sentence_transformers.json").read_text())
    (folder / "config_sentence_transformers.json").write_text(json.dumps({**config, "model_type": "SparseEncoder"}))
    with pytest.raises(ConfigError, match=r"model_type 'SparseEncoder' is not a model type peft_export exports "
                                          r"\(CrossEncoder, SentenceTransformer\)"):
        resolve_model(str(folder))


@pytest.mark.parametrize("value", ["abc", True, 1.5, 0, -5])
def test_a_max_seq_length_that_is_no_positive_integer_is_refused_naming_the_file(reranker, tmp_path, value):
    """An adapter-only CrossEncoder folder's own sentence_bert_config.json: a string used to raise a TypeError, and
    True or 1.5 a RuntimeError from the tokenizer deep in the export."""
    folder = tmp_path / "adapter"
    shutil.copytree(reranker["adapter"], folder)
    config = json.loads((folder / "sentence_bert_config.json").read_text())
    (folder / "sentence_bert_config.json").write_text(json.dumps({**config, "max_seq_length": value}))
    with pytest.raises(ConfigError, match=rf"{folder / 'sentence_bert_config.json'}: 'max_seq_length' must be a "
                                          rf"positive integer \(or null for the tokenizer's limit\), found "
                                          rf"{re.escape(repr(value))}$"):
        resolve_model(str(folder))


# ----- the export -----
def test_reranker_export_records_its_task_and_config(reranker):
    folder = reranker["adapter_export"]
    manifest = json.loads((folder / "peft_export.json").read_text())
    assert manifest["task"] == "reranker"
    assert manifest["pipeline"] == {"num_labels": 1, "activation_fn": "sigmoid", "id2label": {"0": "LABEL_0"},
                                     "prompts": {},
                                    "default_prompt_name": None, "dimension": 1, "max_seq_length": 64}
    assert manifest["validation"]["onnx_vs_reference"]["tolerances"] == {"logits": TOLERANCE, "scores": TOLERANCE}
    assert max(manifest["validation"]["onnx_vs_reference"]["max_abs_diff"].values()) <= TOLERANCE
    assert manifest["validation"]["adapter_vs_base_max_abs_diff"] > 1e-3
    config = json.loads((folder / "reranker_config.json").read_text())
    assert config["output_names"] == ["logits", "scores"]
    assert config["task_config"] == {"num_labels": 1, "activation_fn": "sigmoid", "id2label": {"0": "LABEL_0"},
                                     "prompts": {},
                                     "default_prompt_name": None}
    assert "token_type_ids" in config["input_names"]  # BERT: the pair's segments are graph inputs
    assert not (folder / "embedding_config.json").exists()


@pytest.mark.parametrize("which", ["base", "adapter"])
@pytest.mark.parametrize("batch_size", [1, 3, 32])
def test_predict_matches_eager_cross_encoder(reranker, which, batch_size):
    """Scores of the export == eager CrossEncoder (+ PEFT adapter, unmerged) at batch 1 and in mixed-length
    batches, the long passage truncated with its query at max_length."""
    adapter = reranker["adapter"] if which == "adapter" else None
    reference = tiny_models.cross_encoder_reference(reranker["base"], adapter)
    model = peft_export.load(reranker[f"{which}_export"])
    assert isinstance(model, CrossEncoderModel)
    pairs = _pairs() + [tuple(p) for p in VALIDATION_PAIRS]
    want = reference.predict(pairs, batch_size=batch_size)
    got = model.predict(pairs, batch_size=batch_size)
    assert got.shape == want.shape == (len(pairs),)
    assert np.abs(got - want).max() <= TOLERANCE
    logits = model.predict(pairs, batch_size=batch_size, activation_fn="identity")
    import torch

    assert np.abs(logits - reference.predict(pairs, batch_size=batch_size,
                                             activation_fn=torch.nn.Identity())).max() <= TOLERANCE
    assert np.ptp(logits) > 1e-3  # 100x the tolerance: a parity that cannot tell pairs apart would prove nothing


def test_adapter_changes_the_scores(reranker):
    base, adapted = (peft_export.load(reranker[k]) for k in ("base_export", "adapter_export"))
    assert np.abs(base.predict(_pairs()) - adapted.predict(_pairs())).max() > 1e-3


def test_rank_has_sentence_transformers_shape_and_order(reranker):
    reference = tiny_models.cross_encoder_reference(reranker["base"], reranker["adapter"])
    model = CrossEncoderModel(reranker["adapter_export"])
    want = reference.rank(QUERY, PASSAGES, top_k=4, return_documents=True)
    got = model.rank(QUERY, PASSAGES, top_k=4, return_documents=True)
    assert [r["corpus_id"] for r in got] == [r["corpus_id"] for r in want]
    assert [r["text"] for r in got] == [r["text"] for r in want]
    assert all(abs(g["score"] - w["score"]) <= TOLERANCE for g, w in zip(got, want))
    assert set(got[0]) == {"corpus_id", "score", "text"}
    assert set(model.rank(QUERY, PASSAGES)[0]) == {"corpus_id", "score"} and len(model.rank(QUERY, PASSAGES)) == 7


def test_predict_shapes_and_options(reranker):
    model = CrossEncoderModel(reranker["base_export"])
    one = model.predict((QUERY, PASSAGES[0]))
    assert np.ndim(one) == 0
    assert model.predict([]).shape == (0,)
    assert isinstance(model.predict(_pairs(), convert_to_numpy=False), list)
    logits = model.predict(_pairs(), activation_fn=lambda x: x)
    assert np.allclose(1 / (1 + np.exp(-logits)), model.predict(_pairs()), atol=1e-6)
    # Token-budgeted batches give the scores plain batches give.
    assert np.abs(model.predict(_pairs(), max_batch_tokens=64) - model.predict(_pairs(), max_batch_tokens=None)
                  ).max() <= 1e-6


def test_bad_pairs_are_refused_with_their_index(reranker):
    model = CrossEncoderModel(reranker["base_export"])
    with pytest.raises(InvalidInputError, match=r"inputs\[1\] must be a \(query, passage\) pair of two strings"):
        model.predict([("q", "p"), ("only one",)])
    with pytest.raises(InvalidInputError, match=r"documents\[0\] is int, expected str"):
        model.rank("q", [3])
    with pytest.raises(ValueError, match="activation_fn must be a function or one of sigmoid, identity, tanh"):
        model.predict(_pairs(), activation_fn="relu")


# ----- each class refuses the other's export -----
def test_embedding_model_refuses_a_reranker_export(reranker):
    with pytest.raises(ConfigError, match=r"is an export of the 'reranker' task .*EmbeddingModel opens 'embedding' "
                                          r"exports\. Open it with CrossEncoderModel"):
        EmbeddingModel(reranker["base_export"])


def test_cross_encoder_model_refuses_an_embedding_export(bert_case):
    with pytest.raises(ConfigError, match=r"is an export of the 'embedding' task .*CrossEncoderModel opens 'reranker' "
                                          r"exports\. Open it with EmbeddingModel"):
        CrossEncoderModel(bert_case.export)


def test_embedding_export_records_no_task(bert_case):
    """Embedding manifests stay as they were before tasks: no "task" key."""
    assert "task" not in json.loads((Path(bert_case.export) / "peft_export.json").read_text())
    assert "task_config" not in json.loads((Path(bert_case.export) / "embedding_config.json").read_text())


# ----- the gate's figures -----
def test_quality_figures_measure_score_and_ranking_agreement():
    ref = np.array([0.9, 0.1, 0.5, 0.3, 0.7])
    assert quality_against(ref, ref) == {"max_score_diff": 0.0, "mean_score_diff": 0.0, "spearman": 1.0,
                                         "top10_overlap": 1.0, "pairs": 5}
    assert spearman(ref, -ref) == pytest.approx(-1.0)
    assert top_k_overlap(ref, np.array([0.1, 0.9, 0.5, 0.3, 0.7]), k=2) == 0.5
    figures = quality_against(ref, ref + np.array([0.0, 0.0, 0.3, 0.0, 0.0]))
    assert figures["max_score_diff"] == pytest.approx(0.3) and figures["spearman"] < 1.0


# ----- OpenVINO, and the modes not built yet -----
@pytest.mark.slow
def test_openvino_export_matches_eager_cross_encoder_with_adapter(reranker, tmp_path):
    pytest.importorskip("openvino")
    from peft_export import export_openvino_model

    out = export_openvino_model(str(reranker["adapter"]), tmp_path / "ov", log=lambda msg: None).path
    manifest = json.loads((out / "peft_export.json").read_text())
    assert manifest["task"] == "reranker" and manifest["export"]["format"] == "openvino"
    model = peft_export.load(out)
    assert isinstance(model, CrossEncoderModel) and model.backend.name == "openvino"
    reference = tiny_models.cross_encoder_reference(reranker["base"], reranker["adapter"])
    pairs = _pairs() + [tuple(p) for p in VALIDATION_PAIRS]
    for batch_size in (1, 32):
        assert np.abs(model.predict(pairs, batch_size=batch_size) - reference.predict(pairs, batch_size=batch_size)
                      ).max() <= TOLERANCE


@pytest.mark.parametrize(("options", "how"), [
    ({"quantize": "int8"}, r"quantize='int8': lossy exports"),
    ({"switchable": True, "adapters": ["a=ADAPTER"]}, r"switchable=True: switchable exports"),
])
def test_a_mode_a_task_lacks_is_refused_before_any_work(reranker, tmp_path, monkeypatch, options, how):
    """Rerankers have every mode now; a task registered without one is refused before any slow stage."""
    from dataclasses import replace

    from peft_export import export_onnx_model
    from peft_export.tasks import RERANKER, TASKS

    monkeypatch.setitem(TASKS, "reranker", replace(RERANKER, export_modes=frozenset({"merged"})))
    options = {k: [a.replace("ADAPTER", str(reranker["adapter"])) for a in v] if k == "adapters" else v
               for k, v in options.items()}
    model = reranker["base"] if "adapters" in options else reranker["adapter"]
    with pytest.raises(ConfigError, match=how + r" of CrossEncoder models \(reranker task\) are not supported yet; "
                                               r"this version exports them merged only"):
        export_onnx_model(str(model), tmp_path / "out", log=lambda msg: None, **options)
    assert not (tmp_path / "out").exists()


# ----- CLI -----
def test_cli_rerank_prints_the_ranking_of_rank(reranker, capsys):
    from peft_export.cli import main

    folder = reranker["adapter_export"]
    assert main(["rerank", str(folder), QUERY, *PASSAGES, "--json", "--top-k", "3"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == CrossEncoderModel(folder).rank(QUERY, PASSAGES, top_k=3, return_documents=True)
    assert main(["rerank", str(folder), QUERY, *PASSAGES[:2]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(line.split()[1] in ("[0]", "[1]") for line in lines)


def test_cli_rerank_of_an_embedding_export_is_one_line_exit_2(bert_case, capsys):
    from peft_export.cli import main

    assert main(["rerank", str(bert_case.export), QUERY, "a passage"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "CrossEncoderModel opens 'reranker' exports. Open it with EmbeddingModel" in err


def test_cli_info_shows_the_task(reranker, bert_case, capsys):
    from peft_export.cli import main

    assert main(["info", str(reranker["adapter_export"])]) == 0
    out = capsys.readouterr().out
    assert "task:        reranker (CrossEncoder)" in out
    assert "pipeline:    num_labels=1 activation_fn=sigmoid max_seq_length=64" in out
    assert "labels:      LABEL_0\n" in out
    assert "validation:  max abs diff vs PyTorch: logits" in out
    assert main(["info", str(bert_case.export)]) == 0
    assert "task:        embedding (SentenceTransformer)" in capsys.readouterr().out


# ----- a plain transformers sequence-classification model with a PEFT adapter -----
def test_plain_sequence_classification_model_with_peft_adapter(reranker, tmp_path):
    """No Sentence Transformers files: the architecture makes it a reranker; the export's logits equal transformers +
    PEFT (unmerged) and its scores the sigmoid of them (sentence-transformers' default for one label)."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from peft_export import export_onnx_model

    plain = tmp_path / "plain"
    shutil.copytree(reranker["base"], plain)
    for name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json", "README.md"):
        (plain / name).unlink(missing_ok=True)
    torch.manual_seed(3)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False)
    peft_model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(str(plain)), lora)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    out = export_onnx_model(str(tmp_path / "adapter"), tmp_path / "onnx", base=str(plain), log=lambda msg: None).path
    model = peft_export.load(out)
    assert isinstance(model, CrossEncoderModel) and model.activation_fn == "sigmoid"

    reference = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(str(plain)),
                                          str(tmp_path / "adapter")).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(plain))
    pairs = _pairs()
    features = tokenizer([q for q, _ in pairs], [p for _, p in pairs], padding=True, truncation=True, max_length=64,
                         return_tensors="pt")
    with torch.no_grad():
        want = reference(**features).logits[:, 0].numpy()
    assert np.abs(model.predict(pairs, activation_fn="identity") - want).max() <= TOLERANCE
    assert np.abs(model.predict(pairs) - 1 / (1 + np.exp(-want))).max() <= TOLERANCE


def test_one_long_passage_does_not_pad_the_short_ones(reranker, monkeypatch):
    """Pairs are batched by tokens (longest first, under the token budget): the long pair runs alone at its
    length, the short ones together at theirs."""
    model = CrossEncoderModel(reranker["base_export"])
    widths = []
    run = model.backend.run

    def recording_run(feeds, outputs, adapter=None):
        widths.append(feeds["input_ids"].shape)
        return run(feeds, outputs, adapter=adapter)

    monkeypatch.setattr(model.backend, "run", recording_run)
    pairs = [(QUERY, PASSAGES[4])] + [(QUERY, "short passage")] * 20
    scores = model.predict(pairs, batch_size=32)
    assert widths[0] == (1, 64) and all(width[1] < 20 for width in widths[1:])
    assert sum(width[0] for width in widths) == len(pairs)
    assert np.abs(scores[1:] - scores[1]).max() <= 1e-6  # equal pairs, equal scores, wherever they were batched


def test_seq_cls_adapter_saved_by_cross_encoder_exports(reranker, zoo, tmp_path):
    """sentence-transformers 6.3 saves CrossEncoder.add_adapter(LoraConfig(task_type="SEQ_CLS")) without the head
    and with modules_to_save None: exported (ONNX and OpenVINO) as eager CrossEncoder.load_adapter runs it, the
    base head kept (it was a raw KeyError from PEFT's SEQ_CLS wrapper)."""
    from peft_export import export_onnx_model, export_openvino_model

    adapter = tiny_models.add_cross_encoder_adapter(reranker["base"], tmp_path / "seq-cls", task_type="SEQ_CLS",
                                                    target_modules=("query", "value"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] is None  # no head in the file
    reference = tiny_models.cross_encoder_reference(reranker["base"], adapter)  # keeps the base head
    for export in (export_onnx_model, export_openvino_model):
        out = export(str(adapter), tmp_path / export.__name__, log=lambda msg: None).path
        got = peft_export.load(out).predict(_pairs())
        assert np.abs(got - reference.predict(_pairs())).max() <= TOLERANCE
        assert np.abs(got - peft_export.load(reranker["base_export"]).predict(_pairs())).max() > 1e-3


def test_an_adapter_that_changes_nothing_is_refused_naming_the_logits(reranker, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from peft_export import export_onnx_model

    noop = tmp_path / "noop"
    shutil.copytree(reranker["adapter"], noop)
    tensors = load_file(str(noop / "adapter_model.safetensors"))
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()},
              str(noop / "adapter_model.safetensors"))
    with pytest.raises(ConfigError, match=r"Adapter 'default' changes the logits by at most 0 \(< 0.0001\): it does "
                                          r"nothing \(LoRA B still zero\?\)"):
        export_onnx_model(str(noop), tmp_path / "out", log=lambda msg: None)


def test_a_reranker_adapter_on_an_embedding_base_is_refused_not_given_a_random_head(reranker, zoo, tmp_path):
    """A CrossEncoder adapter with an embedding model of the same encoder as its base: its LoRA keys fit, and the
    export used to succeed with the classifier transformers initialises at random (two labels, scores of noise)."""
    embedder = zoo.st("mean", "bert")
    with pytest.raises(ConfigError, match=rf"{re.escape(str(embedder))} has no weights for classifier\.bias, "
                                          r"classifier\.weight, which BertForSequenceClassification needs for the "
                                          r"reranker task \(CrossEncoder\); transformers would initialise them at "
                                          r"random"):
        peft_export.export_onnx_model(str(reranker["adapter"]), tmp_path / "out", base=str(embedder),
                                      log=lambda msg: None)
    assert not (tmp_path / "out").exists()


def test_a_config_with_another_number_of_labels_than_the_head_is_refused_naming_it(reranker, tmp_path):
    """config.json's id2label giving 3 labels to a head saved with 1: transformers' bare RuntimeError ("You set
    `ignore_mismatched_sizes` to `False`"), naming neither the file nor the parameter, used to end the export."""
    folder = tmp_path / "three-labels"
    shutil.copytree(reranker["base"], folder)
    config = json.loads((folder / "config.json").read_text())
    labels = {"0": "a", "1": "b", "2": "c"}
    (folder / "config.json").write_text(json.dumps({**config, "id2label": labels,
                                                    "label2id": {v: int(k) for k, v in labels.items()}}))
    with pytest.raises(ConfigError, match=rf"{re.escape(str(folder))}: the weights hold classifier\.bias with shape "
                                          r"\(1,\), but config\.json makes it \(3,\) \(for a classification head: "
                                          r"num_labels / id2label\)"):
        peft_export.export_onnx_model(str(folder), tmp_path / "out", log=lambda msg: None)
    assert not (tmp_path / "out").exists()


def _with_activation_in_config_json(reranker, folder: Path, layout: str, path: str) -> Path:
    """The tiny CrossEncoder with its activation_fn saved only in config.json, as sentence-transformers 4-5 ("v4")
    or earlier versions ("legacy": a plain transformers folder) saved it."""
    shutil.copytree(reranker["base"], folder)
    config = json.loads((folder / "config.json").read_text())
    if layout == "v4":
        st_config = json.loads((folder / "config_sentence_transformers.json").read_text())
        del st_config["activation_fn"]
        (folder / "config_sentence_transformers.json").write_text(json.dumps(st_config))
        config["sentence_transformers"] = {"activation_fn": path}
    else:
        for name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"):
            (folder / name).unlink()
        config["sbert_ce_default_activation_function"] = path
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("layout", ["v4", "legacy"])
def test_an_activation_saved_in_config_json_is_the_one_exported(reranker, tmp_path, layout):
    """sentence-transformers reads a CrossEncoder's activation_fn from config.json where
    config_sentence_transformers.json has none; the export applied the default (sigmoid) instead, so its scores
    differed from CrossEncoder.predict's (0.91 for 2.34), and the parity check, run on the same module, agreed."""
    folder = _with_activation_in_config_json(reranker, tmp_path / layout, layout, "torch.nn.modules.linear.Identity")
    out = peft_export.export_onnx_model(str(folder), tmp_path / "out", log=lambda msg: None).path
    assert json.loads((out / "reranker_config.json").read_text())["task_config"]["activation_fn"] == "identity"
    pairs = _pairs()
    eager = tiny_models.cross_encoder_reference(folder).predict(pairs)
    assert np.abs(eager).max() > 1.0  # raw logits: no sigmoid applied
    assert np.abs(CrossEncoderModel(out).predict(pairs) - eager).max() <= 1e-5


@pytest.mark.parametrize("layout", ["st", "v4", "legacy"])
def test_an_activation_that_is_no_torch_activation_is_refused_without_import(reranker, tmp_path, layout):
    """RELIABILITY 10: an activation_fn naming any other import path is refused, naming the file, and never
    imported (sentence-transformers imports it under trust_remote_code)."""
    path = "peft_export_attack_module.Activation"
    if layout == "st":
        folder = tmp_path / "st"
        shutil.copytree(reranker["base"], folder)
        config = json.loads((folder / "config_sentence_transformers.json").read_text())
        (folder / "config_sentence_transformers.json").write_text(json.dumps({**config, "activation_fn": path}))
        where = re.escape(str(folder / "config_sentence_transformers.json"))
    else:
        folder = _with_activation_in_config_json(reranker, tmp_path / layout, layout, path)
        key = "sentence_transformers.activation_fn" if layout == "v4" else "sbert_ce_default_activation_function"
        where = re.escape(f"{folder / 'config.json'} ({key})")
    with pytest.raises(UnsafeModelError, match=rf"{where}: activation_fn '{path}' is not one of the torch "
                                               r"activations peft_export exports"):
        peft_export.export_onnx_model(str(folder), tmp_path / "out", log=lambda msg: None)
    assert "peft_export_attack_module" not in sys.modules and not (tmp_path / "out").exists()


def test_a_three_label_cross_encoder_exports_its_logits_and_softmax(zoo, tmp_path):
    """A CrossEncoder with several labels (an NLI-style head): identity by default, as sentence-transformers does,
    and ``apply_softmax`` a softmax over the labels; each equal to eager CrossEncoder + PEFT within 1e-5."""
    from peft_export import export_onnx_model

    base = tiny_models.build_cross_encoder(zoo.hf("bert"), tmp_path / "ce3", num_labels=3)
    adapter = tiny_models.add_cross_encoder_adapter(base, tmp_path / "ce3-lora", target_modules=("query", "value"))
    out = export_onnx_model(str(adapter), tmp_path / "onnx", log=lambda msg: None).path
    model = peft_export.load(out)
    assert model.num_labels == 3 and model.activation_fn == "identity"
    reference = tiny_models.cross_encoder_reference(base, adapter)
    pairs = _pairs()
    for options in ({}, {"apply_softmax": True}):
        got, want = model.predict(pairs, **options), reference.predict(pairs, **options)
        assert got.shape == (len(pairs), 3) and np.abs(got - want).max() <= TOLERANCE
    np.testing.assert_allclose(model.predict(pairs, apply_softmax=True).sum(axis=1), 1.0, atol=1e-6)


def test_cli_export_of_a_reranker_says_how_to_try_it_with_rerank(reranker, tmp_path, capsys):
    from peft_export.cli import main

    assert main(["merge-onnx", str(reranker["adapter"]), "-o", str(tmp_path / "out")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"try it: peft-export rerank {tmp_path / 'out'} ") and "encode" not in last


@pytest.mark.parametrize("case", ["bert_case", "roberta_case"])
def test_pairs_with_both_texts_cut_are_built_without_tokenizers_overflow(case, request):
    """Two long texts in one pair: tokenizers' own pair truncation builds every combination of the two sides'
    cut-off parts (overflowing encodings, quadratic: 410 MB for two 8,000-character sides without word boundaries
    on a byte-level BPE tokenizer, far more at the 100,000-character input cap). The runtime keeps tokenizers'
    longest_first tokens (half each; the longer side, or the second on a tie, the odd one) without building them:
    the same ids and type ids as tokenizers on pairs of every kind, and no overflowing parts."""
    tokenizer = request.getfixturevalue(case).embedding_model()._tokenizer
    words = ["password", "reset", "é", "中文", "😀", "don't", "1234", "aaaaaaaaaaaa"]
    rng = np.random.default_rng(0)

    def text(n: int) -> str:
        return " ".join(rng.choice(words, n))

    long_pairs = [(text(300), text(300)), (text(250), text(300)), (text(300), text(250))]
    pairs = long_pairs + [("a" * 1500, "b" * 1500), ("a" * 1400, "b" * 1500), ("x" * 1500, "y" * 1400)]
    pairs += [(text(int(rng.integers(0, 160))), text(int(rng.integers(0, 160)))) for _ in range(200)]
    got = tokenizer.tokenize_pairs(pairs)
    want = tokenizer.tokenizer.encode_batch(pairs)
    assert [e.ids for e in got] == [e.ids for e in want]
    assert [e.type_ids for e in got] == [e.type_ids for e in want]
    assert sum(len(getattr(e, "overflowing", [])) for e in got[:len(long_pairs)]) == 0
    assert all(len(e.ids) == tokenizer.max_seq_length for e in got[:len(long_pairs)])
