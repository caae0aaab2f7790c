"""The gateway process: wiring, its own endpoints, start and graceful stop.

`Gateway` puts together discovery, the router, the proxy, keys, metrics and
tracing behind one aiohttp server, and serves `/healthz` (the process answers),
`/readyz` (discovery has a first snapshot and no shutdown is under way),
`/metrics`, and `/demand` (per model, requests waiting, in flight and received:
what the operator polls to scale models; `gateway.demand`). `Gateway.stop` is the
graceful shutdown: report not ready, keep serving for `shutdown_delay` while
endpoints update, stop listening, let the requests in flight (held ones and
streams) finish for up to `drain_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver
from prometheus_client import CONTENT_TYPE_LATEST

from mesh_operator.gateway.admission import Router
from mesh_operator.gateway.auth import KeyReloader
from mesh_operator.gateway.demand import demand
from mesh_operator.gateway.discovery import DiscoverySource
from mesh_operator.gateway.metrics import GatewayMetrics
from mesh_operator.gateway.proxy import Proxy, error_middleware
from mesh_operator.gateway.settings import GatewaySettings
from mesh_operator.gateway.tracing import Tracing, setup_tracing
from mesh_operator.gateway.upstream import IDLE, HostClient

log = logging.getLogger(__name__)

HEALTH_PATH = "/health"


class Gateway:
    """One gateway server; `start`, then `stop` (graceful) once."""

    def __init__(
        self,
        settings: GatewaySettings,
        source: DiscoverySource,
        *,
        keys: KeyReloader | None = None,
        tracing: Tracing | None = None,
        metrics: GatewayMetrics | None = None,
        resolver: AbstractResolver | None = None,
    ) -> None:
        self.settings = settings
        self.source = source
        self.keys = keys
        self.tracing = tracing or setup_tracing(None)
        self.metrics = metrics or GatewayMetrics()
        # How host names in FQDN EndpointSlices or static URLs are resolved
        # (default: aiohttp's, i.e. the system resolver in a thread).
        self._resolver = resolver
        self.draining = False
        self.port = 0
        self.router: Router | None = None
        self._session: aiohttp.ClientSession | None = None
        self._client: HostClient | None = None
        self._runner: web.AppRunner | None = None

    @property
    def client(self) -> HostClient | None:
        """The client of requests to hosts (None before `start`)."""
        return self._client

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.settings.host in ("0.0.0.0", "") else self.settings.host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        settings = self.settings
        # Health probes of hosts only; requests go through `upstream.HostClient`.
        # Idle connections are dropped before llama-server's own keep-alive
        # timeout (cpp-httplib: 5 s) would close them under us.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=0, keepalive_timeout=IDLE, resolver=self._resolver
            ),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout),
            skip_auto_headers=("User-Agent",),
        )
        self._client = HostClient(
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            resolver=self._resolver,
        )
        self.router = Router(
            self._probe,
            max_queue=settings.max_queue,
            routing=settings.routing,
            prefix_chars=settings.prefix_chars,
        )
        self.metrics.watch(self.router)
        if self.keys is not None:
            await self.keys.start()
        await self.source.start(self.router.apply)

        proxy = Proxy(
            self.router,
            self._client,
            metrics=self.metrics,
            tracer=self.tracing.tracer,
            settings=settings,
            keys=self.keys.ring if self.keys is not None else None,
        )
        app = web.Application(middlewares=[error_middleware()])
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/demand", self._demand)
        proxy.add_routes(app)
        self._runner = web.AppRunner(
            app,
            # A client that disconnects cancels its handler, which closes the
            # upstream connection and so stops llama-server's generation.
            handler_cancellation=True,
            shutdown_timeout=settings.drain_timeout,
            access_log=None,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, settings.host, settings.port, backlog=1024)
        await site.start()
        addresses = self._runner.addresses
        self.port = int(addresses[0][1]) if addresses else settings.port
        log.info("gateway listening on %s:%d", settings.host, self.port)

    async def stop(self) -> None:
        """Graceful: finish what is in flight, then release everything."""
        self.draining = True
        if self.settings.shutdown_delay > 0:
            await asyncio.sleep(self.settings.shutdown_delay)
        if self._runner is not None:
            # Stops listening, closes idle keep-alive connections, waits for
            # handlers up to drain_timeout, then cancels what is left.
            await self._runner.cleanup()
        await self.source.stop()
        if self.router is not None:
            await self.router.close()
        if self.keys is not None:
            await self.keys.stop()
        if self._session is not None:
            await self._session.close()
        if self._client is not None:
            await self._client.close()
        await asyncio.to_thread(self.tracing.shutdown)

    async def _probe(self, url: str) -> bool:
        assert self._session is not None
        try:
            async with self._session.get(
                url + HEALTH_PATH,
                timeout=aiohttp.ClientTimeout(total=self.settings.probe_timeout),
            ) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.Response(status=503, text="shutting down\n")
        if not self.source.synced():
            return web.Response(status=503, text="discovery not synced\n")
        return web.Response(text="ok\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _demand(self, request: web.Request) -> web.Response:
        # No key, like /metrics: the operator polls it and it carries only counts.
        return web.json_response(demand(self.router))


async def serve(gateway: Gateway) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await gateway.start()
        await stopping.wait()
        log.info("shutting down: finishing requests in flight")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.remove_signal_handler(sig)
        await gateway.stop()
