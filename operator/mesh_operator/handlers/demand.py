"""Polling the gateways for demand (`mesh_operator.demand`).

The operator reads each gateway pod's `GET /demand` over the pod network, every
`MESH_DEMAND_INTERVAL` seconds: the pods are those `MESH_GATEWAY_SELECTOR` picks
in `MESH_GATEWAY_NAMESPACE` (listed with the pods permission the operator already
has), on port `MESH_GATEWAY_PORT`; an operator outside the cluster may name the
gateways' base URLs in `MESH_GATEWAY_URLS` instead. No gateway writes anything
and no new permission is needed: demand travels as the gateways' own answer to
a GET, which their NetworkPolicy admits from the operator's pods.

A model whose requests start waiting is reconciled at once (it may be scaled to
zero); every other change is seen at the model's next regular look.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mesh_operator.demand import (
    Demand,
    DemandFormatError,
    DemandTracker,
    GatewayReport,
    parse_report,
)
from mesh_operator.handlers import metrics

log = logging.getLogger(__name__)

DEFAULT_INTERVAL = 2.0
# Gateway pods are listed again after this long (a restarted one gets a new IP).
PODS_TTL_SECONDS = 15.0
REQUEST_TIMEOUT = 2.0


@dataclass(frozen=True)
class GatewaySource:
    """Where the gateways are: base URLs given, or pods found by label."""

    urls: tuple[str, ...] = ()
    namespace: str = ""
    selector: str = ""
    port: int = 0

    @classmethod
    def from_env(cls) -> GatewaySource | None:
        """The source the environment names; None when it names none."""
        urls = [u.strip().rstrip("/") for u in os.environ.get("MESH_GATEWAY_URLS", "").split(",")]
        if any(urls):
            return cls(urls=tuple(u for u in urls if u))
        selector = os.environ.get("MESH_GATEWAY_SELECTOR", "")
        if not selector:
            return None
        return cls(
            namespace=os.environ.get("MESH_GATEWAY_NAMESPACE")
            or os.environ.get("POD_NAMESPACE")
            or "default",
            selector=selector,
            port=int(os.environ.get("MESH_GATEWAY_PORT", "8000")),
        )


def fetch_report(base_url: str, timeout: float = REQUEST_TIMEOUT) -> GatewayReport | None:
    """One gateway's /demand; None (logged) when it cannot be read."""
    try:
        with urllib.request.urlopen(f"{base_url}/demand", timeout=timeout) as answer:
            return parse_report(base_url, json.loads(answer.read()))
    except (OSError, ValueError, DemandFormatError) as exc:
        log.warning("demand: %s/demand: %s", base_url, exc)
        return None


class DemandPoller:
    """A thread that polls every gateway and keeps the tracker."""

    def __init__(
        self,
        source: GatewaySource,
        list_pods: Callable[[str, str], list[str]] | None = None,
        on_waiting: Callable[[str], None] | None = None,
        interval: float = DEFAULT_INTERVAL,
        fetch: Callable[[str], GatewayReport | None] = fetch_report,
    ) -> None:
        self.source = source
        self.tracker = DemandTracker()
        self._list_pods = list_pods
        self._on_waiting = on_waiting
        self._interval = interval
        self._fetch = fetch
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pods: tuple[list[str], float] | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="mesh-demand", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def demand(self, key: str) -> Demand | None:
        with self._lock:
            return self.tracker.demand(key)

    def gateways(self) -> list[str]:
        """The gateways' base URLs."""
        src = self.source
        if src.urls:
            return list(src.urls)
        if self._list_pods is None:
            return []
        cached = self._pods
        if cached is None or time.monotonic() - cached[1] > PODS_TTL_SECONDS:
            try:
                ips = self._list_pods(src.namespace, src.selector)
            except Exception as exc:  # the API may be briefly away: keep the last list
                log.warning("demand: listing the gateway pods failed: %s", exc)
                ips = cached[0] if cached is not None else []
            else:
                ips = [f"http://{_host(ip)}:{src.port}" for ip in ips]
            cached = (ips, time.monotonic())
            self._pods = cached
        return list(cached[0])

    def poll(self, now: dt.datetime | None = None) -> list[str]:
        """Read every gateway once; the models whose requests started waiting."""
        urls = self.gateways()
        reports: Sequence[GatewayReport | None] = [self._fetch(url) for url in urls]
        for report in reports:
            metrics.DEMAND_POLLS.labels(outcome="ok" if report is not None else "error").inc()
        with self._lock:
            woke = self.tracker.observe(now or dt.datetime.now(dt.UTC), reports)
        if self._on_waiting is not None:
            for key in woke:
                self._on_waiting(key)
        return woke

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # a bug must not stop demand reading for good
                log.exception("demand: poll failed")
            self._stop.wait(self._interval)


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip
