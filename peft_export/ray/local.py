"""The Ray instance peft-export starts for a local job (``embed --ray`` and ``serve-ray`` without ``--address``).

Ray's interfaces (GCS, raylet, object manager, workers, the dashboard agent) run any code a client sends, and a
Ray instance started by ``ray.init()`` on Linux listens on every interface of the machine. The instance started
here listens on loopback only: Ray puts every server on the node's IP address, and it takes the loopback address
as the node's IP where it runs as a single machine (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the setting it uses
on macOS and Windows); the processes it starts inherit that setting from this one. Ray Serve replicas bind one
more server to every interface whatever the node's address; ``keep_replica_grpc_on_loopback`` (called by each
replica) binds it to loopback too.

For ``serve-ray``, Ray Serve's HTTP proxy also gets ``proxy_middlewares`` (through Ray's
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): a request whose replica died before answering gets a JSON 503
with Retry-After instead of the proxy's ``500 Internal Server Error`` in text/plain.

Joining a cluster (``--address``, or ``RAY_ADDRESS``) changes nothing on the cluster: how to fence one is in
docs/scaling.md.
"""

from __future__ import annotations

import logging
import os
import sys

from ..errors import require

logger = logging.getLogger("peft_export.ray")

LOOPBACK = "127.0.0.1"
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "peft_export.ray.proxy:proxy_middlewares"


def starts_local_instance(address: str | None) -> bool:
    """Whether ``init_ray(address)`` starts a Ray instance here (no address given, none in RAY_ADDRESS)."""
    return address in (None, "local") and not os.environ.get("RAY_ADDRESS")


def init_ray(address: str | None = None, *, serve_proxy: bool = False, **local_options) -> None:
    """Join the Ray cluster at ``address`` (or RAY_ADDRESS), else start a local instance that listens on loopback
    only. ``serve_proxy``: the instance will run Ray Serve; its proxy answers lost requests with JSON 503.
    ``local_options`` (``num_cpus``, ``log_to_driver``, ...) go to ``ray.init`` when it starts the local instance."""
    if not starts_local_instance(address):
        ray = require("ray", "ray")
        ray.init(address=address, include_dashboard=False, configure_logging=False)
        return
    os.environ[SINGLE_MACHINE_ENV] = "0"  # read by every Ray process this one starts, when it imports ray
    if serve_proxy:
        os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    ray = require("ray", "ray")
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and getattr(constants, "ENABLE_RAY_CLUSTER", False):
        # Ray was imported before the setting above: this process read it already (the processes it starts read
        # it afresh).
        constants.ENABLE_RAY_CLUSTER = False
    ray.init(address="local", _node_ip_address=LOOPBACK, include_dashboard=False, configure_logging=False,
             **local_options)
    node_ip = ray.util.get_node_ip_address()
    if node_ip not in (LOOPBACK, "::1"):
        logger.warning("the local Ray instance took %s as its address instead of loopback: its interfaces are "
                       "reachable from other machines (see docs/scaling.md)", node_ip)


def keep_replica_grpc_on_loopback() -> None:
    """In a Ray Serve replica of a loopback instance: bind the replica's inter-deployment gRPC server to loopback.

    Ray Serve (2.60) binds that server to every interface (``"[::]:0"``, written in ray/serve/_private/replica.py)
    whatever the node's address; the replica binds it after its constructor ran, so the constructor calls this.
    On a node with any other address (a cluster) nothing changes.
    """
    import ray

    if ray.util.get_node_ip_address() not in (LOOPBACK, "::1"):
        return
    try:
        from ray.serve._private import replica as replica_module
    except ImportError:
        return
    original = getattr(replica_module, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "peft_export_loopback", False):
        return

    def add_port_on_loopback(server, address: str):
        host, _, port = address.rpartition(":")
        return original(server, f"{LOOPBACK}:{port}" if host in ("[::]", "0.0.0.0", "") else address)

    add_port_on_loopback.peft_export_loopback = True
    replica_module.add_port_to_grpc_server = add_port_on_loopback
