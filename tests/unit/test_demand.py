"""Demand from the gateways: parsing their /demand answers, folding polls into one
`Demand` per model, and the poller reading real HTTP servers on loopback."""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from mesh_operator.demand import (
    Demand,
    DemandFormatError,
    DemandTracker,
    GatewayReport,
    ModelLoad,
    parse_report,
)
from mesh_operator.handlers.demand import DemandPoller, GatewaySource, fetch_report

pytestmark = pytest.mark.unit

T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
KEY = "team/gemma"


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def report(gateway: str, waiting: int = 0, busy: int = 0, requests: int = 0) -> GatewayReport:
    return GatewayReport(gateway, {KEY: ModelLoad(waiting, busy, requests)})


def test_parse_report_takes_the_contract_and_names_what_is_wrong() -> None:
    body = {"models": {KEY: {"waiting": 2, "busy": 1, "requests": 40}}}
    assert parse_report("g", body) == GatewayReport("g", {KEY: ModelLoad(2, 1, 40)})
    assert parse_report("g", {"models": {}}).models == {}
    for bad, why in (
        ([], "has no 'models' object"),
        ({"models": {KEY: 3}}, "entry 'team/gemma' is not an object"),
        ({"models": {KEY: {"waiting": -1, "busy": 0, "requests": 0}}}, "'waiting' is not a count"),
        ({"models": {KEY: {"waiting": 0, "busy": True, "requests": 0}}}, "'busy' is not a count"),
        ({"models": {KEY: {"waiting": 0, "busy": 0}}}, "'requests' is not a count: None"),
    ):
        with pytest.raises(DemandFormatError, match=why):
            parse_report("g", bad)


def test_load_is_summed_over_the_gateways() -> None:
    tracker = DemandTracker()
    woke = tracker.observe(T0, [report("a", waiting=2, busy=1), report("b", busy=3)])
    assert woke == [KEY], "requests started waiting"
    demand = tracker.demand(KEY)
    assert demand is not None
    assert (demand.waiting, demand.busy, demand.load, demand.complete) == (2, 4, 6, True)
    # Still waiting at the next poll: not woken again.
    assert tracker.observe(at(1), [report("a", waiting=1), report("b")]) == []


def test_idle_time_counts_from_the_last_activity_or_the_first_sight() -> None:
    tracker = DemandTracker()
    tracker.observe(T0, [report("a", requests=5)])
    demand = tracker.demand(KEY)
    assert demand is not None and demand.last_active == T0, "first seen: not idle before"
    tracker.observe(at(10), [report("a", requests=5)])
    assert tracker.demand(KEY).last_active == T0  # type: ignore[union-attr]
    # A request came and went between two polls: its counter moved.
    tracker.observe(at(20), [report("a", requests=6)])
    demand = tracker.demand(KEY)
    assert demand is not None and demand.last_active == at(20)
    assert demand.idle_seconds(at(80)) == 60.0
    # A restarted gateway counts from zero: a lower count with requests is activity.
    tracker.observe(at(30), [report("a", requests=2)])
    assert tracker.demand(KEY).last_active == at(30)  # type: ignore[union-attr]
    tracker.observe(at(40), [report("a", requests=0)])
    assert tracker.demand(KEY).last_active == at(30)  # type: ignore[union-attr]
    # Busy is active even without new arrivals.
    tracker.observe(at(50), [report("a", busy=1)])
    demand = tracker.demand(KEY)
    assert demand is not None and demand.last_active == at(50)
    assert demand.idle_seconds(at(99)) == 0.0, "a request in flight is not idle"


def test_a_gateway_that_does_not_answer_makes_the_demand_incomplete() -> None:
    tracker = DemandTracker()
    assert tracker.demand(KEY) is None, "nothing polled yet"
    tracker.observe(T0, [report("a"), None])
    demand = tracker.demand(KEY)
    assert demand is not None and not demand.complete
    tracker.observe(at(1), [report("a"), report("b")])
    assert tracker.demand(KEY).complete  # type: ignore[union-attr]
    # No gateway at all: nothing is known.
    tracker.observe(at(2), [])
    assert tracker.demand(KEY) is None


def test_a_model_no_gateway_knows_any_more_is_forgotten() -> None:
    tracker = DemandTracker()
    tracker.observe(T0, [report("a")])
    tracker.observe(at(1), [GatewayReport("a", {})])
    assert tracker.demand(KEY) is None


def test_the_peak_covers_the_load_in_force_at_the_start_of_the_window() -> None:
    tracker = DemandTracker(keep_seconds=100)
    for second, load in ((0, 1), (10, 4), (20, 4), (30, 0), (200, 0)):
        tracker.observe(at(second), [report("a", busy=load)])
    demand = tracker.demand(KEY)
    assert demand is not None
    # Only changes are kept, and what is older than the kept time goes, except
    # the entry still in force at the cutoff.
    assert demand.history == ((at(30), 0),)
    history = ((at(0), 1), (at(10), 4), (at(30), 0))
    full = Demand(waiting=0, busy=0, last_active=at(30), history=history)
    assert full.peak_since(at(25)) == 4, "4 held from 10 s to 30 s"
    assert full.peak_since(at(30)) == 0
    assert full.peak_since(at(5)) == 4
    assert full.peak_since(at(0)) == 4
    assert Demand(waiting=2, busy=1, last_active=at(0)).peak_since(at(0)) == 3


# -- the poller over HTTP ------------------------------------------------------------


class _Gateway(BaseHTTPRequestHandler):
    body: ClassVar[Any] = {"models": {}}

    def do_GET(self) -> None:
        if self.path != "/demand":
            self.send_response(404)
            self.end_headers()
            return
        data = json.dumps(type(self).body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[tuple[str, type[_Gateway]]]:
    handler = type("Gateway", (_Gateway,), {"body": {"models": {}}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_the_poller_reads_every_gateway_and_wakes_models_with_waiting_requests(
    gateway: tuple[str, type[_Gateway]],
) -> None:
    url, handler = gateway
    handler.body = {"models": {KEY: {"waiting": 1, "busy": 0, "requests": 1}}}
    woken: list[str] = []
    # A second gateway that refuses connections: the demand is incomplete.
    poller = DemandPoller(GatewaySource(urls=(url, "http://127.0.0.1:9")), on_waiting=woken.append)
    assert poller.poll(T0) == [KEY] and woken == [KEY]
    demand = poller.demand(KEY)
    assert demand is not None and demand.waiting == 1 and not demand.complete
    assert fetch_report(f"{url}/missing") is None, "a 404 is logged, not raised"


def test_the_poller_finds_gateway_pods_by_label() -> None:
    asked: list[tuple[str, str]] = []

    def pods(namespace: str, selector: str) -> list[str]:
        asked.append((namespace, selector))
        return ["10.0.0.7", "fd00::7"]

    source = GatewaySource(namespace="mesh-system", selector="component=gateway", port=8000)
    poller = DemandPoller(source, list_pods=pods, fetch=lambda url: None)
    assert poller.gateways() == ["http://10.0.0.7:8000", "http://[fd00::7]:8000"]
    assert poller.gateways() == ["http://10.0.0.7:8000", "http://[fd00::7]:8000"]
    assert asked == [("mesh-system", "component=gateway")], "listed once per TTL"


def test_the_gateway_source_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MESH_GATEWAY_URLS", "MESH_GATEWAY_SELECTOR", "MESH_GATEWAY_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    assert GatewaySource.from_env() is None
    monkeypatch.setenv("MESH_GATEWAY_SELECTOR", "a=b")
    monkeypatch.setenv("POD_NAMESPACE", "mesh-system")
    monkeypatch.setenv("MESH_GATEWAY_PORT", "8001")
    assert GatewaySource.from_env() == GatewaySource(
        namespace="mesh-system", selector="a=b", port=8001
    )
    monkeypatch.setenv("MESH_GATEWAY_URLS", "http://127.0.0.1:1/, http://127.0.0.1:2")
    assert GatewaySource.from_env() == GatewaySource(
        urls=("http://127.0.0.1:1", "http://127.0.0.1:2")
    )
