"""Gateway cost: the same requests straight to llama-server and through `mesh gateway`.

    python -m bench gateway [--rounds 5] [--probe 30] [--clients 64] [--max-tokens 32]

One llama-server (gemma-3-270m, `-np --slots`, `-t 1`) and one gateway process in
front of it; an instant stand-in host (`standin`, its own process and its own
gateway) beside them. The run is `--rounds` rounds; each round has a direct and a
gateway phase of every measurement, in alternating order (direct first in even
rounds, gateway first in odd ones), so drift on the machine hits both paths alike:

- Load: `--clients` concurrent clients, each sending `--requests` streaming chat
  completions with fixed prompts, `temperature 0` and `ignore_eos`, so every
  request generates exactly `--max-tokens` tokens. Throughput is completion
  tokens per second of wall time; the round's ratio is gateway / direct.
- Added latency, one request at a time: `--probe` pairs of single requests
  (direct and gateway, the pair's order alternating) against llama-server (one
  token from one fixed prompt it keeps in its cache, so the answer takes nearly
  the same time every time), non-streamed and streamed; the round's figure is the
  p50 of the paired differences gateway - direct. The client keeps connections
  alive for non-streamed requests; for streamed ones it opens one per request on
  both paths, because llama-server closes the connection after every stream.
- The same probe against the instant stand-in host leaves only the gateway's
  own cost.

With `--separate-cores`, llama-server runs on one core and everything else (the
gateways, the stand-in, the clients) on the others, as in a cluster, where the
gateway runs on another node than its hosts (docs/gateway.md, "Benchmark": on
this 2-vCPU machine the gateway got slower so, not faster).

The gateway's CPU time per request comes from /proc. Printed: every round's
figures, then for each the median over the rounds and its spread (min - max), so
the noise is reported rather than hidden.
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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp

from e2e import parts
from e2e.gateway import GatewayProcess, llama_args, start_gateway
from e2e.llama import start_llama_server
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


@dataclass
class Probe:
    """Paired single requests: p50 of the differences gateway - direct, in ms."""

    added_ttft_ms: float
    added_e2e_ms: float
    direct_e2e_ms: float
    gateway_cpu_ms: float


@dataclass
class Round:
    order: str
    direct: Phase
    gateway: Phase
    load_cpu_ms: float
    plain: Probe
    stream: Probe
    standin_plain: Probe
    standin_stream: Probe

    @property
    def ratio(self) -> float:
        return self.gateway.throughput / self.direct.throughput


@dataclass
class Target:
    """What one round is measured against: a host and the gateway in front of it."""

    direct: str
    gateway: GatewayProcess
    model: str


def payload(
    index: int, max_tokens: int, *, model: str = "bench", stream: bool = True
) -> dict[str, object]:
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[index % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


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
    if body.get("stream") is True:
        for event in tail.split(b"\n\n"):
            if b'"usage"' in event:
                usage = json.loads(event.removeprefix(b"data: "))["usage"]
                tokens = int(usage["completion_tokens"])
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
        ttft_p50=statistics.median(s.ttft for s in samples) if samples else 0.0,
        e2e_p50=statistics.median(s.e2e for s in samples) if samples else 0.0,
        errors=errors,
    )


async def probe(target: Target, count: int, *, stream: bool, gateway_first: bool) -> Probe:
    """`count` pairs of single requests, one at a time, the pair's order alternating."""
    body = payload(0, 1, model=target.model, stream=stream)
    ttft: list[float] = []
    e2e: list[float] = []
    direct_e2e: list[float] = []
    # Keep-alive where the host allows it: llama-server closes after a stream.
    connector = aiohttp.TCPConnector(force_close=stream)
    async with aiohttp.ClientSession(connector=connector) as session:
        # One unmeasured pair: connections and the host's prompt cache warm.
        await one(session, target.direct, body)
        await one(session, target.gateway.url, body)
        # The gateway's CPU over the whole block: it idles while the host answers directly.
        cpu_before = cpu_seconds(target.gateway.proc.pid)
        for index in range(count):
            first_gateway = (index % 2 == 0) == gateway_first
            samples: dict[bool, Sample] = {}
            for through_gateway in (first_gateway, not first_gateway):
                url = target.gateway.url if through_gateway else target.direct
                samples[through_gateway] = await one(session, url, body)
            ttft.append(samples[True].ttft - samples[False].ttft)
            e2e.append(samples[True].e2e - samples[False].e2e)
            direct_e2e.append(samples[False].e2e)
        cpu = cpu_seconds(target.gateway.proc.pid) - cpu_before
    return Probe(
        added_ttft_ms=statistics.median(ttft) * 1000,
        added_e2e_ms=statistics.median(e2e) * 1000,
        direct_e2e_ms=statistics.median(direct_e2e) * 1000,
        gateway_cpu_ms=cpu * 1000 / count,
    )


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of `pid`: schedstat's nanoseconds, else /proc's ticks."""
    try:
        return (
            sum(
                int((task / "schedstat").read_text().split()[0])
                for task in Path(f"/proc/{pid}/task").iterdir()
            )
            / 1e9
        )
    except (OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench gateway",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of direct+gateway phases")
    parser.add_argument("--probe", type=int, default=30, help="request pairs per probe and round")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=1, help="requests per client per phase")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=8, help="llama-server -np")
    parser.add_argument(
        "--separate-cores",
        action="store_true",
        help="llama-server on one core, the gateways, stand-in and clients on the others",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.probe < 1:
        parser.error("--rounds and --probe must be at least 1")
    if args.separate_cores and len(os.sched_getaffinity(0)) < 2:
        parser.error("--separate-cores needs at least 2 cores")
    return args


def core_split(separate: bool) -> tuple[set[int], set[int]]:
    """The cores of llama-server and of everything else: all of them for both,
    or with `separate` the lowest one for llama-server and the rest for the others."""
    cores = os.sched_getaffinity(0)
    if not separate:
        return cores, cores
    host = {min(cores)}
    return host, cores - host


async def one_round(args: argparse.Namespace, number: int, host: Target, standin: Target) -> Round:
    # Alternate which path goes first, so a trend in the machine's load does not
    # always favour the same one.
    gateway_first = number % 2 == 1
    order = ("gateway", "direct") if gateway_first else ("direct", "gateway")
    phases: dict[str, Phase] = {}
    load_cpu = 0.0
    for path in order:
        url = host.gateway.url if path == "gateway" else host.direct
        before = cpu_seconds(host.gateway.proc.pid)
        phases[path] = await phase(path, url, args.clients, args.requests, args.max_tokens)
        if path == "gateway":
            load_cpu = cpu_seconds(host.gateway.proc.pid) - before
    probes = {
        (target.model, stream): await probe(
            target, args.probe, stream=stream, gateway_first=gateway_first
        )
        for target in (host, standin)
        for stream in (False, True)
    }
    return Round(
        order="/".join(order),
        direct=phases["direct"],
        gateway=phases["gateway"],
        load_cpu_ms=load_cpu * 1000 / max(phases["gateway"].requests, 1),
        plain=probes[host.model, False],
        stream=probes[host.model, True],
        standin_plain=probes[standin.model, False],
        standin_stream=probes[standin.model, True],
    )


@dataclass(frozen=True)
class Figure:
    label: str
    fmt: str
    read: Callable[[Round], float]


# Every figure of a round, by its name in the JSON output.
FIGURES = {
    "throughput_ratio": Figure("throughput ratio gateway/direct", ".3f", lambda r: r.ratio),
    "direct_tok_s": Figure("throughput direct, tokens/s", ".1f", lambda r: r.direct.throughput),
    "gateway_tok_s": Figure(
        "throughput through the gateway, tokens/s", ".1f", lambda r: r.gateway.throughput
    ),
    "added_p50_ms_non_streamed": Figure(
        "added p50 ms, non-streamed", "+.2f", lambda r: r.plain.added_e2e_ms
    ),
    "added_p50_ms_streamed_ttft": Figure(
        "added p50 ms, streamed, first token", "+.2f", lambda r: r.stream.added_ttft_ms
    ),
    "added_p50_ms_streamed_e2e": Figure(
        "added p50 ms, streamed, end to end", "+.2f", lambda r: r.stream.added_e2e_ms
    ),
    "standin_added_p50_ms_non_streamed": Figure(
        "stand-in host: added p50 ms, non-streamed", "+.2f", lambda r: r.standin_plain.added_e2e_ms
    ),
    "standin_added_p50_ms_streamed_ttft": Figure(
        "stand-in host: added p50 ms, streamed, first",
        "+.2f",
        lambda r: r.standin_stream.added_ttft_ms,
    ),
    "standin_added_p50_ms_streamed_e2e": Figure(
        "stand-in host: added p50 ms, streamed, end",
        "+.2f",
        lambda r: r.standin_stream.added_e2e_ms,
    ),
    "gateway_cpu_ms_per_load_request": Figure(
        "gateway CPU ms per stream under load", ".2f", lambda r: r.load_cpu_ms
    ),
    "gateway_cpu_ms_per_non_streamed_request": Figure(
        "gateway CPU ms per non-streamed probe", ".2f", lambda r: r.plain.gateway_cpu_ms
    ),
    "gateway_cpu_ms_per_streamed_request": Figure(
        "gateway CPU ms per 1-token stream probe", ".2f", lambda r: r.stream.gateway_cpu_ms
    ),
}


async def measure(args: argparse.Namespace, host: Target, standin: Target) -> dict[str, object]:
    # Warm both paths (connection pools, llama-server's first-request costs).
    warm = min(args.clients, args.slots)
    await phase("warmup", host.gateway.url, warm, 1, 4)
    await phase("warmup", host.direct, warm, 1, 4)
    rounds: list[Round] = []
    for number in range(args.rounds):
        rounds.append(await one_round(args, number, host, standin))
        print(f"round {number + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    summary: dict[str, dict[str, float]] = {}
    for name, figure in FIGURES.items():
        values = [figure.read(r) for r in rounds]
        summary[name] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "cpu_cores": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "rounds": [
            asdict(r)
            | {"ratio": r.ratio, "direct_tok_s": r.direct.throughput}
            | {"gateway_tok_s": r.gateway.throughput}
            for r in rounds
        ],
        "summary": summary,
        "errors": sum(r.direct.errors + r.gateway.errors for r in rounds),
    }


def report(figures: dict[str, object]) -> str:
    rounds: list[dict[str, object]] = figures["rounds"]  # type: ignore[assignment]
    summary: dict[str, dict[str, float]] = figures["summary"]  # type: ignore[assignment]
    config: dict[str, object] = figures["config"]  # type: ignore[assignment]
    header = (
        "round", "order", "direct tok/s", "gw tok/s", "ratio",
        "+plain ms", "+stream TTFT", "+stream e2e",
        "stand-in +plain", "+stream e2e", "gw CPU ms/req",
    )  # fmt: skip
    widths = (5, 15, 12, 9, 6, 10, 12, 11, 15, 11, 13)
    lines = [" ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True))]
    for number, r in enumerate(rounds, 1):
        plain: dict[str, float] = r["plain"]  # type: ignore[assignment]
        stream: dict[str, float] = r["stream"]  # type: ignore[assignment]
        s_plain: dict[str, float] = r["standin_plain"]  # type: ignore[assignment]
        s_stream: dict[str, float] = r["standin_stream"]  # type: ignore[assignment]
        cells = (
            f"{number}", f"{r['order']}", f"{r['direct_tok_s']:.1f}", f"{r['gateway_tok_s']:.1f}",
            f"{r['ratio']:.3f}", f"{plain['added_e2e_ms']:+.2f}",
            f"{stream['added_ttft_ms']:+.2f}", f"{stream['added_e2e_ms']:+.2f}",
            f"{s_plain['added_e2e_ms']:+.2f}", f"{s_stream['added_e2e_ms']:+.2f}",
            f"{r['load_cpu_ms']:.2f}",
        )  # fmt: skip
        lines.append(" ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)))

    count = len(rounds)
    lines += [
        "",
        f"medians over {count} rounds (each round: one direct and one gateway phase of each; "
        f"latencies are p50s of {config['probe']} paired differences), spread min to max:",
    ]
    for name, figure in FIGURES.items():
        low, mid, high = (format(summary[name][k], figure.fmt) for k in ("min", "median", "max"))
        lines.append(f"  {figure.label:<46} {mid:>8}   ({low} to {high})")
    cores: dict[str, list[int]] = figures["cores"]  # type: ignore[assignment]
    lines += [
        f"cores: llama-server on {cores['host']}, gateways, stand-in and clients on "
        f"{cores['rest']}",
        f"machine: {figures['cpu_cores']} cores, 1-min load average at the end "
        f"{figures['load_average_1m']:.2f}",
        f"errors: {figures['errors']}",
    ]  # fmt: skip
    return "\n".join(lines)


def start_standin(logs: Path, delay_ms: float = 0.0) -> tuple[subprocess.Popen[bytes], str]:
    """The stand-in host in its own process, once it answers /health: instant,
    or holding each completion `delay_ms`."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (logs / "standin.log").open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.gateway.standin", str(port), str(delay_ms)],
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
    host_cores, rest = core_split(args.separate_cores)
    with contextlib.ExitStack() as stack:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mesh-bench-gw-")))
        # A child starts with its parent's cores: this thread's, set before each start.
        os.sched_setaffinity(0, host_cores)
        host = start_llama_server(
            logs, llama_args(model, "bench", slots=args.slots, ctx=args.slots * 512)
        )
        os.sched_setaffinity(0, rest)
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
        figures = asyncio.run(
            measure(
                args,
                Target(host.url, gw, "bench"),
                Target(standin_url, standin_gw, "standin"),
            )
        )
    figures["cores"] = {"host": sorted(host_cores), "rest": sorted(rest)}
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["errors"] == 0 else 1
