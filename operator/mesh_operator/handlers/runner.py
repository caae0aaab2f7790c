"""The operator process: metrics, liveness, leader election, then kopf.

With leader election (the default) every replica starts as a standby that only
answers its liveness probe and tries to take the Lease; the one holding it runs
kopf and the work queue, renewing the Lease all along. A leader that cannot
renew for most of the Lease's duration exits at once (status 1: its pod
restarts as a standby) rather than act beside a new leader. A leader told to
stop (SIGTERM) stops kopf, then gives the Lease up so a standby takes over
without waiting for it to run out.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType

import kopf
from prometheus_client import start_http_server

from mesh_operator import kubeclient
from mesh_operator.handlers.leader import LeaderElector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Election:
    namespace: str
    lease: str
    identity: str


def default_election(lease: str) -> Election:
    """The Lease in the operator's own namespace, held under the pod's name."""
    return Election(
        namespace=os.environ.get("POD_NAMESPACE") or "default",
        lease=lease,
        identity=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
    )


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.path == "/healthz"
        self.send_response(200 if ok else 404)
        self.end_headers()
        if ok:
            self.wfile.write(b"standby\n")

    def log_message(self, format: str, *args: object) -> None:
        pass


def run(health: tuple[str, int], metrics: tuple[str, int], election: Election | None) -> int:
    # Importing registers the handlers with kopf's default registry.
    importlib.import_module("mesh_operator.handlers.registration")
    start_http_server(metrics[1], addr=metrics[0])
    elector = None
    if election is not None:
        elector = _lead(health, election)
        if elector is None:
            return 0
    stop_renewing = threading.Event()
    if elector is not None:
        elector.keep(_lost, stop_renewing)
    try:
        asyncio.run(
            kopf.operator(
                clusterwide=True,
                standalone=True,
                liveness_endpoint=f"http://{health[0]}:{health[1]}/healthz",
            )
        )
    finally:
        stop_renewing.set()
        if elector is not None:
            elector.release()
    return 0


def _lead(health: tuple[str, int], election: Election) -> LeaderElector | None:
    """Stand by until this replica holds the Lease; None when told to stop first."""
    server = ThreadingHTTPServer(health, _Healthy)
    threading.Thread(target=server.serve_forever, name="mesh-standby-health", daemon=True).start()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        elector = LeaderElector(
            kubeclient.api_client(timeout=5.0),
            namespace=election.namespace,
            name=election.lease,
            identity=election.identity,
        )
        held = elector.wait_for_leadership(stop)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        server.shutdown()
        server.server_close()
    return elector if held else None


def _lost() -> None:
    log.error("leadership lost: exiting so that only the new leader acts")
    logging.shutdown()
    sys.stderr.flush()
    os._exit(1)
