"""Does a one-sentence request wait behind another tenant's bulk load? `peft-export serve` under a truncating flood.

Starts `peft-export serve EXPORT` on 127.0.0.1 (from this checkout, or from ``--repo`` to measure another one, e.g.
the code before a change), then:

1. idle: one-sentence requests to the *probe* model, one after another: p50/p99;
2. loaded: ``--bulk-requests`` concurrent requests to the *bulk* model, each ``--bulk-inputs`` inputs of
   ``--bulk-chars`` characters of real text with ``truncate: true``, while the probe keeps sending one sentence at a
   time (every 50 ms) until the bulk requests are answered: the probe's p50/p99/max and each bulk request's time.

With a switchable export the bulk load goes to its first adapter and the probe to another name (another tenant);
with a merged export both use the base. Before reporting, it checks that the probe's embedding and a bulk input's
embedding equal in-process ``EmbeddingModel.encode`` (the bulk input: of the *whole* text, truncated by the model)
within 1e-5. Records the machine, its load (``os.getloadavg``) before and after, and versions.

    python benchmarks/investigations/bench_serve_fairness.py EXPORT [--repo OTHER_CHECKOUT] [--out results.json]

Bounded: probing stops after ``--max-seconds``; every request has a timeout.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from peft_export.bench.child import REPO_ROOT
from peft_export.bench.machine import machine_info
from peft_export.bench.server import free_port, served
from peft_export.bench.stats import percentiles

PROBE = "Where is my parcel?"


def real_text(chars: int, salt: int) -> str:
    """``chars`` characters of real English: the demo corpus (or this file's docstring) repeated, salted."""
    try:
        from peft_export.demo import load_sentences

        sentences = list(load_sentences(200))
    except ImportError:
        sentences = (__doc__ or "").split(". ")
    text = f"Document {salt}. " + " ".join(sentences)
    while len(text) < chars:
        text += " " + text
    return text[:chars]


def probe_once(http, model: str, timeout: float = 900) -> tuple[float, np.ndarray]:
    started = time.perf_counter()
    response = http.post("/v1/embeddings", json={"model": model, "input": PROBE}, timeout=timeout)
    took = time.perf_counter() - started
    response.raise_for_status()
    return took, np.array(response.json()["data"][0]["embedding"], dtype=np.float32)


def main(argv: list[str] | None = None) -> int:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export")
    parser.add_argument("--repo", type=Path, default=REPO_ROOT, help="checkout whose server to run")
    parser.add_argument("--bulk-requests", type=int, default=3)
    parser.add_argument("--bulk-inputs", type=int, default=160)
    parser.add_argument("--bulk-chars", type=int, default=99_999)
    parser.add_argument("--idle-probes", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=1800, help="stop probing after this long")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--serve-arg", action="append", default=[], help="extra `peft-export serve` argument")
    args = parser.parse_args(argv)

    from peft_export import EmbeddingModel

    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_serve_fairness_{free_port()}.log"
    load_before = os.getloadavg()
    with served(args.export, args.serve_arg, log, repo=args.repo, timeout=120) as server:
        with httpx.Client(base_url=server.url, timeout=900) as http:
            names = [m["id"] for m in http.get("/v1/models").json()["data"]]
            bulk_model = names[1] if len(names) > 1 else names[0]
            probe_model = names[2] if len(names) > 2 else names[0]

            # correctness first: the probe and one bulk input against in-process encode
            reference = EmbeddingModel(args.export)
            options = {"adapter": None if probe_model == names[0] else probe_model} if len(names) > 1 else {}
            if options.get("adapter") is None and len(names) > 1:
                options["adapter"] = False
            _, got = probe_once(http, probe_model)
            probe_diff = float(np.abs(got - reference.encode([PROBE], **options)[0]).max())
            texts = [[real_text(args.bulk_chars, r * 1000 + i) for i in range(args.bulk_inputs)]
                     for r in range(args.bulk_requests)]
            check = http.post("/v1/embeddings", json={"model": bulk_model, "input": texts[0][:1], "truncate": True})
            check.raise_for_status()
            bulk_options = {"adapter": bulk_model} if len(names) > 1 else {}
            bulk_diff = float(np.abs(np.array(check.json()["data"][0]["embedding"], dtype=np.float32)
                                     - reference.encode(texts[0][:1], **bulk_options)[0]).max())
            if max(probe_diff, bulk_diff) > 1e-5:
                raise SystemExit(f"wrong answers: probe max diff {probe_diff:.2e}, bulk max diff {bulk_diff:.2e}")

            idle = [probe_once(http, probe_model)[0] for _ in range(args.idle_probes)]

            done = threading.Event()
            bulk_seconds: list[float] = []

            def bulk(batch: list[str]) -> None:
                started = time.perf_counter()
                response = http.post("/v1/embeddings", json={"model": bulk_model, "input": batch, "truncate": True},
                                     timeout=1800)
                response.raise_for_status()
                bulk_seconds.append(time.perf_counter() - started)

            loaded: list[float] = []
            with concurrent.futures.ThreadPoolExecutor(args.bulk_requests) as pool:
                futures = [pool.submit(bulk, batch) for batch in texts]
                threading.Thread(target=lambda: (concurrent.futures.wait(futures), done.set()), daemon=True).start()
                time.sleep(0.2)  # the bulk requests are in
                deadline = time.monotonic() + args.max_seconds
                while not done.is_set() and time.monotonic() < deadline:
                    loaded.append(probe_once(http, probe_model)[0])
                    time.sleep(0.05)
                for future in futures:
                    future.result()
    idle_ms, loaded_ms = percentiles(idle), percentiles(loaded)
    result = {
        "export": args.export, "repo": str(args.repo), "bulk_model": bulk_model, "probe_model": probe_model,
        "bulk": {"requests": args.bulk_requests, "inputs": args.bulk_inputs, "chars": args.bulk_chars,
                 "seconds": sorted(round(s, 2) for s in bulk_seconds)},
        "probe_idle_ms": {"n": len(idle), "p50": idle_ms["p50_ms"], "p99": idle_ms["p99_ms"]},
        "probe_loaded_ms": {"n": len(loaded), "p50": loaded_ms["p50_ms"], "p99": loaded_ms["p99_ms"],
                            "max": loaded_ms["max_ms"]},
        "max_abs_diff": {"probe": probe_diff, "bulk_input": bulk_diff},
        "machine": {**machine_info(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
