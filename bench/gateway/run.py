"""Gateway overhead: the same streaming load straight to llama-server and through `mesh gateway`.

    python -m bench gateway [--clients 64] [--requests 1] [--max-tokens 32] [--rounds 3]

One llama-server (gemma-3-270m, `-np --slots`, `-t 1`) and one gateway process in
front of it. Phases alternate direct / gateway `--rounds` times so drift (thermal,
other work on the machine) hits both alike. Each phase: `--clients` concurrent
clients, each sending `--requests` streaming chat completions with fixed prompts,
`temperature 0` and `ignore_eos`, so every request generates exactly
`--max-tokens` tokens. Reported per path: throughput (completion tokens per
second of wall time), median time to first token and median end-to-end latency;
then the ratio gateway/direct of median throughputs.

A light-load probe follows: `--probe` pairs of requests, one at a time,
alternating direct and gateway, whose paired differences give the latency the
gateway adds when nothing queues; once against llama-server, once against an
instant stand-in host (`standin`, its own process and gateway) that leaves only
the gateway's own cost. The gateway's CPU time per request comes from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

from e2e import parts
from e2e.gateway import GatewayProcess, llama_args, start_gateway
from e2e.llama import LlamaProcess, start_llama_server
from e2e.waiting import free_port

PROMPTS = (
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List some uses of copper.",
    "Describe the smell of rain.",
    "What makes a good cup of tea?",
    "Summarise the water cycle.",
    "Give advice to a new gardener.",
    "Describe a busy train station.",
)


@dataclass
class Sample:
    ttft: float
    e2e: float
    tokens: int


@dataclass
class Phase:
    path: str
    wall: float
    requests: int
    tokens: int
    ttft_p50: float
    e2e_p50: float
    errors: int

    @property
    def throughput(self) -> float:
        return self.tokens / self.wall


def payload(index: int, max_tokens: int, *, model: str = "bench") -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def one(session: aiohttp.ClientSession, url: str, body: dict[str, object]) -> Sample:
    started = time.perf_counter()
    first: float | None = None
    tail = b""
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
        async for chunk in resp.content.iter_any():
            if first is None:
                first = time.perf_counter()
            # The usage event is among the last ones; keep a bounded tail.
            tail = (tail + chunk)[-4096:]
    done = time.perf_counter()
    tokens = 0
    for event in tail.split(b"\n\n"):
        if b'"usage"' in event:
            tokens = int(json.loads(event.removeprefix(b"data: "))["usage"]["completion_tokens"])
    return Sample((first or done) - started, done - started, tokens)


async def phase(path: str, url: str, clients: int, requests: int, max_tokens: int) -> Phase:
    samples: list[Sample] = []
    errors = 0

    async def client(number: int, session: aiohttp.ClientSession) -> None:
        nonlocal errors
        for request in range(requests):
            try:
                samples.append(await one(session, url, payload(number + request, max_tokens)))
            except (aiohttp.ClientError, RuntimeError):
                errors += 1

    # llama-server closes the connection after each streamed answer (while
    # announcing keep-alive): both paths use a fresh connection per request.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(n, session) for n in range(clients)))
        wall = time.perf_counter() - started
    return Phase(
        path=path,
        wall=wall,
        requests=len(samples),
        tokens=sum(s.tokens for s in samples),
        ttft_p50=statistics.median(s.ttft for s in samples),
        e2e_p50=statistics.median(s.e2e for s in samples),
        errors=errors,
    )


async def probe(
    direct: str, gateway: str, count: int, body: dict[str, object]
) -> tuple[float, float]:
    """Median added (TTFT, end-to-end), one request at a time, pairs alternating in order."""
    ttft: list[float] = []
    e2e: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        for index in range(count):
            urls = (direct, gateway) if index % 2 == 0 else (gateway, direct)
            first, second = [await one(session, url, body) for url in urls]
            d, g = (first, second) if urls[0] == direct else (second, first)
            ttft.append(g.ttft - d.ttft)
            e2e.append(g.e2e - d.e2e)
    return statistics.median(ttft) * 1000, statistics.median(e2e) * 1000


async def light_load(
    host: LlamaProcess, gw: GatewayProcess, standin: str, standin_gw: GatewayProcess, count: int
) -> dict[str, float]:
    """Added latency when nothing queues, against llama-server and an instant stand-in.

    Against llama-server: one token from one fixed prompt, which it keeps in its
    cache, so the answer takes nearly the same time every time. Against the
    stand-in: no model at all, so what remains is the gateway.
    """
    ttft, e2e = await probe(host.url, gw.url, count, payload(0, 1))
    stream = payload(0, 1, model="standin")
    plain = {**stream, "stream": False}
    s_ttft, s_e2e = await probe(standin, standin_gw.url, count, stream)
    _, n_e2e = await probe(standin, standin_gw.url, count, plain)
    return {
        "added_ttft_p50_ms": ttft,
        "added_e2e_p50_ms": e2e,
        "standin_added_stream_ttft_p50_ms": s_ttft,
        "standin_added_stream_e2e_p50_ms": s_e2e,
        "standin_added_plain_e2e_p50_ms": n_e2e,
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench gateway", description=__doc__)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=1, help="requests per client per phase")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=8, help="llama-server -np")
    parser.add_argument("--rounds", type=int, default=3, help="direct+gateway phase pairs")
    parser.add_argument("--probe", type=int, default=60, help="light-load request pairs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


async def measure(
    args: argparse.Namespace,
    host: LlamaProcess,
    gw: GatewayProcess,
    standin: str,
    standin_gw: GatewayProcess,
) -> dict[str, object]:
    # Warm both paths (connection pools, llama-server's first-request costs).
    await phase("warmup", gw.url, min(args.clients, args.slots), 1, 4)
    await phase("warmup", host.url, min(args.clients, args.slots), 1, 4)
    phases: list[Phase] = []
    gateway_cpu = 0.0
    for number in range(args.rounds):
        # Alternate which path goes first, so a trend in the machine's load
        # does not always favour the same one.
        order = ("direct", "gateway") if number % 2 == 0 else ("gateway", "direct")
        for path in order:
            url = host.url if path == "direct" else gw.url
            before = cpu_seconds(gw.proc.pid)
            phases.append(await phase(path, url, args.clients, args.requests, args.max_tokens))
            if path == "gateway":
                gateway_cpu += cpu_seconds(gw.proc.pid) - before
    light = await light_load(host, gw, standin, standin_gw, args.probe)

    def median_of(path: str, attr: str) -> float:
        values = [
            getattr(p, attr) if attr != "throughput" else p.throughput
            for p in phases
            if p.path == path
        ]
        return statistics.median(values)

    gateway_requests = sum(p.requests for p in phases if p.path == "gateway")
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "cpu_cores": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "phases": [asdict(p) | {"throughput": p.throughput} for p in phases],
        "direct_throughput_tok_s": median_of("direct", "throughput"),
        "gateway_throughput_tok_s": median_of("gateway", "throughput"),
        "throughput_ratio": median_of("gateway", "throughput") / median_of("direct", "throughput"),
        "direct_ttft_p50_ms": median_of("direct", "ttft_p50") * 1000,
        "gateway_ttft_p50_ms": median_of("gateway", "ttft_p50") * 1000,
        "direct_e2e_p50_ms": median_of("direct", "e2e_p50") * 1000,
        "gateway_e2e_p50_ms": median_of("gateway", "e2e_p50") * 1000,
        "errors": sum(p.errors for p in phases),
        "gateway_cpu_ms_per_request": gateway_cpu * 1000 / max(gateway_requests, 1),
        **light,
    }


def report(figures: dict[str, object]) -> str:
    header = ("phase", "requests", "tokens", "wall s", "tok/s", "TTFT p50 ms", "e2e p50 ms")
    lines = [f"{header[0]:8} " + " ".join(f"{h:>11}" for h in header[1:])]
    for p in figures["phases"]:  # type: ignore[attr-defined]
        lines.append(
            f"{p['path']:8} {p['requests']:>11} {p['tokens']:>11} {p['wall']:>11.1f} "
            f"{p['throughput']:>11.1f} {p['ttft_p50'] * 1000:>11.0f} {p['e2e_p50'] * 1000:>11.0f}"
        )
    lines += [
        "",
        f"throughput ratio gateway/direct (medians): {figures['throughput_ratio']:.3f}",
        f"TTFT p50 under load: direct {figures['direct_ttft_p50_ms']:.0f} ms, "
        f"gateway {figures['gateway_ttft_p50_ms']:.0f} ms",
        f"e2e p50 under load:  direct {figures['direct_e2e_p50_ms']:.0f} ms, "
        f"gateway {figures['gateway_e2e_p50_ms']:.0f} ms",
        f"added latency, one request at a time (p50 of paired differences): "
        f"TTFT {figures['added_ttft_p50_ms']:+.2f} ms, e2e {figures['added_e2e_p50_ms']:+.2f} ms",
        f"  against an instant stand-in host: stream TTFT "
        f"{figures['standin_added_stream_ttft_p50_ms']:+.2f} ms, e2e "
        f"{figures['standin_added_stream_e2e_p50_ms']:+.2f} ms; non-streamed e2e "
        f"{figures['standin_added_plain_e2e_p50_ms']:+.2f} ms",
        f"gateway CPU per request: {figures['gateway_cpu_ms_per_request']:.2f} ms",
        f"machine: {figures['cpu_cores']} cores, 1-min load average at the end "
        f"{figures['load_average_1m']:.2f}",
        f"errors: {figures['errors']}",
    ]
    return "\n".join(lines)


def start_standin(logs: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The instant stand-in host in its own process, once it answers /health."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (logs / "standin.log").open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.gateway.standin", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("the stand-in host did not start")


def main(argv: list[str]) -> int:
    args = parse(argv)
    model = parts.model_path()
    with contextlib.ExitStack() as stack:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mesh-bench-gw-")))
        host = start_llama_server(
            logs, llama_args(model, "bench", slots=args.slots, ctx=args.slots * 512)
        )
        stack.callback(host.stop)
        standin, standin_url = start_standin(logs)
        stack.callback(standin.wait)
        stack.callback(standin.terminate)
        slots = ["--slots", str(args.slots)]
        gw = start_gateway(logs, ["--backend", f"bench={host.url}", *slots], access_log=False)
        stack.callback(gw.stop)
        standin_gw = start_gateway(
            logs, ["--backend", f"standin={standin_url}", *slots], access_log=False
        )
        stack.callback(standin_gw.stop)
        figures = asyncio.run(measure(args, host, gw, standin_url, standin_gw))
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["errors"] == 0 else 1
