"""Attention fusion for the families ONNX Runtime's BERT optimizer leaves unfused
(runtime/onnxruntime_attention_rewrite.py): MPNet's relative position bias, XLM-R, ModernBERT's local window with rotary
positions, and the rotary, grouped-query decoders. Each tiny family model (tests/fixtures) is exported unfused once,
fused in memory, and the two graphs must agree within 1e-5 on shapes other than the traced one; the merged-ONNX parity
against sentence-transformers + PEFT of the fused exports is in tests/test_encoder_families.py and
tests/test_families.py. Synthetic graphs pin the matcher's rules (what it must fuse, what it must leave alone)."""

from __future__ import annotations

import collections
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures import encoder_families, family_models, text
from peft_export import export_onnx_model
from peft_export.runtime.onnxruntime_attention_rewrite import fuse_remaining_attention
from peft_export.export.families import family_for
from peft_export.runtime.onnxruntime_fusion import AttentionShape, fuse_attention

ATOL = 1e-5
# family -> (fused operator, blocks, model_type); the counts are what the fused graph holds (per layer, one block).
EXPECTED = {
    "mpnet": ("Attention", 2, "mpnet"),  # packed projections, relative position bias as attention_bias
    "xlm-roberta": ("Attention", 2, "xlm-roberta"),  # ONNX Runtime's optimizer matches none of them today
    "modernbert": ("MultiHeadAttention", 3, "modernbert"),  # rotary; global and local (sliding window) masks
    "qwen3": ("MultiHeadAttention", 2, "qwen3"),  # rotary, grouped-query (4 heads, 2 key/value heads), causal
    "gemma3": ("MultiHeadAttention", 2, "gemma3_text"),  # bidirectional, one sliding-window layer
    "mistral": ("MultiHeadAttention", 2, "mistral"),
    "llama": ("MultiHeadAttention", 2, "llama"),
}
DEFAULT = {"mpnet", "qwen3"}  # the others are marked slow (4-10 s each to build and export)
SHAPES = [(1, 5), (3, 17), (7, 64)]


def _unfused_export(name: str, root: Path) -> Path:
    texts = text.FALLBACK_SENTENCES + text.real_sentences(200, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name in encoder_families.FAMILIES:
            family = encoder_families.FAMILIES[name]
            base = encoder_families.build_st(family, encoder_families.build_hf(family, root / "hf", texts),
                                             root / "st")
            adapter = encoder_families.build_adapter(family, base, root / "adapter")
        else:
            base = family_models.build_family_model(name, root / "base", texts)
            adapter = family_models.add_family_adapter(base, root / "adapter", name)
        out = root / "unfused"
        export_onnx_model(str(adapter), out, base=str(base), fuse_attention=False, log=lambda msg: None)
    return out


def _feeds(session, batch: int, seq: int, rng) -> dict[str, np.ndarray]:
    feeds = {"input_ids": rng.integers(5, 300, (batch, seq)), "attention_mask": np.ones((batch, seq), np.int64)}
    feeds["attention_mask"][1:, seq // 2:] = 0  # padded rows
    if "token_type_ids" in [i.name for i in session.get_inputs()]:
        feeds["token_type_ids"] = np.zeros((batch, seq), np.int64)
    return feeds


def _max_diff(traced: onnx.ModelProto, fused: onnx.ModelProto, extra=None) -> float:
    a, b = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (traced, fused))
    rng, worst = np.random.default_rng(0), 0.0
    for batch, seq in SHAPES:
        feeds = {**_feeds(a, batch, seq, rng), **(extra or {})}
        want, got = (s.run(["sentence_embedding", "token_embeddings"], feeds) for s in (a, b))
        worst = max(worst, *(float(np.abs(x - y).max()) for x, y in zip(want, got)))
    return worst


@pytest.mark.parametrize("name", [pytest.param(n, marks=[] if n in DEFAULT else [pytest.mark.slow])
                                  for n in EXPECTED])
def test_every_family_fuses_and_matches_the_traced_graph(name, tmp_path):
    op, blocks, model_type = EXPECTED[name]
    folder = _unfused_export(name, tmp_path)
    traced = onnx.load(str(folder / "model.onnx"))
    config = _hf_config(tmp_path)
    shape = AttentionShape(config["num_attention_heads"], config["hidden_size"])
    fused, counts = fuse_attention(traced, shape, bert_optimizer=family_for(model_type).bert_optimizer)
    ops = collections.Counter(node.op_type for node in fused.graph.node)
    assert counts[op] == ops[op] == blocks and ops["Softmax"] == 0
    assert len(fused.graph.node) < len(traced.graph.node)
    assert _max_diff(traced, fused) <= ATOL


def _hf_config(root: Path) -> dict:
    for candidate in (root / "hf" / "config.json", root / "base" / "config.json"):
        if candidate.exists():
            return json.loads(candidate.read_text())
    raise FileNotFoundError(f"no config.json under {root}")


def _tiny_mpnet(root: Path) -> tuple[Path, Path]:
    """The tiny MPNet (position bias) Sentence Transformers base and a LoRA adapter on it, under ``root``."""
    texts = text.FALLBACK_SENTENCES + text.real_sentences(200, seed=1)
    family = encoder_families.FAMILIES["mpnet"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = encoder_families.build_st(family, encoder_families.build_hf(family, root / "hf", texts), root / "st")
        return base, encoder_families.build_adapter(family, base, root / "adapter")


@pytest.mark.slow
def test_switchable_graphs_fuse_with_their_lora_branches_in_place(tmp_path):
    """Branches on query/key/value stop the packed Attention form (the projection is no longer x @ W + b), not the
    MultiHeadAttention form: the fused switchable graph computes the same with an adapter fed at run time."""
    base, adapter = _tiny_mpnet(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = tmp_path / "switchable"
        export_onnx_model(str(base), out, adapters=[f"a={adapter}"], switchable=True, log=lambda msg: None)
    traced = onnx.load(str(out / "model.onnx"))
    fused, counts = fuse_attention(traced, AttentionShape(2, 32))
    assert counts["MultiHeadAttention"] == 2 and counts["Attention"] == 0
    rng = np.random.default_rng(1)
    lora = {t.name: (rng.standard_normal([d or 2 for d in t.dims]) * 0.1).astype(np.float32)
            for t in traced.graph.initializer if ".lora_" in t.name}  # a rank-2 adapter in every slot
    assert len(lora) == 2 * 4 * 2  # A and B, q/k/v/o, 2 layers
    assert _max_diff(traced, fused, lora) <= ATOL


# -- synthetic graphs: the matcher's rules ------------------------------------------------------------------------

HEADS, HEAD, SEQ_NAME = 2, 4, "seq"
HIDDEN = HEADS * HEAD


def _attention_graph(bias_after_scale: bool = True, rotate_query: bool = False) -> onnx.ModelProto:
    """x (batch, seq, 8) -> one MPNet-like attention block: projections, scores / sqrt(4), + position bias
    (1, 2, seq, seq), + mask (batch, 1, 1, seq), Softmax, merged heads. ``bias_after_scale=False`` adds the
    position bias before the scale; ``rotate_query`` multiplies the query heads by a graph input (as rotary
    positions make it no longer a plain projection)."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []

    def const(name, array):
        inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    heads_shape = const("heads_shape", np.array([0, 0, HEADS, HEAD], np.int64))
    merged_shape = const("merged_shape", np.array([0, 0, HIDDEN], np.int64))
    projected = {}
    for p in "qkv":
        mm = node("MatMul", ["x", const(f"W{p}", rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32))], f"{p}mm")
        add = node("Add", [const(f"b{p}", rng.standard_normal(HIDDEN).astype(np.float32)), mm], f"{p}add")
        projected[p] = node("Reshape", [add, heads_shape], f"{p}heads")  # (batch, seq, heads, head)
    q = node("Transpose", [projected["q"]], "q4", perm=[0, 2, 1, 3])
    if rotate_query:
        q = node("Mul", [q, "rot"], "q_rot")
    k_t = node("Transpose", [projected["k"]], "k4t", perm=[0, 2, 3, 1])
    v = node("Transpose", [projected["v"]], "v4", perm=[0, 2, 1, 3])
    scores = node("MatMul", [q, k_t], "scores")
    if bias_after_scale:
        scores = node("Add", [node("Div", [scores, const("sqrt", np.float32(2.0))], "scaled"), "pos"], "biased")
    else:
        scores = node("Div", [node("Add", [scores, "pos"], "biased"), const("sqrt", np.float32(2.0))], "scaled")
    scores = node("Add", [scores, "mask"], "masked")
    probs = node("Softmax", [scores], "probs", axis=-1)
    context = node("Transpose", [node("MatMul", [probs, v], "context")], "context_t", perm=[0, 2, 1, 3])
    node("Reshape", [context, merged_shape], "out")
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SEQ_NAME, HIDDEN]),
              helper.make_tensor_value_info("pos", TensorProto.FLOAT, [1, HEADS, SEQ_NAME, SEQ_NAME]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, 1, SEQ_NAME])]
    if rotate_query:
        inputs.append(helper.make_tensor_value_info("rot", TensorProto.FLOAT, [1, 1, SEQ_NAME, HEAD]))
    graph = helper.make_graph(nodes, "attention", inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, rotate_query: bool = False) -> np.ndarray:
    rng = np.random.default_rng(3)
    batch, seq = 3, 6
    mask = np.zeros((batch, 1, 1, seq), np.float32)
    mask[1:, ..., 4:] = np.finfo(np.float32).min  # padded keys
    feeds = {"x": rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32),
             "pos": rng.standard_normal((1, HEADS, seq, seq)).astype(np.float32), "mask": mask}
    if rotate_query:
        feeds["rot"] = rng.standard_normal((1, 1, seq, HEAD)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_a_block_with_a_position_bias_becomes_one_attention_node_with_the_bias_as_input():
    model = _attention_graph()
    want = _run(model)
    assert fuse_remaining_attention(model, HEADS) == {"Attention": 1, "MultiHeadAttention": 0}
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Attention") == 1 and "Softmax" not in ops and "MatMul" not in ops  # projections packed
    attention = next(n for n in model.graph.node if n.op_type == "Attention")
    assert attention.domain == "com.microsoft"
    bias = next(n for n in model.graph.node if n.output[0] == attention.input[5])
    assert bias.op_type == "Add" and set(bias.input) == {"pos", "mask"}  # the two terms, summed once
    assert {a.name: helper.get_attribute_value(a) for a in attention.attribute} == {"num_heads": HEADS,
                                                                                    "scale": 0.5}
    assert {t.name for t in model.graph.initializer}.isdisjoint({"Wq", "Wk", "Wv", "bq", "bk", "bv"})
    np.testing.assert_allclose(_run(model), want, atol=ATOL)


def test_a_query_that_is_not_a_projection_gets_multi_head_attention():
    model = _attention_graph(rotate_query=True)
    want = _run(model, rotate_query=True)
    assert fuse_remaining_attention(model, HEADS) == {"Attention": 0, "MultiHeadAttention": 1}
    np.testing.assert_allclose(_run(model, rotate_query=True), want, atol=ATOL)


def test_a_bias_added_before_the_scale_is_left_unfused():
    """The fused operators scale the product only, then add the bias; a bias the graph scales too would be
    computed differently, so that block stays as traced."""
    model = _attention_graph(bias_after_scale=False)
    before = model.SerializeToString()
    assert fuse_remaining_attention(model, HEADS) == {"Attention": 0, "MultiHeadAttention": 0}
    assert model.SerializeToString() == before


def test_graphs_for_int8_keep_biased_projections_unpacked():
    """ONNX Runtime's dynamic quantizer turns Attention into QAttention and drops input 5 (attention_bias): a packed
    MPNet block would lose its position bias and mask. For int8, such blocks become MultiHeadAttention and their
    projections stay MatMuls, which the quantizer handles one by one."""
    model = _attention_graph()
    want = _run(model)
    assert fuse_remaining_attention(model, HEADS, pack_with_bias=False) == {"Attention": 0, "MultiHeadAttention": 1}
    assert [n.op_type for n in model.graph.node].count("MatMul") == 3
    np.testing.assert_allclose(_run(model), want, atol=ATOL)


@pytest.mark.slow
def test_int8_mpnet_quantizes_the_projections_and_keeps_the_position_bias(tmp_path, quiet_log):
    from peft_export.export.gate import QualityGate

    base, adapter = _tiny_mpnet(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = tmp_path / "int8"
        export_onnx_model(str(adapter), out, base=str(base), quantize="int8", log=quiet_log,
                          gate=QualityGate(min_mean_cosine=0.9, min_worst_cosine=0.5, min_ndcg_retention=0.5))
    validation = json.loads((out / "peft_export.json").read_text())["validation"]
    assert validation["attention_fusion"]["fused_operators"]["MultiHeadAttention"] == 2
    ops = collections.Counter(n.op_type for n in onnx.load(str(out / "model_int8.onnx")).graph.node)
    assert ops["MultiHeadAttention"] == 2 and ops["QAttention"] == 0 and ops["Softmax"] == 0
    assert validation["quantization"]["attempts"][0]["quantized_nodes"] == 6 * 2  # q, k, v, o, FFN in/out
