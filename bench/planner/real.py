"""The real measurement: mesh's plan vs llama.cpp's proportional split, on llama.cpp.

Owns the run on this machine. Three ggml-rpc-server processes (one CPU thread
each) stand for three nodes; a delay proxy in front of each adds the RTT of a
network. The plan mesh makes for that pool runs with the host on its planned
node (that hop is local, no proxy), llama.cpp's default runs with every server
and the host on the first node (the other two hops through the proxy); both
again with every hop through the proxy. Tokens per second come from
llama-server's own timings, median of a few generations after a warm-up.
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.planner.delay_proxy import delayed, measure_rtt_ms
from e2e import parts
from e2e.llama import LlamaProcess, post_json, running, start_llama_server
from e2e.llama import start_rpc_server as start_worker
from e2e.waiting import free_port
from mesh_operator.planner import (
    PlacementRequest,
    PlacementResult,
    ServerSettings,
    ServingParams,
    build_llama_server_args,
    layers_for_split,
    parse_inventory,
    plan_placement,
    read_model_profile,
)

NODES = ("node-a", "node-b", "node-c")
_Build = Callable[[list[str], int], list[str]]
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@dataclass(frozen=True)
class Measurement:
    label: str
    servers: int
    layers: str
    local_hops: int
    tokens_per_second: float
    samples: tuple[float, ...]


def _available_mib() -> int:
    """What a CPU ggml-rpc-server reports as free: the host's available memory."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 8192


def _generate(host: LlamaProcess, tokens: int, runs: int) -> list[float]:
    body: dict[str, object] = {
        "prompt": PROMPT,
        "n_predict": tokens,
        "temperature": 0,
        "cache_prompt": False,
        "ignore_eos": True,
    }
    post_json(f"{host.url}/completion", {**body, "n_predict": 8})  # warm-up
    speeds = []
    for _ in range(runs):
        reply = post_json(f"{host.url}/completion", body)
        timings = reply["timings"]
        assert isinstance(timings, dict)
        speeds.append(float(timings["predicted_per_second"]))
    return speeds


def _run_host(
    log_dir: Path, args: Sequence[str], port: int, *, tokens: int, runs: int
) -> list[float]:
    host = start_llama_server(log_dir, args, port=port, timeout=300)
    with running(host):
        return _generate(host, tokens, runs)


def _layers_text(ranges: Sequence[tuple[int, int]]) -> str:
    return "/".join(str(b - a) for a, b in ranges)


def measure(
    rtt_ms: float = 5.0, tokens: int = 64, runs: int = 5, ctx: int = 2048
) -> tuple[list[Measurement], float, PlacementResult]:
    """Run the four configurations; return them, the measured added RTT, and mesh's plan."""
    model = parts.model_path()
    parts.binary("llama-server")
    parts.binary("ggml-rpc-server")
    profile = read_model_profile(model)
    free = _available_mib()
    inventory = parse_inventory(
        {
            "nodes": [
                {
                    "name": name,
                    "rttMs": rtt_ms,
                    "devices": [
                        {
                            "id": "CPU",
                            "backend": "cpu",
                            "memoryTotalMiB": free,
                            "memoryFreeMiB": free,
                        }
                    ],
                }
                for name in NODES
            ]
        }
    )
    serving = ServingParams(ctx=ctx, parallel=1)
    request = PlacementRequest(serving=serving)
    plan = plan_placement(profile, inventory, request)
    if not plan.feasible:
        raise RuntimeError(f"mesh found no plan: {plan.reason}")
    # What llama.cpp's default makes of three equal servers (checked in the table).
    proportional = layers_for_split([free] * len(NODES), profile.n_device_layers)
    measured_rtt = measure_rtt_ms(rtt_ms)
    results: list[Measurement] = []
    with tempfile.TemporaryDirectory(prefix="mesh-bench-real-") as tmp:
        log_dir = Path(tmp)
        workers = [start_worker(log_dir, threads=1, extra=["-d", "CPU"]) for _ in NODES]
        with running(*workers):
            targets = [("127.0.0.1", w.port) for w in workers]
            with delayed(targets, rtt_ms) as proxied:
                direct = {n: w.address for n, w in zip(NODES, workers, strict=True)}
                through = dict(zip(NODES, proxied, strict=True))

                def mesh_args(endpoints: list[str], port: int) -> list[str]:
                    settings = ServerSettings(
                        serving=serving, host="127.0.0.1", port=port, metrics=False, threads=1
                    )
                    by_node = dict(zip(plan.rpc, endpoints, strict=True))
                    return build_llama_server_args(plan, str(model), settings, by_node)

                def default_args(endpoints: list[str], port: int) -> list[str]:
                    # llama.cpp as GPUStack and LocalAI run it: no -ts, split by free memory.
                    return [
                        "-m", str(model), "--rpc", ",".join(endpoints), "-ngl", "999",
                        "-fit", "off", "-c", str(ctx), "-np", "1", "-t", "1",
                        "--host", "127.0.0.1", "--port", str(port),
                    ]  # fmt: skip

                host_node = plan.host_node or plan.rpc[0]
                mesh_local = [direct[n] if n == host_node else through[n] for n in plan.rpc]
                default_local = [direct[NODES[0]], through[NODES[1]], through[NODES[2]]]
                configs: list[tuple[str, _Build, list[str]]] = [
                    ("mesh plan, host on its planned node", mesh_args, mesh_local),
                    ("llama.cpp default split, host on node-a", default_args, default_local),
                    ("mesh plan, every hop proxied", mesh_args, [through[n] for n in plan.rpc]),
                    ("llama.cpp default split, every hop proxied", default_args,
                     [through[n] for n in NODES]),
                ]  # fmt: skip
                for label, build, endpoints in configs:
                    port = free_port()
                    speeds = _run_host(
                        log_dir, build(endpoints, port), port, tokens=tokens, runs=runs
                    )
                    ranges = (
                        [d.layers for d in plan.devices] if build is mesh_args else proportional
                    )
                    results.append(
                        Measurement(
                            label=label,
                            servers=len(ranges),
                            layers=_layers_text(ranges),
                            local_hops=sum(1 for e in endpoints if e in direct.values()),
                            tokens_per_second=statistics.median(speeds),
                            samples=tuple(speeds),
                        )
                    )
    return results, measured_rtt, plan


def format_real(results: Sequence[Measurement], measured_rtt: float, rtt_ms: float) -> str:
    lines = [
        f"gemma-3-270m Q4_K_M on 3 local ggml-rpc-server (CPU, 1 thread each), "
        f"{rtt_ms:g} ms RTT added by a delay proxy (measured {measured_rtt:.1f} ms)",
        f"{'configuration':<44} {'servers':>7} {'layers':>8} {'local':>5} {'tok/s':>7}  runs",
    ]
    for m in results:
        runs = ",".join(f"{s:.1f}" for s in m.samples)
        lines.append(
            f"{m.label:<44} {m.servers:>7} {m.layers:>8} {m.local_hops:>5} "
            f"{m.tokens_per_second:>7.1f}  {runs}"
        )
    if len(results) >= 2 and results[1].tokens_per_second > 0:
        gain = results[0].tokens_per_second / results[1].tokens_per_second
        lines.append(f"mesh / llama.cpp default (hosts as planned): {gain:.2f}x tokens per second")
    return "\n".join(lines)
