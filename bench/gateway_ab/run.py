"""Two versions of the gateway side by side: this tree's and a git revision's.

    python -m bench gateway_ab [--base REV] [--host standin|llama] [--standin-delay-ms 0]
                               [--blocks 6] [--probe 30] [--load CLIENTS]

Both gateways stand in front of the same host (the instant stand-in of
`bench gateway`, answering at once or after `--standin-delay-ms`, or one
llama-server with gemma-3-270m), each in its own process.
The run is `--blocks` blocks; in each, both gateways are probed (`--probe` pairs
of single requests, direct and through the gateway, non-streamed and streamed,
the same probe as `bench gateway`), the base first in even blocks and this tree
first in odd ones, so drift on the machine hits both alike. Printed per version
and kind: the median over the blocks of each block's p50 added latency (first
token and end to end) and gateway CPU per request, and every block's figure.
With `--load CLIENTS` (llama-server only), each block also runs the load phase
of `bench gateway` through each gateway (CLIENTS concurrent streams of 32
tokens): tokens per second, this tree's over the base's in the same block, and
gateway CPU per stream.

The base's code is `git archive REV operator` in a temporary directory, run with
this tree's Python environment. With `--base HEAD` and no change in the tree,
the two rows differ by the machine's noise alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from bench.gateway.run import Phase, Probe, Target, cpu_seconds, phase, probe, start_standin
from e2e import parts
from e2e.gateway import GatewayProcess, llama_args, start_gateway
from e2e.llama import start_llama_server

ROOT = Path(__file__).resolve().parents[2]
SLOTS = 8
LOAD_TOKENS = 32


def checkout(rev: str, into: Path) -> Path:
    """The `operator` tree of `rev`, unpacked under `into`."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "operator"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "operator"


Loads = dict[str, list[tuple[Phase, float]]]


async def measure(
    gateways: dict[str, GatewayProcess],
    host: str,
    model: str,
    args: argparse.Namespace,
) -> tuple[dict[tuple[str, bool], list[Probe]], Loads]:
    names = list(gateways)
    found: dict[tuple[str, bool], list[Probe]] = {(n, s): [] for n in names for s in (False, True)}
    loads: Loads = {n: [] for n in names}
    for block in range(args.blocks):
        order = names if block % 2 == 0 else names[::-1]
        for name in order:
            gateway = gateways[name]
            if args.load:
                before = cpu_seconds(gateway.proc.pid)
                done = await phase(name, gateway.url, args.load, 1, LOAD_TOKENS)
                cpu = cpu_seconds(gateway.proc.pid) - before
                loads[name].append((done, cpu * 1000 / max(done.requests, 1)))
            target = Target(host, gateway, model)
            for stream in (False, True):
                found[name, stream].append(
                    await probe(target, args.probe, stream=stream, gateway_first=block % 2 == 1)
                )
        print(f"block {block + 1}/{args.blocks} done", file=sys.stderr, flush=True)
    return found, loads


def load_report(loads: Loads) -> list[str]:
    base, this = loads["base"], loads["this tree"]
    ratios = [t.throughput / b.throughput for (t, _), (b, _) in zip(this, base, strict=True)]
    lines = [f"load: tokens/s through each gateway, {LOAD_TOKENS}-token streams:"]
    for name, runs in loads.items():
        tok_s = statistics.median(p.throughput for p, _ in runs)
        cpu = statistics.median(c for _, c in runs)
        errors = sum(p.errors for p, _ in runs)
        lines.append(
            f"  {name:<10} {tok_s:>7.1f} tok/s, gateway CPU {cpu:.2f} ms per stream, "
            f"{errors} errors"
        )
    each = ",".join(f"{r:.3f}" for r in ratios)
    lines.append(f"  this tree / base, per block: median {statistics.median(ratios):.3f} ({each})")
    return lines


def report(found: dict[tuple[str, bool], list[Probe]], blocks: int, count: int) -> str:
    lines = [
        f"medians over {blocks} blocks of each block's p50 of {count} paired differences "
        "(gateway - direct), ms:",
        f"{'gateway':<10} {'kind':<9} {'+first':>8} {'+end':>8} {'CPU/req':>8}   +end per block",
    ]
    for (name, stream), probes in found.items():
        kind = "streamed" if stream else "plain"
        ttft = statistics.median(p.added_ttft_ms for p in probes)
        e2e = statistics.median(p.added_e2e_ms for p in probes)
        cpu = statistics.median(p.gateway_cpu_ms for p in probes)
        each = ",".join(f"{p.added_e2e_ms:+.2f}" for p in probes)
        lines.append(f"{name:<10} {kind:<9} {ttft:>+8.2f} {e2e:>+8.2f} {cpu:>8.2f}   {each}")
    lines.append(f"machine: {os.cpu_count()} cores, 1-min load average {os.getloadavg()[0]:.2f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench gateway_ab")
    parser.add_argument("--base", default="HEAD", help="git revision to compare with")
    parser.add_argument("--host", choices=("standin", "llama"), default="standin")
    parser.add_argument(
        "--standin-delay-ms", type=float, default=0.0, help="the stand-in holds each answer"
    )
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--probe", type=int, default=30, help="request pairs per probe")
    parser.add_argument(
        "--load", type=int, default=0, metavar="CLIENTS", help="also a load phase (llama only)"
    )
    args = parser.parse_args(argv)
    if args.load and args.host != "llama":
        parser.error("--load needs --host llama (the stand-in counts no tokens)")
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mesh-bench-ab-")))
        base_code = checkout(args.base, work / "base")
        if args.host == "llama":
            llama = start_llama_server(
                work, llama_args(parts.model_path(), "bench", slots=SLOTS, ctx=SLOTS * 512)
            )
            stack.callback(llama.stop)
            host = llama.url
        else:
            standin, host = start_standin(work, args.standin_delay_ms)
            stack.callback(standin.wait)
            stack.callback(standin.terminate)
        flags = ["--backend", f"bench={host}", "--slots", str(SLOTS)]
        gateways: dict[str, GatewayProcess] = {}
        for name, code in (("base", base_code), ("this tree", ROOT / "operator")):
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(code), str(ROOT)]))
            gateways[name] = start_gateway(work, flags, access_log=False, env=env)
            stack.callback(gateways[name].stop)
        found, loads = asyncio.run(measure(gateways, host, "bench", args))
    held = f", answers held {args.standin_delay_ms:g} ms" if args.host == "standin" else ""
    print(f"base: {args.base}; host: {args.host}{held}")
    print(report(found, args.blocks, args.probe))
    if args.load:
        print("\n".join(load_report(loads)))
    return 0
