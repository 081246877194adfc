"""Prompts of a reranker, as sentence-transformers' CrossEncoder applies them: ``predict``/``rank`` take
``prompt_name`` (one of the model's ``prompts``) or ``prompt`` (a literal text; "" for none), and without either the
``default_prompt_name``'s prompt applies. Without a chat template the prompt goes before the query; with one (the
Qwen3 rerankers) it is the system message's content, substituted into the template the export recorded.

Parity against eager ``CrossEncoder.predict(prompt_name=..., prompt=...)`` within 1e-5, for a BERT reranker with two
prompts and for the Qwen3 chat-template reranker with two prompts; errors; exports made before prompts were recorded
(task_config with only ``query_prompt`` or ``pair_template``) load and score as they did.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil

import numpy as np
import pytest

from fixtures.export_edits import with_task_config as _edited
from peft_export import ConfigError, CrossEncoderModel
from peft_export.tasks.reranker import VALIDATION_PAIRS

TOLERANCE = 1e-5
QUERY = "How do I reset my password?"
PASSAGES = ["Open the settings page, choose Security and click 'Reset password'.",
            "Paris is the capital and most populous city of France.", "Hi",
            " ".join(["A passage far longer than the model's maximum sequence length."] * 40), ""]
PAIRS = [(QUERY, p) for p in PASSAGES] + [tuple(p) for p in VALIDATION_PAIRS]
BERT_PROMPTS = {"web": "Find the passage that answers: ", "code": "Which snippet solves this? "}
QWEN3_WEB = "Given a web search query, retrieve the page that answers it"
OLD_DROP = ("prompts", "default_prompt_name")  # what an export made before prompts were recorded lacks
LITERAL = "Rank passages about account security for: "


def _quiet(msg: str) -> None:
    pass


# ----- resolution and errors (the tiny BERT reranker's export, prompts set in its config) -----
@pytest.fixture
def prompted(reranker, tmp_path) -> CrossEncoderModel:
    return CrossEncoderModel(_edited(reranker["adapter_export"], tmp_path / "prompted", prompts=BERT_PROMPTS,
                                     default_prompt_name="web", query_prompt=BERT_PROMPTS["web"]))


def test_prompt_name_prompt_and_default_apply_before_the_query(prompted):
    default = prompted.predict(PAIRS)
    by_name = prompted.predict(PAIRS, prompt_name="web")
    literal = prompted.predict(PAIRS, prompt=BERT_PROMPTS["web"])
    assert np.array_equal(default, by_name) and np.array_equal(default, literal)
    code = prompted.predict(PAIRS, prompt_name="code")
    none = prompted.predict(PAIRS, prompt="")
    assert np.abs(code - default).max() > 1e-4 and np.abs(none - default).max() > 1e-4
    ids = prompted._tokenizer.encode_pairs([("capital", "Paris")], BERT_PROMPTS["code"])["input_ids"][0].tolist()
    want = prompted._tokenizer.tokenizer.encode(BERT_PROMPTS["code"] + "capital", "Paris").ids
    assert ids == want
    assert prompted.prompts == BERT_PROMPTS and prompted.default_prompt_name == "web"
    ranked = prompted.rank(QUERY, PASSAGES, prompt_name="code")
    assert [r["score"] for r in ranked] == sorted(code[:len(PASSAGES)].tolist(), reverse=True)


def test_an_unknown_prompt_name_is_refused_naming_the_known_ones(prompted, reranker):
    with pytest.raises(ConfigError, match=r"Prompt name 'nope' not found: the model's prompts are \['web', 'code'\]"):
        prompted.predict(PAIRS, prompt_name="nope")
    with pytest.raises(ConfigError, match=r"Prompt name 'nope' not found: the model has no prompts"):
        CrossEncoderModel(reranker["adapter_export"]).rank(QUERY, PASSAGES, prompt_name="nope")


def test_prompt_and_prompt_name_together_warn_and_the_prompt_wins(prompted, caplog):
    """sentence-transformers' rule: a warning, and ``prompt`` is applied."""
    with caplog.at_level(logging.WARNING, logger="peft_export.runtime.pair_prompts"):
        both = prompted.predict(PAIRS, prompt_name="web", prompt=BERT_PROMPTS["code"])
    assert "Provide either a `prompt`, a `prompt_name`, or neither, but not both" in caplog.text
    assert np.array_equal(both, prompted.predict(PAIRS, prompt_name="code"))


def test_malformed_prompts_are_refused_at_load(reranker, tmp_path):
    with pytest.raises(ConfigError, match=r"task_config.prompts must map prompt names to strings, found \{'web': 3\}"):
        CrossEncoderModel(_edited(reranker["adapter_export"], tmp_path / "bad", prompts={"web": 3}))


def test_an_export_without_recorded_prompts_scores_as_before(prompted, reranker, tmp_path):
    """An export made before prompts were recorded (task_config holds query_prompt only) applies its default prompt
    as it did, takes literal prompts, and says why it knows no prompt names."""
    old = CrossEncoderModel(_edited(reranker["adapter_export"], tmp_path / "old", drop=OLD_DROP,
                                    query_prompt=BERT_PROMPTS["web"]))
    assert np.array_equal(old.predict(PAIRS), prompted.predict(PAIRS))
    assert np.array_equal(old.predict(PAIRS, prompt=""), prompted.predict(PAIRS, prompt=""))
    with pytest.raises(ConfigError, match=r"this export records no prompts \(made before peft_export recorded "
                                          r"them\); export it again"):
        old.predict(PAIRS, prompt_name="web")


def test_an_old_chat_template_export_applies_its_default_prompt_only(reranker, tmp_path):
    template = {"prefix": "Query: ", "middle": " Passage: ", "suffix": " end", "suffix_ids": [7, 8]}
    old = CrossEncoderModel(_edited(reranker["adapter_export"], tmp_path / "old", drop=OLD_DROP,
                                    pair_template=template))
    plain = old._tokenizer.tokenizer.encode("Query: capital Passage: Paris end", add_special_tokens=False).ids
    assert old._tokenizer.tokenize_pairs([("capital", "Paris")])[0].ids == plain
    with pytest.raises(ConfigError, match=r"cannot apply the prompt 'Judge: ': it applies only its default prompt, "
                                          r"because it was made before peft_export recorded prompts; export it again"):
        old.predict(PAIRS, prompt="Judge: ")


def test_rerank_cli_takes_a_prompt_name_or_a_prompt(prompted, capsys):
    from peft_export.cli import main

    folder = str(prompted.path)
    assert main(["rerank", folder, QUERY, *PASSAGES[:3], "--prompt-name", "code", "--json"]) == 0
    by_name = json.loads(capsys.readouterr().out)
    assert main(["rerank", folder, QUERY, *PASSAGES[:3], "--prompt", BERT_PROMPTS["code"], "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == by_name
    want = prompted.rank(QUERY, PASSAGES[:3], prompt_name="code")
    assert [(r["corpus_id"], round(r["score"], 6)) for r in by_name] == [
        (r["corpus_id"], round(r["score"], 6)) for r in want]
    assert main(["rerank", folder, QUERY, "a", "--prompt-name", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"peft-export: error: --prompt-name 'nope' is not a prompt of {folder}: choose one of web, code"
    with pytest.raises(SystemExit) as exit_info:
        main(["rerank", folder, QUERY, "a", "--prompt-name", "web", "--prompt", "x"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["info", folder]) == 0
    assert "prompts:     web (default), code" in capsys.readouterr().out.splitlines()


# ----- parity with eager CrossEncoder: a BERT reranker saved with prompts -----
@pytest.mark.slow
def test_bert_reranker_prompts_equal_eager_cross_encoder(reranker, tmp_path):
    from fixtures.tiny_models import add_cross_encoder_adapter, cross_encoder_reference

    from peft_export import export_onnx_model

    base = shutil.copytree(reranker["base"], tmp_path / "prompted")
    st_config = json.loads((base / "config_sentence_transformers.json").read_text())
    st_config.update(prompts=BERT_PROMPTS, default_prompt_name="web")
    (base / "config_sentence_transformers.json").write_text(json.dumps(st_config))
    adapter = add_cross_encoder_adapter(base, tmp_path / "adapter", target_modules=("query", "value", "dense"))
    out = export_onnx_model(str(adapter), tmp_path / "onnx", log=_quiet).path
    settings = json.loads((out / "reranker_config.json").read_text())["task_config"]
    assert settings["prompts"] == BERT_PROMPTS and settings["default_prompt_name"] == "web"
    model, reference = CrossEncoderModel(out), cross_encoder_reference(base, adapter)
    _assert_parity(model, reference)


def _assert_parity(model: CrossEncoderModel, reference) -> None:
    """Default, each prompt by name, a literal prompt and no prompt: within 1e-5 of eager, at batch 1 and 32, and
    the prompts give different scores (a parity that could not tell them apart would prove nothing)."""
    calls = [{}] + [{"prompt_name": name} for name in reference.prompts] + [{"prompt": LITERAL}, {"prompt": ""}]
    seen = []
    for kwargs in calls:
        for batch_size in (1, 32):
            got = model.predict(PAIRS, batch_size=batch_size, **kwargs)
            want = reference.predict(PAIRS, batch_size=batch_size, **kwargs)
            diff = float(np.abs(got - want).max())
            print(f"\n[reranker prompts] {kwargs or 'default'} batch {batch_size}: max diff {diff:.2e}")
            assert diff <= TOLERANCE, (kwargs, batch_size, diff)
        seen.append(got)
        ranked = model.rank(QUERY, PASSAGES, top_k=3, **kwargs)
        eager = reference.rank(QUERY, PASSAGES, top_k=3, **kwargs)
        assert [r["corpus_id"] for r in ranked] == [r["corpus_id"] for r in eager]
    for i in range(1, len(seen)):  # the default is the first named prompt: compare the others to it
        if calls[i].get("prompt_name") != reference.default_prompt_name:
            assert np.abs(seen[i] - seen[0]).max() > 1e-4, calls[i]


# ----- the Qwen3 chat-template reranker: the prompt is the system message -----
@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """The tiny Qwen3 reranker saved with two prompts ("code" the default), its eager CrossEncoder, and its merged
    ONNX export."""
    from fixtures import text
    from fixtures.reranker_families import RERANKER_FAMILIES, QWEN3_PROMPTS, build_reranker
    from fixtures.tiny_models import cross_encoder_reference

    from peft_export import export_onnx_model

    root = tmp_path_factory.mktemp("qwen3-prompts")
    family = dataclasses.replace(RERANKER_FAMILIES["qwen3"], prompts={**QWEN3_PROMPTS, "web": QWEN3_WEB})
    base = build_reranker(family, root, text.FALLBACK_SENTENCES + text.real_sentences(200, seed=1))
    export = export_onnx_model(str(base), root / "onnx", log=_quiet).path
    return {"base": base, "export": export, "model": CrossEncoderModel(export),
            "reference": cross_encoder_reference(base)}


@pytest.mark.slow
def test_qwen3_prompts_render_as_the_cross_encoders(qwen3):
    """The runtime's token ids of each prompt equal what the CrossEncoder feeds its model, row by row (its padding
    is on the left, ours on the right), for the two named prompts, a literal one and none."""
    model, reference = qwen3["model"], qwen3["reference"]
    settings = json.loads((qwen3["export"] / "reranker_config.json").read_text())["task_config"]
    slotted = settings["prompted_pair_template"]
    assert slotted["before_prompt"].endswith("<Instruct>: ") and slotted["prefix"].endswith("<Query>: ")
    assert settings["prompts"] == reference.prompts and settings["default_prompt_name"] == "code"
    for prompt in (reference.prompts["code"], QWEN3_WEB, LITERAL, ""):
        eager = reference.preprocess(PAIRS, prompt=prompt)
        runtime = model._tokenizer.encode_pairs(PAIRS, prompt)
        for row in range(len(PAIRS)):
            want = eager["input_ids"][row][eager["attention_mask"][row].bool()].tolist()
            got = runtime["input_ids"][row][runtime["attention_mask"][row].astype(bool)].tolist()
            assert got == want, (prompt, PAIRS[row])


@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["Instruction words " * 200, "x" * 5000], ids=["words", "unbroken"])
def test_qwen3_prompt_longer_than_max_length_is_truncated_as_the_cross_encoder_truncates_it(qwen3, prompt):
    """A system message longer than max_length leaves no room for the pair: truncated on the right and the
    template's tail written back, as the CrossEncoder does; the ids and scores are its own."""
    model, reference = qwen3["model"], qwen3["reference"]
    eager, runtime = reference.preprocess(PAIRS, prompt=prompt), model._tokenizer.encode_pairs(PAIRS, prompt)
    for row in range(len(PAIRS)):
        want = eager["input_ids"][row][eager["attention_mask"][row].bool()].tolist()
        assert runtime["input_ids"][row][runtime["attention_mask"][row].astype(bool)].tolist() == want, row
    assert np.abs(model.predict(PAIRS, prompt=prompt) - reference.predict(PAIRS, prompt=prompt)).max() <= TOLERANCE


@pytest.mark.slow
def test_qwen3_long_query_is_tokenized_once_for_all_its_documents(qwen3, monkeypatch):
    """On the Qwen3 template a query of one unbroken 50,000-character run is decided by the template's text after
    it: the call tokenizes it a few times, not once per document (100 such pairs took 4 s), with the rows of each
    pair rendered alone; a query of words is cut to its truncation prefix once; the scores equal eager."""
    import reranker_fixtures

    tokenizer = qwen3["model"]._tokenizer
    documents = [f"document {i}" for i in range(60)] + [PASSAGES[3]]
    for query in ("x" * 50_000, "word " * 20_000):
        pairs = [(query, d) for d in documents]
        chars, rows = reranker_fixtures.characters_tokenized(tokenizer, pairs, monkeypatch)
        monkeypatch.setattr(tokenizer, "_decided_start", lambda start: None)  # each pair rendered alone
        per_pair_chars, per_pair = reranker_fixtures.characters_tokenized(tokenizer, pairs, monkeypatch)
        monkeypatch.undo()
        assert rows == per_pair
        assert chars * 20 < per_pair_chars, (chars, per_pair_chars)
    pairs = [("word " * 20_000, d) for d in documents[:3]]
    assert np.abs(qwen3["model"].predict(pairs) - qwen3["reference"].predict(pairs)).max() <= TOLERANCE


@pytest.mark.slow
def test_qwen3_prompts_equal_eager_cross_encoder(qwen3):
    _assert_parity(qwen3["model"], qwen3["reference"])


@pytest.mark.slow
def test_qwen3_prompts_over_http_equal_eager_cross_encoder(qwen3, tmp_path):
    """``/v1/rerank`` with ``prompt_name`` or a literal ``prompt`` scores as eager ``CrossEncoder.predict`` with it
    (the chat template's system message), tokens counted with the template's text; an export that cannot apply
    another prompt answers 422 naming why."""
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from peft_export.serve.app import create_app

    query, documents = PAIRS[0][0], [p for _, p in PAIRS[:4]]  # HTTP refuses the empty fifth
    with TestClient(create_app({"qwen3": qwen3["model"]})) as client:
        for fields in ({}, {"prompt_name": "web"}, {"prompt": LITERAL}, {"prompt": ""}):
            response = client.post("/v1/rerank", json={"model": "qwen3", "query": query, "documents": documents,
                                                       **fields})
            assert response.status_code == 200, response.text
            got = [r["relevance_score"] for r in sorted(response.json()["results"], key=lambda r: r["index"])]
            want = qwen3["reference"].predict([(query, d) for d in documents], **fields)
            assert np.abs(np.array(got) - want).max() <= TOLERANCE, fields
    old = CrossEncoderModel(_edited(qwen3["export"], tmp_path / "old", drop=(
        "prompts", "default_prompt_name", "unprompted_pair_template", "prompted_pair_template")))
    with TestClient(create_app({"old": old})) as client:
        response = client.post("/v1/rerank", json={"model": "old", "query": query, "documents": documents,
                                                   "prompt": QWEN3_WEB})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_prompt"
    assert "applies only its default prompt" in response.json()["error"]["message"]


@pytest.mark.slow
def test_qwen3_export_without_recorded_prompts_scores_its_default(qwen3, tmp_path):
    """The layout of exports made before prompts were recorded (pair_template with the default prompt only)."""
    old = CrossEncoderModel(_edited(qwen3["export"], tmp_path / "old", drop=(
        "prompts", "default_prompt_name", "unprompted_pair_template", "prompted_pair_template")))
    assert np.abs(old.predict(PAIRS) - qwen3["reference"].predict(PAIRS)).max() <= TOLERANCE
    with pytest.raises(ConfigError, match=r"cannot apply the prompt 'Given a web search query.*made before "
                                          r"peft_export recorded prompts; export it again"):
        old.predict(PAIRS, prompt=QWEN3_WEB)
    unslotted = CrossEncoderModel(_edited(qwen3["export"], tmp_path / "unslotted", drop=("prompted_pair_template",)))
    unprompted = qwen3["reference"].predict(PAIRS, prompt="")
    assert np.abs(unslotted.predict(PAIRS, prompt="") - unprompted).max() <= TOLERANCE
    with pytest.raises(ConfigError, match=r"applies only its default prompt, because it has a chat template that "
                                          r"does not render the prompt as the system message's text, once, before"):
        unslotted.predict(PAIRS, prompt_name="web")


@pytest.mark.slow
def test_a_template_that_cannot_take_another_prompt_records_none(qwen3):
    """A template that puts the prompt after the query, or trims it, cannot be rendered by substitution: the export
    records no prompted template (its default prompt still applies) and the runtime refuses other prompts."""
    from transformers import AutoTokenizer

    from peft_export.export.pair_template import prompted_pair_template

    tokenizer = AutoTokenizer.from_pretrained(str(qwen3["base"]))
    assert prompted_pair_template(tokenizer, {}, "qwen3") is not None
    original = tokenizer.chat_template
    tokenizer.chat_template = original.replace("<Instruct>: {{ ns.instruction }}", "").replace(
        "<|im_end|>\n<|im_start|>assistant", "\n<Instruct>: {{ ns.instruction }}<|im_end|>\n<|im_start|>assistant")
    assert "<Instruct>" in tokenizer.apply_chat_template(
        [{"role": "query", "content": "q"}, {"role": "document", "content": "d"}], tokenize=False)
    assert prompted_pair_template(tokenizer, {}, "qwen3") is None
    tokenizer.chat_template = original.replace("{{ ns.instruction }}", "{{ ns.instruction | trim }}")
    assert prompted_pair_template(tokenizer, {}, "qwen3") is None
