"""`peft-export bench --quick` on tiny exports: a table of positive numbers whose quality columns are computed."""

from __future__ import annotations

import json
import runpy
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from peft_export.cli import main
from peft_export.runtime.onnxruntime_backend import SessionSettings


def test_bench_quick_writes_table_json_and_plot(bert_case, zoo, tmp_path):
    base_export = zoo.export("bench-base", bert_case.base)  # same model without its adapter
    out = tmp_path / "bench"
    code = main(["bench", str(bert_case.export), str(base_export), "--quick", "--queries", "30",
                 "--sentences", "60", "--out", str(out)])
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    rows = report["rows"]
    assert len(rows) == 2
    for row in rows:
        for key in ("b1_p50_ms", "b1_p99_ms", "b32_per_s", "tokens_per_s"):
            assert row[key] > 0, key
    assert rows[0]["mean_cosine"] == pytest.approx(1.0, abs=1e-6)  # the reference against itself
    settings = rows[0]["note_runtime"]  # what the figures were measured with
    assert settings["backend"] == "onnxruntime" and settings["providers"] == ["CPUExecutionProvider"]
    assert settings["allow_spinning"] is True and settings["stop_spinning_between_runs"] is True
    # The second contender lacks the adapter: its cosine must be recomputed, not copied from the first.
    a, b = bert_case.embedding_model(), __import__("peft_export").EmbeddingModel(base_export)
    from peft_export.demo import load_sentences

    sentences = load_sentences(60)
    ea, eb = a.encode(sentences), b.encode(sentences)
    cos = (ea * eb).sum(1) / np.linalg.norm(ea, axis=1) / np.linalg.norm(eb, axis=1)
    assert rows[1]["mean_cosine"] == pytest.approx(float(cos.mean()), abs=1e-5)
    assert rows[1]["mean_cosine"] < 0.9999
    assert report["machine"]["usable_cores"] >= 1 and report["machine"]["cpu"]
    # The weight-read floor follows from the graph's weights: FLOPs per token / 2 weights of 4 bytes each.
    assert report["fp32_weight_mb"] == pytest.approx(report["flops_per_token"] * 2 / 1e6)
    assert report["weight_read_gbs"] > 0
    assert report["b1_weight_read_floor_ms"] == pytest.approx(
        report["fp32_weight_mb"] / report["weight_read_gbs"], rel=1e-9)
    md = (out / "bench.md").read_text()
    assert "batch-1 weight-read floor" in md
    # A ratio (int8 can run past the fp32 peak), not a percentage share; a smoke run's NDCG is labelled as such.
    assert "| x fp32 matmul peak |" in md and "of fp32 matmul peak" not in md
    assert rows[0]["fp32_matmul_peak_ratio"] == pytest.approx(rows[0]["achieved_gflops"] / report["fp32_matmul_gflops"])
    assert "| NDCG@10 ret. (indicative, 100 pairs) |" in md
    assert "indicative only" in md and "not the export's quality gate" in md
    assert "| contender |" in md and str(bert_case.export.name) in md
    assert (out / "bench.png").stat().st_size > 1000


def test_bench_without_matplotlib_says_which_extra_draws_the_plot(bert_case, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the bench extra were not installed
    out = tmp_path / "bench"
    assert main(["bench", str(bert_case.export), "--quick", "--queries", "25", "--sentences", "40",
                 "--out", str(out)]) == 0
    assert (out / "bench.md").is_file() and not (out / "bench.png").exists()
    err = capsys.readouterr().err
    assert "bench.png not written: matplotlib is not installed" in err
    assert "pip install 'peft_export[bench]'" in err


def _synthetic_report():
    from peft_export.bench.report import Report

    report = Report("peft-export bench")
    for name, p50, rate, worst, ndcg in (("eager sentence-transformers + PEFT adapter (unmerged)", 9.55, 98, 1, 1),
                                         ("onnxruntime int8 (demo-int8)", 1.12, 584, 0.9869, 0.9951),
                                         ("openvino int8-static (demo-ov-s8)", 2.26, 704, 0.9899, 1.0099)):
        report.rows.append({"contender": name, "b1_p50_ms": p50, "b32_per_s": rate, "mean_cosine": worst,
                            "worst_cosine": worst, "ndcg10_retention": ndcg})
    return report


def test_bench_plot_keeps_value_labels_inside_each_panel_and_shows_quality():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from peft_export.bench.suite import QUALITY_PANEL, bench_figure

    report = _synthetic_report()
    fig = bench_figure(report)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        for ax in fig.axes:
            frame = ax.get_window_extent(renderer)
            assert ax.texts, ax.get_title()
            for text in ax.texts:
                box = text.get_window_extent(renderer)
                assert frame.x0 <= box.x0 and box.x1 <= frame.x1, (ax.get_title(), text.get_text())
        (quality,) = [ax for ax in fig.axes if ax.get_title() == QUALITY_PANEL]
        right_edges = sorted(round(bar.get_x() + bar.get_width(), 6) for bar in quality.patches)
        wanted = sorted(round(r[k], 6) for r in report.rows for k in ("ndcg10_retention", "worst_cosine"))
        assert right_edges == wanted
        labels = {t.get_text().strip() for t in quality.texts}
        assert {"0.9869", "1.0099"} <= labels
    finally:
        plt.close(fig)


def test_session_settings_are_applied(bert_case):
    model = bert_case.embedding_model(session_settings=SessionSettings(
        intra_op_threads=1, allow_spinning=False, enable_cpu_mem_arena=False, graph_optimization_level="basic"))
    options = model.backend.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.enable_cpu_mem_arena is False
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert str(options.graph_optimization_level).endswith("ENABLE_BASIC")


def test_unknown_optimization_level_is_refused(bert_case):
    with pytest.raises(ValueError, match="graph_optimization_level must be one of"):
        bert_case.embedding_model(session_settings=SessionSettings(graph_optimization_level="max"))


def test_default_spins_only_during_runs_and_throughput_preset_does_not_spin(bert_case):
    def entry(model, key):
        return model.backend.session.get_session_options().get_session_config_entry(key)

    default = bert_case.embedding_model(session_settings=SessionSettings.latency(intra_op_threads=2))
    assert entry(default, "session.intra_op.allow_spinning") == "1"
    assert entry(default, "session.force_spinning_stop") == "1"
    assert default.backend.session.get_session_options().intra_op_num_threads == 2
    assert default.backend.describe()["stop_spinning_between_runs"] is True
    assert bert_case.embedding_model().backend.settings == SessionSettings()
    keeps_spinning = bert_case.embedding_model(session_settings=SessionSettings(stop_spinning_between_runs=False))
    assert entry(keeps_spinning, "session.intra_op.allow_spinning") == "1"
    with pytest.raises(Exception, match="force_spinning_stop"):  # not set: ORT's own behaviour
        entry(keeps_spinning, "session.force_spinning_stop")
    throughput = bert_case.embedding_model(session_settings=SessionSettings.throughput())
    assert entry(throughput, "session.intra_op.allow_spinning") == "0"
    texts = ["a short query", "a somewhat longer sentence about low-rank adapters"]
    np.testing.assert_allclose(default.encode(texts), throughput.encode(texts), atol=1e-6)
    np.testing.assert_allclose(keeps_spinning.encode(texts), throughput.encode(texts), atol=1e-6)


def test_an_idle_model_takes_no_cpu_after_a_run(bert_case):
    """RELIABILITY 22: with the default settings, a model's threads stop spinning when its run ends, so models
    that are loaded but idle (or used in turn) leave the cores to the one that runs. ORT's plain spinning keeps
    the pool busy for a while after each run (measured ~25 ms of CPU per run on MiniLM)."""
    model = bert_case.embedding_model()
    for _ in range(3):
        model.encode(["warm-up query"])
    idle_cpu = []
    for _ in range(3):
        model.encode(["a short query, then nothing"])
        start = time.process_time()
        time.sleep(0.3)
        idle_cpu.append(time.process_time() - start)
    assert min(idle_cpu) < 0.005, f"process CPU while idle after runs: {idle_cpu} s"


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run_benchmark(name: str, args: list[str], out: Path) -> dict:
    """Run ``benchmarks/<name>.py`` as a script with ``args`` (plus ``--out out``); its JSON report."""
    script = BENCHMARKS / f"{name}.py"
    old_argv, sys.argv = sys.argv, [str(script), *args, "--out", str(out)]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = old_argv
    assert done.value.code == 0
    return json.loads((out / f"{script.stem}.json").read_text())


def test_bench_spinning_quick_compares_the_three_settings(bert_case, tmp_path):
    report = _run_benchmark("investigations/bench_spinning", ["--quick", "--export", str(bert_case.export)], tmp_path)
    assert [row["settings"].split(" (")[0] for row in report["rows"]] == [
        "spinning off", "spinning, kept on after each run", "spinning during runs only"]
    for row in report["rows"]:
        for key in ("one_b1_ms", "one_b32_per_s", "turns_b1_ms", "both_b1_per_s", "both_b32_per_s",
                    "threads_b1_per_s"):
            assert row[key] > 0, (row["settings"], key)


def test_bench_ort_kernels_quick_times_every_graph_and_both_kernels(bert_case, tmp_path):
    report = _run_benchmark("investigations/bench_ort_kernels", ["--quick", "--base", str(bert_case.base),
                                                                 "--adapter", str(bert_case.adapter)], tmp_path)
    assert len(report["rows"]) == 8  # traced/fused x fp32/int8 x SkipLayerNorm fusion off/on
    for row in report["rows"]:
        assert row["b1_p50_ms"] > 0 and row["b32_per_s"] > 0, row["contender"]
    fused = [r for r in report["rows"] if r["contender"].startswith("fused fp32")]
    traced = [r for r in report["rows"] if r["contender"].startswith("traced fp32")]
    assert fused[0]["graph_nodes"] < traced[0]["graph_nodes"]  # the fusion removed nodes
    assert all(r["max_diff"] <= 1e-5 for r in fused + traced)
    kernels = {(k["tokens"], k["operator"]): k["us_per_op"] for k in report["kernels"]}
    assert len(kernels) == 4 and all(v > 0 for v in kernels.values())


def test_alternating_rounds_reverse_the_order_every_other_round():
    from peft_export.bench.rounds import alternating_rounds

    calls = []
    results = alternating_rounds(["a", "b", "c"], 3, lambda name: calls.append(name) or f"{name}{len(calls)}")
    assert calls == ["a", "b", "c", "c", "b", "a", "a", "b", "c"]
    assert results == {"a": ["a1", "a6", "a7"], "b": ["b2", "b5", "b8"], "c": ["c3", "c4", "c9"]}


def test_rows_are_labelled_with_what_distinguishes_each_export():
    """Several OpenVINO or ONNX exports in one table share a model file name; the label says which is which."""
    from peft_export.bench.suite import export_variant

    def manifest(merge_mode="merged", **export):
        return {"merge_mode": merge_mode, "export": export}

    assert export_variant(manifest(format="onnx", dtype="float32")) == "fp32"
    assert export_variant(manifest(format="onnx", dtype="int8")) == "int8"
    assert export_variant(manifest(format="onnx", dtype="float16")) == "fp16"
    assert export_variant(manifest("switchable", format="onnx", dtype="float32")) == "fp32, switchable"
    assert export_variant(manifest(format="openvino", weight_format="int8", dtype="float32")) == "int8 weights"
    static = manifest(format="openvino", weight_format="int8", quantization={"mode": "int8-static"})
    assert export_variant(static, {"inference_precision": "bf16"}) == "int8-static, bf16"
    assert export_variant(static, {"inference_precision": "f32"}) == "int8-static"


def test_bench_serve_holds_exact_exports_to_1e5_and_int8_ones_to_a_cosine(bert_case, zoo):
    """bench_serve checks every response against in-process encode: exactly for fp32 exports; int8 results move
    with batch composition (the server makes its own batches), so they are held to a cosine that this noise
    stays above."""
    from peft_export import EmbeddingModel
    from peft_export.demo import load_sentences
    from peft_export.export.gate import QualityGate

    from peft_export.bench.http_load import LOSSY_MIN_COSINE, is_lossy

    assert not is_lossy(EmbeddingModel(bert_case.export))
    lenient = QualityGate(min_mean_cosine=0.9, min_worst_cosine=0.5, min_ndcg_retention=0.5)
    int8 = EmbeddingModel(zoo.export("bench-int8", bert_case.adapter, quantize="int8", gate=lenient))
    assert is_lossy(int8)
    sentences = load_sentences(64)
    batched = int8.encode(sentences, batch_size=32)
    alone = np.stack([int8.encode([s])[0] for s in sentences])
    assert np.abs(alone - batched).max() > 1e-5  # the noise an exact check would flag
    cosine = (alone * batched).sum(1) / np.linalg.norm(alone, axis=1) / np.linalg.norm(batched, axis=1)
    assert cosine.min() >= LOSSY_MIN_COSINE


def test_bench_switchable_counts_each_adapters_branch_arithmetic_from_its_shapes():
    from switchable_fixtures import switchable_export

    from peft_export import EmbeddingModel

    bench = runpy.run_path(str(BENCHMARKS / "bench_switchable.py"), run_name="bench")
    model = EmbeddingModel(switchable_export())
    # Tiny base: 2 layers, hidden 32, FFN 37. A multiply-add per element of A (in x r) and B (r x out) per token.
    assert bench["lora_flops_per_token"](model, "attn") == 2 * 2 * 3 * 2 * (32 + 32)  # r=2 on query/key/value
    assert bench["lora_flops_per_token"](model, "ffn") == 2 * 2 * 8 * ((32 + 37) + (37 + 32))  # r=8, FFN in/out


def test_bench_lora_branch_graphs_differ_only_by_their_branches():
    import onnxruntime as ort

    bench = runpy.run_path(str(BENCHMARKS / "investigations" / "bench_lora_branch.py"), run_name="bench")
    x = {"x": np.random.default_rng(0).standard_normal((1, 7, 384)).astype(np.float32)}
    for context, branches in (("small", 36), ("large", 12)):
        plain, none = bench["_graph"](context, 2, branches=False)
        with_branches, count = bench["_graph"](context, 2, branches=True)
        assert (none, count) == (0, branches)
        kinds = [n.op_type for n in with_branches.graph.node]
        assert kinds.count("MatMul") - [n.op_type for n in plain.graph.node].count("MatMul") == 2 * branches
        outputs = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
                   for m in (plain, with_branches)]
        assert outputs[0].shape == outputs[1].shape == (1, 7, 384)
        assert np.abs(outputs[0] - outputs[1]).max() > 1e-4  # the branches compute something
    row = bench["measure"]("small", 1, 1, rounds=1, runs=3)
    assert row["branches"] == 36 and row["with_us"] > 0 and row["without_us"] > 0


def test_bench_attention_fusion_quick_times_a_fused_and_an_unfused_export(bert_case, zoo, tmp_path):
    unfused = zoo.export("bert-traced", bert_case.adapter, fuse_attention=False)
    report = _run_benchmark("bench_attention_fusion", ["--quick", "--pair", f"bert={bert_case.export},{unfused}"],
                            tmp_path)
    (row,) = report["rows"]
    assert row["fused_ops"] == "2 Attention" and row["max_diff"] <= 1e-5
    fused_nodes, unfused_nodes = map(int, row["nodes"].split(" / "))
    assert fused_nodes < unfused_nodes
    for key in ("b1_fused_ms", "b1_unfused_ms", "b32_fused", "b32_unfused", "b1_gain", "b32_gain"):
        assert row[key] > 0, key


def test_bench_attention_fusion_refuses_a_pair_that_computes_different_embeddings(bert_case, roberta_case, tmp_path):
    bench = runpy.run_path(str(BENCHMARKS / "bench_attention_fusion.py"))
    pair = f"bert={bert_case.export},{roberta_case.export}"  # another model: not the same graph unfused
    with pytest.raises(SystemExit, match=r"bert: fused and unfused embeddings differ by .* \(> 1e-05\); not timed"):
        bench["main"](["--quick", "--pair", pair, "--out", str(tmp_path)])
    assert not (tmp_path / "bench_attention_fusion.json").exists()


def test_rerank_load_level_counts_pairs_and_checks_every_score():
    """http_load.rerank_level against a fake /v1/rerank: pairs/s counts documents, a wrong score shows as its
    difference, a failed request as an error."""
    import asyncio

    import httpx
    import numpy as np
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from peft_export.bench.http_load import rerank_level

    async def rerank(request):
        body = await request.json()
        if body["model"] == "down":
            return JSONResponse({"error": "down"}, status_code=503)
        shift = 0.5 if body["model"] == "off" else 0.0
        scores = [len(d) + shift for d in body["documents"]]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        return JSONResponse({"results": [{"index": i, "relevance_score": scores[i]} for i in order]})

    app = Starlette(routes=[Route("/v1/rerank", rerank, methods=["POST"])])
    requests = [("q", ["a", "bbb", "cc"]), ("r", ["dddd", "e"])]
    references = {(name, i): np.array([len(d) for d in docs], np.float32)
                  for name in ("good", "off", "down") for i, (_, docs) in enumerate(requests)}

    async def level(name):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await rerank_level(client, requests, references, lambda n: name, concurrency=2, max_requests=4,
                                      max_seconds=30, log=lambda msg: None)

    good, off, down = (asyncio.run(level(name)) for name in ("good", "off", "down"))
    assert good["requests"] == 4 and good["errors"] == 0 and good["max_abs_diff"] == 0.0
    assert good["pairs_per_s"] * good["seconds"] == pytest.approx(10)  # 2 x (3 + 2) documents
    assert off["max_abs_diff"] == pytest.approx(0.5)
    assert down["errors"] == 4 and down["pairs_per_s"] == 0


def test_timed_calls_times_each_run_after_untimed_warmup_calls():
    from peft_export.bench.timing import timed_calls

    calls = []
    samples = timed_calls(lambda: calls.append(1), runs=5, warmup=2)
    assert len(calls) == 7
    assert len(samples) == 5 and all(s >= 0 for s in samples)
