"""Routing by prompt prefix against round robin, on two real llama-server replicas.

    python -m bench routing [--prefixes 8] [--per-prefix 32] [--concurrency 8]
                            [--prefix-words 900] [--slots 4] [--max-tokens 8] [--rounds 2]

Two llama-server processes (gemma-3-270m, `-np --slots`, `-t 1`, a context of
1,280 tokens per slot) are the two hosts of one model; two `mesh gateway`
processes stand in front of both, one with `--routing prefix`, one with
`--routing round-robin`. Phases alternate between the two gateways `--rounds`
times (prefix, round robin / round robin, prefix / ...).

Each phase sends the same shape of load: `--prefixes` distinct documents of about
1,000 tokens (deterministic text, new documents in every phase so no phase finds
another's prompts cached), `--per-prefix` chat requests per document, each with a
short question of its own after it, mixed (request n uses document n mod
prefixes, sent in a fixed shuffled order), `--concurrency` at a time, streamed,
`temperature 0`, `ignore_eos`, `--max-tokens` tokens each. Reported per phase:
time to first token (first content chunk) p50/p90, requests/s, completion
tokens/s, and llama-server's own account from each answer's `timings`: prompt
tokens taken from its cache (`cache_n`) against prompt tokens computed
(`prompt_n`); and how requests and computed prompt tokens split over the two
hosts (their /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from e2e import parts
from e2e.gateway import GatewayProcess, llama_args, start_gateway
from e2e.llama import LlamaProcess, start_llama_server

ROUTINGS = ("prefix", "round-robin")
CTX_PER_SLOT = 1280
WORDS = (
    "river", "stone", "lamp", "garden", "window", "market", "letter", "bridge", "winter",
    "orange", "music", "paper", "forest", "candle", "harbor", "signal", "copper", "meadow",
    "thunder", "silver", "valley", "engine", "pocket", "ladder", "mirror", "island", "feather",
    "cotton", "basket", "planet", "shadow", "violin", "wheat", "saddle", "anchor", "canyon",
)  # fmt: skip


@dataclass
class Sample:
    ttft: float
    e2e: float
    completion: int
    cache_n: int
    prompt_n: int


@dataclass
class Phase:
    routing: str
    wall: float
    requests: int
    errors: int
    ttft_p50: float
    ttft_p90: float
    completion_tokens: int
    cache_n: int
    prompt_n: int
    # Per host: requests served and prompt tokens computed (from its /metrics).
    hosts: list[dict[str, float]] = field(default_factory=list)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall


def document(phase: int, number: int, words: int) -> str:
    """A deterministic ~`words`-token text, different for every (phase, number)."""
    rng = random.Random(f"mesh-routing-{phase}-{number}")
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"Document {phase}-{number}. Read it, then answer the question after it.\n{body}"


def payload(text: str, request: int, max_tokens: int) -> dict[str, object]:
    return {
        "model": "bench",
        "messages": [
            {"role": "system", "content": text},
            {"role": "user", "content": f"Question {request}: which word comes first?"},
        ],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def one(session: aiohttp.ClientSession, url: str, body: dict[str, object]) -> Sample:
    started = time.perf_counter()
    first: float | None = None
    buffer = b""
    completion = cache_n = prompt_n = 0
    async with session.post(f"{url}/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
        async for chunk in resp.content.iter_any():
            buffer += chunk
            *events, buffer = buffer.split(b"\n\n")
            for event in events:
                if not event.startswith(b"data: "):
                    if event.strip() and not event.startswith(b":"):
                        raise RuntimeError(f"unexpected event: {event[:300]!r}")
                    continue
                data = event.removeprefix(b"data: ").strip()
                if data == b"[DONE]":
                    continue
                parsed = json.loads(data)
                if "error" in parsed:
                    raise RuntimeError(f"error event: {data[:300]!r}")
                choices = parsed.get("choices") or []
                if first is None and choices and (choices[0].get("delta") or {}).get("content"):
                    first = time.perf_counter()
                if parsed.get("usage"):
                    completion = int(parsed["usage"]["completion_tokens"])
                timings = parsed.get("timings")
                if timings:
                    cache_n = int(timings.get("cache_n", 0))
                    prompt_n = int(timings.get("prompt_n", 0))
    done = time.perf_counter()
    return Sample((first or done) - started, done - started, completion, cache_n, prompt_n)


def host_counters(host: LlamaProcess) -> dict[str, float]:
    """llama-server's own totals: tokens generated and prompt tokens computed."""
    with urllib.request.urlopen(f"{host.url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    wanted = {
        "llamacpp:tokens_predicted_total": "predicted",
        "llamacpp:prompt_tokens_total": "prompt",
    }
    out = {name: 0.0 for name in wanted.values()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[wanted[sample.name]] = sample.value
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def phase(
    number: int, routing: str, url: str, hosts: list[LlamaProcess], args: argparse.Namespace
) -> Phase:
    texts = [document(number, n, args.prefix_words) for n in range(args.prefixes)]
    total = args.prefixes * args.per_prefix
    bodies = [payload(texts[n % args.prefixes], n, args.max_tokens) for n in range(total)]
    # A fixed shuffle: in a periodic order (document n mod 8, two hosts) round
    # robin would send each document to the same host every time by accident.
    random.Random(f"mesh-routing-order-{number}").shuffle(bodies)
    queue: asyncio.Queue[dict[str, object]] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    samples: list[Sample] = []
    errors = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while not queue.empty():
            body = queue.get_nowait()
            try:
                samples.append(await one(session, url, body))
            except (aiohttp.ClientError, RuntimeError) as exc:
                errors += 1
                print(f"request failed: {exc}", file=sys.stderr, flush=True)

    before = [host_counters(h) for h in hosts]
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=900)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(args.concurrency)))
        wall = time.perf_counter() - started
    after = [host_counters(h) for h in hosts]
    per_host = [
        {
            "requests": (a["predicted"] - b["predicted"]) / args.max_tokens,
            "prompt_computed": a["prompt"] - b["prompt"],
        }
        for b, a in zip(before, after, strict=True)
    ]
    ttfts = [s.ttft for s in samples] or [0.0]
    return Phase(
        routing=routing,
        wall=wall,
        requests=len(samples),
        errors=errors,
        ttft_p50=statistics.median(ttfts),
        ttft_p90=percentile(ttfts, 0.9),
        completion_tokens=sum(s.completion for s in samples),
        cache_n=sum(s.cache_n for s in samples),
        prompt_n=sum(s.prompt_n for s in samples),
        hosts=per_host,
    )


async def measure(
    args: argparse.Namespace, hosts: list[LlamaProcess], gateways: dict[str, GatewayProcess]
) -> dict[str, object]:
    # Warm each host once (first-request costs), with a prompt no phase uses.
    async with aiohttp.ClientSession() as session:
        for host in hosts:
            await one(session, host.url, payload("Warm up.", 0, 2))
    phases: list[Phase] = []
    number = 0
    for round_ in range(args.rounds):
        order = ROUTINGS if round_ % 2 == 0 else tuple(reversed(ROUTINGS))
        for routing in order:
            number += 1
            done = await phase(number, routing, gateways[routing].url, hosts, args)
            phases.append(done)
            print(line(done), flush=True)

    def median_of(routing: str, attr: str) -> float:
        values: list[float] = [getattr(p, attr) for p in phases if p.routing == routing]
        return statistics.median(values)

    summary = {
        routing: {
            attr: median_of(routing, attr)
            for attr in ("ttft_p50", "ttft_p90", "requests_per_s", "tokens_per_s")
        }
        | {
            "cache_n": sum(p.cache_n for p in phases if p.routing == routing),
            "prompt_n": sum(p.prompt_n for p in phases if p.routing == routing),
        }
        for routing in ROUTINGS
    }
    return {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "cpu_cores": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "phases": [
            asdict(p) | {"requests_per_s": p.requests_per_s, "tokens_per_s": p.tokens_per_s}
            for p in phases
        ],
        "summary": summary,
        "errors": sum(p.errors for p in phases),
    }


HEADER = (
    f"{'routing':12} {'requests':>8} {'wall s':>7} {'TTFT p50':>9} {'TTFT p90':>9} "
    f"{'req/s':>6} {'tok/s':>6} {'cached':>7} {'computed':>9}  per host: requests / computed"
)


def line(p: Phase) -> str:
    hosts = "  ".join(f"{h['requests']:.0f} / {h['prompt_computed']:.0f}" for h in p.hosts)
    return (
        f"{p.routing:12} {p.requests:>8} {p.wall:>7.1f} {p.ttft_p50:>8.2f}s {p.ttft_p90:>8.2f}s "
        f"{p.requests_per_s:>6.2f} {p.tokens_per_s:>6.1f} {p.cache_n:>7} {p.prompt_n:>9}  {hosts}"
    )


def report(figures: dict[str, object]) -> str:
    summary: dict[str, dict[str, float]] = figures["summary"]  # type: ignore[assignment]
    lines = ["", "medians over the phases of each routing:"]
    for routing, s in summary.items():
        share = s["cache_n"] / max(s["cache_n"] + s["prompt_n"], 1)
        lines.append(
            f"  {routing:12} TTFT p50 {s['ttft_p50']:.2f} s, p90 {s['ttft_p90']:.2f} s, "
            f"{s['requests_per_s']:.2f} requests/s, {s['tokens_per_s']:.1f} tokens/s; "
            f"prompt tokens from cache {share:.1%}"
        )
    prefix, rr = summary["prefix"], summary["round-robin"]
    lines += [
        f"prefix / round robin: TTFT p50 x{prefix['ttft_p50'] / rr['ttft_p50']:.2f}, "
        f"p90 x{prefix['ttft_p90'] / rr['ttft_p90']:.2f}, "
        f"throughput x{prefix['requests_per_s'] / rr['requests_per_s']:.2f}",
        f"machine: {figures['cpu_cores']} cores, 1-min load average at the end "
        f"{figures['load_average_1m']:.2f}",
        f"errors: {figures['errors']}",
    ]
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench routing", description=__doc__)
    parser.add_argument("--prefixes", type=int, default=8, help="distinct documents per phase")
    parser.add_argument("--per-prefix", type=int, default=32, help="requests per document")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--prefix-words", type=int, default=900, help="words per document (~1 token each)"
    )
    parser.add_argument("--slots", type=int, default=4, help="llama-server -np of each host")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="prefix + round-robin phase pairs")
    parser.add_argument(
        "--cache-ram",
        type=int,
        help="llama-server --cache-ram MiB (default: llama-server's own, 8192; 0: off)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    model = parts.model_path()
    extra = ["--cache-ram", str(args.cache_ram)] if args.cache_ram is not None else []
    with contextlib.ExitStack() as stack:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mesh-bench-rt-")))
        hosts: list[LlamaProcess] = []
        for _ in range(2):
            host = start_llama_server(
                logs,
                [
                    *llama_args(model, "bench", slots=args.slots, ctx=args.slots * CTX_PER_SLOT),
                    *extra,
                ],
            )
            stack.callback(host.stop)
            hosts.append(host)
        urls = ",".join(h.url for h in hosts)
        gateways: dict[str, GatewayProcess] = {}
        for routing in ROUTINGS:
            gw = start_gateway(
                logs,
                ["--backend", f"bench={urls}", "--slots", str(args.slots), "--routing", routing],
                access_log=False,
            )
            stack.callback(gw.stop)
            gateways[routing] = gw
        print(
            f"2 hosts, -np {args.slots} -c {args.slots * CTX_PER_SLOT} -t 1"
            f"{' --cache-ram ' + str(args.cache_ram) if extra else ''}; {args.prefixes} "
            f"documents x {args.per_prefix} requests, {args.concurrency} at a time, "
            f"{args.max_tokens} tokens each",
            flush=True,
        )
        print(HEADER, flush=True)
        figures = asyncio.run(measure(args, hosts, gateways))
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if figures["errors"] == 0 else 1
