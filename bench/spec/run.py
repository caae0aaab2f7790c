"""`python -m bench spec`: a split's tokens per second with and without n-gram speculation.

gemma-3-270m Q4_K_M split evenly over local ggml-rpc-server processes (CPU, one
thread each) standing for nodes, every hop through a delay proxy adding the
RTT of a network. Two hosts run side by side, each with its own workers (a
ggml-rpc-server serves one client): one without speculation, one with the
n-gram speculation a MeshModel's `speculative` option sets up, both started
with the operator's command builder. Generations alternate between them
(which goes first alternates too), so the machine's load falls on both alike;
the table gives medians. Acceptance comes from llama-server's own timings
(`draft_n`, `draft_n_accepted`); tokens per step (one pass of the split) is
predicted / (predicted - accepted).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.planner.delay_proxy import delayed, measure_rtt_ms
from e2e import parts
from e2e.llama import LlamaProcess, post_json, running, start_llama_server
from e2e.llama import start_rpc_server as start_worker
from e2e.parts import PartMissingError
from e2e.waiting import free_port
from mesh_operator.api.meshmodel import Plan, PlannedDevice
from mesh_operator.planner import (
    NgramSettings,
    ServerSettings,
    ServingParams,
    build_llama_server_args,
    read_model_profile,
)

PROSE = "Write a short story about a lighthouse keeper who finds a message in a bottle."
# Code whose continuation repeats the pattern before it, as in editing or boilerplate.
CODE = "class Shapes:\n" + "".join(
    f"    def area_{name}(self, a: float, b: float) -> float:\n"
    f'        """The area of a {name}."""\n'
    f"        return a * b * {factor}\n\n"
    for name, factor in (("rectangle", 1.0), ("triangle", 0.5), ("ellipse", 0.785))
)
# Prose is sampled (a small model decoding greedily soon repeats itself, which
# n-grams would predict); code-like text is decoded greedily.
TEXTS = {"prose": (PROSE, 0.8), "code-like": (CODE, 0.0)}
SEED = 7


@dataclass(frozen=True)
class Sample:
    tokens_per_second: float
    predicted: int
    drafted: int
    accepted: int


@dataclass(frozen=True)
class Row:
    rtt_ms: float
    text: str
    off: tuple[Sample, ...]
    on: tuple[Sample, ...]

    @staticmethod
    def median(samples: Sequence[Sample]) -> float:
        return statistics.median(s.tokens_per_second for s in samples)

    @property
    def acceptance(self) -> float:
        drafted = sum(s.drafted for s in self.on)
        return sum(s.accepted for s in self.on) / drafted if drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        predicted = sum(s.predicted for s in self.on)
        steps = predicted - sum(s.accepted for s in self.on)
        return predicted / steps if steps > 0 else 0.0


def even_plan(n_layers: int, nodes: Sequence[str]) -> Plan:
    """Layers split evenly over one CPU device per node, in node order."""
    counts = [
        n_layers // len(nodes) + (1 if i < n_layers % len(nodes) else 0) for i in range(len(nodes))
    ]
    devices, first = [], 0
    for node, count in zip(nodes, counts, strict=True):
        devices.append(
            PlannedDevice(
                node=node, device="CPU", layers=[first, first + count],
                weights_mib=0, kv_mib=0, compute_mib=0, total_mib=0,
            )
        )  # fmt: skip
        first += count
    return Plan(devices=devices, tensor_split=counts, rpc=list(nodes), host_node=nodes[0])


def _sample(host: LlamaProcess, prompt: str, tokens: int, temperature: float = 0.0) -> Sample:
    reply = post_json(
        f"{host.url}/completion",
        {"prompt": prompt, "n_predict": tokens, "temperature": temperature, "seed": SEED,
         "cache_prompt": False, "ignore_eos": True},
    )  # fmt: skip
    t = reply["timings"]
    assert isinstance(t, dict)
    return Sample(
        float(t["predicted_per_second"]),
        int(t["predicted_n"]),
        int(t.get("draft_n", 0)),
        int(t.get("draft_n_accepted", 0)),
    )


def measure(
    rtts: Sequence[float], ngram: NgramSettings, *, servers: int, tokens: int, runs: int
) -> tuple[list[Row], dict[float, float]]:
    model = parts.model_path()
    parts.binary("llama-server")
    profile = read_model_profile(model)
    nodes = [f"node-{chr(ord('a') + i)}" for i in range(servers)]
    plan = even_plan(profile.n_device_layers, nodes)
    serving = ServingParams(ctx=2048, parallel=1)
    rows: list[Row] = []
    measured: dict[float, float] = {}
    with tempfile.TemporaryDirectory(prefix="mesh-bench-spec-") as tmp:
        log_dir = Path(tmp)
        workers = [
            start_worker(log_dir, threads=1, extra=["-d", "CPU"]) for _ in range(2 * servers)
        ]
        with running(*workers):
            for rtt in rtts:
                measured[rtt] = measure_rtt_ms(rtt)
                with delayed([("127.0.0.1", w.port) for w in workers], rtt) as proxied:
                    hosts = []
                    for half, spec in ((proxied[:servers], None), (proxied[servers:], ngram)):
                        port = free_port()
                        settings = ServerSettings(
                            serving=serving, host="127.0.0.1", port=port, metrics=False,
                            threads=1, ngram=spec,
                        )  # fmt: skip
                        args = build_llama_server_args(
                            plan, str(model), settings, dict(zip(nodes, half, strict=True))
                        )
                        hosts.append(start_llama_server(log_dir, args, port=port, timeout=300))
                    with running(*hosts):
                        off_host, on_host = hosts
                        for host in hosts:
                            _sample(host, PROSE, 8)  # warm-up
                        for text, (prompt, temp) in TEXTS.items():
                            off, on = [], []
                            for i in range(runs):
                                if i % 2 == 0:
                                    off.append(_sample(off_host, prompt, tokens, temp))
                                    on.append(_sample(on_host, prompt, tokens, temp))
                                else:
                                    on.append(_sample(on_host, prompt, tokens, temp))
                                    off.append(_sample(off_host, prompt, tokens, temp))
                            rows.append(Row(rtt, text, tuple(off), tuple(on)))
                            print(format_row(rows[-1]), flush=True)
    return rows, measured


HEADER = (
    f"{'RTT':>5} {'text':<10} {'tok/s off':>9} {'tok/s on':>9} {'on/off':>6} "
    f"{'drafted':>7} {'accepted':>8} {'accept':>6} {'tok/step':>8}  runs off | on"
)


def format_row(r: Row) -> str:
    off, on = Row.median(r.off), Row.median(r.on)
    runs = (
        ",".join(f"{s.tokens_per_second:.1f}" for s in r.off)
        + " | "
        + ",".join(f"{s.tokens_per_second:.1f}" for s in r.on)
    )
    return (
        f"{r.rtt_ms:>3g}ms {r.text:<10} {off:>9.1f} {on:>9.1f} {on / off:>5.2f}x "
        f"{sum(s.drafted for s in r.on):>7} {sum(s.accepted for s in r.on):>8} "
        f"{r.acceptance:>6.0%} {r.tokens_per_step:>8.2f}  {runs}"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench spec")
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[5.0, 20.0])
    parser.add_argument(
        "--servers", type=int, default=2, help="RPC servers the model is split over"
    )
    parser.add_argument("--tokens", type=int, default=64, help="tokens per generation")
    parser.add_argument("--runs", type=int, default=5, help="generations per configuration")
    parser.add_argument("--type", default="ngram-map-k", help="the n-gram speculation type")
    parser.add_argument("--size-n", type=int, default=4, help="n-gram looked up")
    parser.add_argument("--size-m", type=int, default=8, help="most tokens drafted")
    args = parser.parse_args(argv)
    if args.type == "ngram-mod":
        ngram = NgramSettings(args.type, n_match=args.size_n, n_min=1, n_max=args.size_m)
    else:
        ngram = NgramSettings(args.type, size_n=args.size_n, size_m=args.size_m)
    flags = " ".join(ngram.args())
    print(
        f"gemma-3-270m Q4_K_M split evenly over {args.servers} local ggml-rpc-server (CPU, "
        f"1 thread each), every hop through a delay proxy; --spec-type {args.type} {flags}; "
        f"{args.tokens} tokens, median of {args.runs} alternating runs; "
        "prose sampled at 0.8, code-like greedy"
    )
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(HEADER, flush=True)
    started = time.monotonic()
    try:
        _, measured = measure(
            args.rtt_ms, ngram, servers=args.servers, tokens=args.tokens, runs=args.runs
        )
    except PartMissingError as exc:
        print(f"spec bench skipped: {exc}")
        return 0
    rtts = ", ".join(f"{k:g} ms -> {v:.1f} ms" for k, v in measured.items())
    print(f"added RTT measured through the proxy: {rtts}")
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"took {time.monotonic() - started:.0f} s")
    return 0
