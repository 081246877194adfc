"""``peft-export serve-ray``: the serve app on Ray Serve replicas (registered by peft_export.cli)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import require


def cmd_serve_ray(args: argparse.Namespace) -> int:
    import signal
    import threading

    from ..serve import ServeSettings
    from ..serve.server import listening_socket
    from ..serve.settings import LIMIT_FLAGS
    from .local import init_ray

    ray = require("ray", "ray")
    serve = require("ray.serve", "ray")
    from .serve import serve_app

    settings = ServeSettings(
        served_model_name=args.served_model_name or Path(args.path).resolve().name,
        default_adapter=args.default_adapter, auto_truncate=args.auto_truncate,
        **{field: getattr(args, field) for field, _, _ in LIMIT_FLAGS},
    )
    app = serve_app(args.path, replicas=args.replicas, threads_per_replica=args.threads_per_replica,
                    merged_adapter_budget=args.merged_adapter_budget, settings=settings)
    if args.address is None:  # the local Ray instance's HTTP proxy will listen here: a busy port is one line now,
        listening_socket(args.host, args.port).close()  # not a proxy failure deep in Ray's logs after its start
    init_ray(args.address, serve_proxy=True)  # a local instance: loopback only
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name="peft-export", route_prefix="/")
        print(f"serving {args.path} on http://{args.host}:{args.port} with {args.replicas} Ray Serve replica(s)",
              flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def add_serve_ray_parser(sub) -> None:
    from ..serve.settings import add_limit_arguments, port_number

    serve = sub.add_parser(
        "serve-ray", help="serve an export on Ray Serve replicas (same routes as serve)",
        description="Run the `serve` app on Ray Serve: --replicas replicas of --threads-per-replica CPUs each, "
                    "behind Ray's HTTP proxy. Requests that send the header serve_multiplexed_model_id: ADAPTER go "
                    "to replicas with that adapter merged (at most --merged-adapter-budget per replica, LRU). "
                    "Needs peft_export[ray,serve].")
    serve.add_argument("path", help="export folder (the same path on every node)")
    serve.add_argument("--address", help="Ray cluster to join (default: start a local Ray instance, which listens on "
                                         "127.0.0.1 only)")
    serve.add_argument("--host", default="127.0.0.1", help="address of Ray's HTTP proxy (default: 127.0.0.1)")
    serve.add_argument("--port", type=lambda text: port_number(text, lowest=1), default=8000,
                       help="port, 1-65535 (default: 8000)")
    serve.add_argument("--replicas", type=int, default=1, help="replicas (default: 1)")
    serve.add_argument("--threads-per-replica", type=int, default=1,
                       help="CPUs each replica reserves and ONNX Runtime threads it runs (default: 1)")
    serve.add_argument("--merged-adapter-budget", type=int, default=0, metavar="N",
                       help="adapters each replica keeps merged, least recently used evicted (default: 0)")
    serve.add_argument("--served-model-name", help="name of the base model in `model` (default: the folder's name)")
    serve.add_argument("--default-adapter", metavar="NAME", help="adapter the TEI routes use when `model` is absent")
    add_limit_arguments(serve, "limits and batching (per replica)")
    serve.set_defaults(handler=cmd_serve_ray)
