"""The agent loop: read, judge, publish, serve; and its configuration.

Every interval the agent reads its inventory and probes its RPC servers (in a
worker thread: both block), builds the MeshNode status, swaps the metrics
snapshot, and applies the status (in a worker thread). A failed write is retried
with jittered exponential backoff; nothing in the loop raises out of it, so
/metrics keeps serving whatever happens to NVML, the GPUs or the API server. Each
change of state (NVML, a GPU, the API, an RPC server, node health) is logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from kubernetes import client

from mesh_agent import __version__
from mesh_agent.discovery import discover_rpc_targets
from mesh_agent.health import HealthRules
from mesh_agent.inventory import CollectorConfig, InventoryCollector
from mesh_agent.inventory.nvml import MESH_SERVER_NAMES, NvmlLib, NvmlReader, load_nvml
from mesh_agent.metrics import AgentMetrics, Snapshot
from mesh_agent.publisher import AGENT_FIELD_MANAGER, MeshNodePublisher, PublishError
from mesh_agent.report import build_status
from mesh_agent.rpc_liveness import (
    RpcProbe,
    RpcTarget,
    SocketRow,
    probe,
    read_socket_rows,
    socket_sources,
)
from mesh_agent.rtt import Peer, RttProber, RttSettings, advertised_endpoint, list_peers
from mesh_agent.server import build_app, start
from mesh_agent.transitions import TransitionLog
from mesh_operator.api.heartbeat import STALE_INTERVALS
from mesh_operator.api.meshnode import MeshNodeStatus
from mesh_operator.kubeclient import api_client

log = logging.getLogger("mesh_agent")

T = TypeVar("T")


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    interval_seconds: int = 10
    listen_host: str = "0.0.0.0"
    listen_port: int = 9464
    kubeconfig: Path | None = None
    address: str | None = None
    rpc_targets: tuple[RpcTarget, ...] = ()
    # Also probe the RPC servers of the operator's worker pods on this node.
    discover_rpc: bool = True
    rpc_timeout_seconds: float = 1.0
    nvml_module: str = "pynvml"
    nvml_retry_seconds: float = 60.0
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    rules: HealthRules = field(default_factory=HealthRules)
    backoff_base_seconds: float = 1.0
    rtt: RttSettings = field(default_factory=RttSettings)

    @property
    def backoff_cap_seconds(self) -> float:
        # Long enough to spare a struggling API server, short enough that the first
        # heartbeat after it recovers comes well within the staleness window.
        return max(30.0, 2.0 * self.interval_seconds)


def backoff_delay(failures: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: half to all of min(cap, base * 2^(n-1))."""
    ceiling = min(cap, base * 2 ** max(0, failures - 1))
    return rng.uniform(ceiling / 2, ceiling)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        *,
        nvml_factory: Callable[[], NvmlLib] | None = None,
        api_factory: Callable[[], client.ApiClient] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.transitions = TransitionLog()
        self.metrics = AgentMetrics(config.node_name)
        factory = nvml_factory or (lambda: load_nvml(config.nvml_module))
        self._nvml = NvmlReader(
            factory, transitions=self.transitions, retry_seconds=config.nvml_retry_seconds
        )
        self.collector = InventoryCollector(config.collector, self._nvml)
        # retries=0: the loop retries with jittered backoff; urllib3 retrying under
        # it would multiply the wait and hide the failure.
        self._api_factory = api_factory or (
            lambda: api_client(config.kubeconfig, retries=0, user_agent=AGENT_FIELD_MANAGER)
        )
        self._publisher: MeshNodePublisher | None = None
        self._discovery_api: client.ApiClient | None = None
        self._rng = rng or random.Random()
        self.failures = 0
        self.cycles = 0
        self.port: int | None = None
        self._last_loop = time.monotonic()
        self._loop_task: asyncio.Task[None] | None = None
        # One worker thread for all blocking work (it runs in sequence anyway):
        # every extra thread costs the agent a malloc arena of resident memory.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-agent")
        self._peers_api: client.ApiClient | None = None
        self.rtt = RttProber(
            config.node_name,
            config.rtt,
            list_peers=self._list_peers,
            blocking=self._blocking,
            transitions=self.transitions,
            rng=self._rng,
        )

    async def _blocking(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, call)

    # -- checks for the HTTP server -------------------------------------------

    def liveness(self) -> tuple[bool, str]:
        if self._loop_task is not None and self._loop_task.done():
            return False, "agent loop stopped"
        silent = time.monotonic() - self._last_loop
        limit = self.config.backoff_cap_seconds + self.config.interval_seconds + 120
        if silent > limit:
            return False, f"agent loop silent for {silent:.0f}s"
        return True, "ok"

    def readiness(self) -> tuple[bool, str]:
        if self.cycles == 0:
            return False, "first inventory not done"
        last = self.metrics.stats.last_success_monotonic
        if last is None:
            return False, "MeshNode not written yet"
        age = time.monotonic() - last
        if age > STALE_INTERVALS * self.config.interval_seconds:
            return False, f"last MeshNode write {age:.0f}s ago"
        return True, "ok"

    # -- one cycle -------------------------------------------------------------

    def _targets(self) -> tuple[RpcTarget, ...]:
        targets = list(self.config.rpc_targets)
        if self.config.discover_rpc:
            try:
                if self._discovery_api is None:
                    self._discovery_api = self._api_factory()
                found = discover_rpc_targets(self._discovery_api, self.config.node_name)
            except Exception as exc:  # the API may be down: probe what is known
                self.transitions.record(
                    "discovery", "failing", f"RPC server discovery failing: {exc}"
                )
                self._discovery_api = None
                found = ()
            else:
                self.transitions.record("discovery", "ok", "RPC server discovery working")
            targets += [t for t in found if t not in targets]
        return tuple(targets)

    def _probe_all(self) -> tuple[RpcProbe, ...]:
        targets = self._targets()
        if not targets:
            return ()
        # Which processes' tables to read is found once per cycle; the tables
        # themselves are read afresh by each look (the probe waits on them).
        sources = socket_sources(self.config.collector.host.proc, MESH_SERVER_NAMES)

        def rows() -> list[SocketRow] | None:
            return read_socket_rows(sources)

        return tuple(
            probe(t, timeout=self.config.rpc_timeout_seconds, socket_rows=rows) for t in targets
        )

    def _list_peers(self) -> list[Peer]:
        if self._peers_api is None:
            self._peers_api = self._api_factory()
        try:
            return list_peers(self._peers_api, self.config.node_name)
        except Exception:
            self._peers_api = None  # a new client next time (rotated credentials)
            raise

    def _publish(self, status: MeshNodeStatus) -> None:
        if self._publisher is None:
            self._publisher = MeshNodePublisher(self._api_factory(), self.config.node_name)
        self._publisher.publish(status)

    async def cycle(self) -> bool:
        """One read-judge-publish round; True when the MeshNode was written."""
        started = time.monotonic()
        inventory = await self._blocking(self.collector.collect)
        probes = await self._blocking(self._probe_all)
        round_trips, round_trip_ms = self.rtt.report(time.monotonic())
        status = build_status(
            inventory,
            probes,
            now=dt.datetime.now(dt.UTC),
            interval_seconds=self.config.interval_seconds,
            rules=self.config.rules,
            agent_version=__version__,
            address=self.config.address,
            probe_endpoint=(
                advertised_endpoint(self.config.listen_host, self.port)
                if self.port is not None and self.config.rtt.enabled
                else None
            ),
            round_trips=round_trips,
            round_trip_ms=round_trip_ms,
        )
        snapshot = Snapshot(inventory, status, probes, time.monotonic() - started)
        self.metrics.update(snapshot)
        self.cycles += 1
        for p in probes:
            key = f"rpc/{p.target.host}:{p.target.port}"
            self.transitions.record(
                key,
                p.state.value.lower(),
                f"RPC server {p.target.model or '-'} at {p.target.host}:{p.target.port}: "
                f"{p.state.value} ({p.detail})",
            )
        health = status.health
        detail = f": {health.message}" if health.message else ""
        self.transitions.record(
            "health",
            f"{health.state.lower()}:{health.reason}",
            f"node health {health.state} ({health.reason}){detail}",
        )
        try:
            await self._blocking(lambda: self._publish(status))
        except PublishError as exc:
            self.metrics.stats.count(exc.kind)
            self.transitions.record("api", f"failing:{exc.kind}", f"MeshNode write failing: {exc}")
            if exc.kind in ("unreachable", "unauthorized"):
                # A new client next time: credentials may have rotated, the
                # connection pool may hold dead sockets.
                self._publisher = None
            return False
        except Exception as exc:  # the client's own bugs must not end the agent
            self.metrics.stats.count("error")
            self.transitions.record("api", "failing:error", f"MeshNode write failing: {exc!r}")
            self._publisher = None
            return False
        self.metrics.stats.count("ok")
        self.metrics.stats.last_success_monotonic = time.monotonic()
        self.transitions.record("api", "ok", f"MeshNode {self.config.node_name} written")
        return True

    async def _loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            self._last_loop = started
            try:
                ok = await self.cycle()
            except Exception:
                # Inventory code failing in a way nobody foresaw: log it with its
                # traceback once per kind, keep the loop and the endpoint alive.
                log.exception("agent cycle failed")
                ok = False
            self._last_loop = time.monotonic()
            if ok:
                self.failures = 0
                delay = max(0.0, self.config.interval_seconds - (time.monotonic() - started))
            else:
                self.failures += 1
                delay = backoff_delay(
                    self.failures,
                    self.config.backoff_base_seconds,
                    self.config.backoff_cap_seconds,
                    self._rng,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=delay)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve and loop until `stop` is set."""
        app = build_app(self.metrics, liveness=self.liveness, readiness=self.readiness)
        runner, self.port = await start(app, self.config.listen_host, self.config.listen_port)
        log.info(
            "mesh agent %s for node %s: every %ds, serving on %s:%d",
            __version__,
            self.config.node_name,
            self.config.interval_seconds,
            self.config.listen_host,
            self.port,
        )
        self._loop_task = asyncio.create_task(self._loop(stop))
        probing = asyncio.create_task(self.rtt.run(stop)) if self.config.rtt.enabled else None
        try:
            await self._loop_task
        finally:
            if probing is not None:
                probing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await probing
            await runner.cleanup()
            await self._blocking(self.collector.close)
            self._worker.shutdown(wait=False)
            self.metrics.shutdown()
            log.info("mesh agent stopped")
