"""The agent's HTTP endpoint (aiohttp, one port): /healthz, /readyz, /metrics and
/rtt, the small answer other nodes' agents time their round trips by (rtt.py).

Handlers only read what the agent loop last stored; rendering /metrics runs the
OpenTelemetry callbacks in a worker thread so a slow scrape never stalls the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from mesh_agent.metrics import AgentMetrics
from mesh_agent.rtt import ECHO_BODY, ECHO_PATH

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"

# (ok, reason) callbacks the agent provides.
Check = Callable[[], tuple[bool, str]]


def build_app(metrics: AgentMetrics, *, liveness: Check, readiness: Check) -> web.Application:
    # Scrapes render on their own single thread: never behind a slow API call of
    # the agent loop, and without the default pool's extra threads.
    renderer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mesh-metrics")

    async def healthz(request: web.Request) -> web.Response:
        ok, reason = liveness()
        return web.Response(status=200 if ok else 503, text=reason + "\n")

    async def readyz(request: web.Request) -> web.Response:
        ok, reason = readiness()
        return web.Response(status=200 if ok else 503, text=reason + "\n")

    async def metrics_handler(request: web.Request) -> web.Response:
        body = await asyncio.get_running_loop().run_in_executor(renderer, metrics.render)
        return web.Response(body=body, headers={"Content-Type": PROMETHEUS_TEXT})

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=ECHO_BODY, content_type="text/plain")

    app = web.Application()
    app.router.add_get(ECHO_PATH, echo)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)

    async def stop_renderer(app: web.Application) -> None:
        renderer.shutdown(wait=False)

    app.on_cleanup.append(stop_renderer)
    return app


async def start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve `app`; return the runner (to clean up) and the bound port (for port 0)."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    addresses = runner.addresses
    bound = int(addresses[0][1]) if addresses else port
    return runner, bound
