"""The real runs: the time model checked against llama.cpp, and mesh's plan vs llama.cpp's split.

Owns the measurements on this machine. Three ggml-rpc-server processes (one CPU
thread each) stand for three nodes; a delay proxy in front of each adds the
round trip of a network. Time per token comes from llama-server's own
timings: the configurations take turns, one generation each per round (after
a warm-up), and each figure is the median over the rounds, so the drift of a
shared machine falls on all of them alike.

1. **Time model.** gemma-3-270m over 1, 2 and 3 servers, every hop behind the
   proxy (the host on a node of its own), at 0, 2, 5 and 10 ms. Two constants
   are fit on the 0 and 10 ms runs only: the round trips a remote device costs
   per token, and the servers' speed (the bandwidth a CPU server reaches on one
   thread, which no default knows). The 2 and 5 ms runs, and every run of (2),
   are predicted with those constants and judged against their measurement.
2. **mesh vs llama.cpp.** A pool of three equal nodes where no single node
   holds the model, so every plan splits. mesh plans it with the fitted
   constants; llama.cpp's default splits it over all three in proportion to
   free memory. Each runs with its host on its own first node (that hop local,
   no proxy) and again with every hop proxied. Last, the lever of a host that
   uses its own node's device directly: the same two-node layout with the host
   node's layers on a local ggml-rpc-server and on llama-server's own CPU (the
   command line the operator builds for a pool with `hostUsesOwnNode`).
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from bench.planner.delay_proxy import delayed, measure_rtt_ms, proxied
from e2e import parts
from e2e.llama import LlamaProcess, post_json, running, start_llama_server
from e2e.llama import start_rpc_server as start_worker
from e2e.waiting import free_port
from mesh_operator.planner import (
    Inventory,
    PlacementRequest,
    PlacementResult,
    ServerSettings,
    ServingParams,
    build_llama_server_args,
    estimate_memory,
    evaluate_layout,
    host_on_own_node,
    layers_for_split,
    parse_inventory,
    plan_placement,
    read_model_profile,
)
from mesh_operator.planner.memory import kv_geometry
from mesh_operator.planner.profile import ModelProfile
from mesh_operator.planner.timing import CostModel, layer_read_bytes

NODES = ("node-a", "node-b", "node-c")
RTTS = (0.0, 2.0, 5.0, 10.0)
FIT_RTTS = (0.0, 10.0)  # the runs the constants come from; the others are judged
TOLERANCE = 0.20  # the bound on |predicted - measured| / measured
CTX = 2048
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
# Each node offers this share of what the model needs on one device: after the
# planner's reserve no node holds it, two do.
NODE_SHARE = 0.95


@dataclass(frozen=True)
class Run:
    label: str
    servers: int
    rtt_ms: float  # added by the proxy
    measured_rtt_ms: float  # through the proxy, to an echo server
    layers: str
    ms_per_token: float  # median
    samples: tuple[float, ...]
    predicted_ms: float | None = None
    fit: bool = False

    @property
    def error(self) -> float:
        assert self.predicted_ms is not None
        return (self.predicted_ms - self.ms_per_token) / self.ms_per_token


@dataclass(frozen=True)
class Fit:
    round_trips_per_device: float
    bandwidth_gbps: float  # what one server reaches, as the time model counts it
    compute_ms: float  # the model's reads at that bandwidth

    def cost(self) -> CostModel:
        return CostModel(round_trips_per_device=self.round_trips_per_device)


@dataclass(frozen=True)
class Report:
    runs: list[Run]
    fit: Fit
    pool_runs: list[Run]
    plan: PlacementResult
    node_mib: int
    proportional_fits: bool  # whether llama.cpp's split fits the pool's declared memory

    def judged(self) -> list[Run]:
        return [r for r in [*self.runs, *self.pool_runs] if not r.fit and r.predicted_ms]

    def within(self) -> int:
        return sum(1 for r in self.judged() if abs(r.error) <= TOLERANCE)


def _generate(host: LlamaProcess, tokens: int) -> float:
    """ms per token of one generation."""
    body: dict[str, object] = {
        "prompt": PROMPT,
        "n_predict": tokens,
        "temperature": 0,
        "cache_prompt": False,
        "ignore_eos": True,
    }
    timings = post_json(f"{host.url}/completion", body)["timings"]
    assert isinstance(timings, dict)
    return 1000.0 / float(timings["predicted_per_second"])


def _warm(host: LlamaProcess) -> None:
    _generate(host, 8)


def _plain_args(model: Path, rpc: Sequence[str], split: Sequence[int], ngl: int) -> list[str]:
    """llama-server as GPUStack and LocalAI run it: every device over RPC, a -ts."""
    return [
        "-m", str(model), "--rpc", ",".join(rpc), "-ngl", str(ngl), "-ts",
        ",".join(map(str, split)), "-fit", "off", "-c", str(CTX), "-np", "1", "-t", "1",
    ]  # fmt: skip


# How a configuration starts llama-server: its arguments, or a plan whose
# arguments mesh's builder makes, with these endpoints.
_How = list[str] | tuple[PlacementResult, dict[str, str]]


def _layers_text(ranges: Sequence[tuple[int, int]]) -> str:
    return "/".join(str(b - a) for a, b in ranges)


def device_reads(profile: ModelProfile, ranges: Sequence[tuple[int, int]]) -> list[float]:
    """Bytes each device of a layout reads per token."""
    serving = ServingParams(ctx=CTX, parallel=1)
    reads = layer_read_bytes(profile, serving, kv_geometry(profile, serving))
    return [sum(reads[a:b]) for a, b in ranges]


def predict_remote(
    profile: ModelProfile, ranges: Sequence[tuple[int, int]], rtt_ms: float, fit: Fit
) -> float:
    """Predicted ms/token of a layout whose every device is remote (the host elsewhere)."""
    cost = fit.cost()
    return sum(
        cost.device_ms(r, fit.bandwidth_gbps, rtt_ms, local=False)
        for r in device_reads(profile, ranges)
    )


def fit_constants(profile: ModelProfile, runs: Sequence[Run], base: CostModel) -> Fit:
    """Least squares of ms = n * overhead + compute + k * n * rtt over the fit runs."""
    rows = [
        (r.servers * r.measured_rtt_ms, r.ms_per_token - r.servers * base.device_overhead_ms)
        for r in runs
        if r.fit
    ]
    count = float(len(rows))
    sx = sum(x for x, _ in rows)
    sxx = sum(x * x for x, _ in rows)
    sy = sum(y for _, y in rows)
    sxy = sum(x * y for x, y in rows)
    det = count * sxx - sx * sx
    if det <= 0:
        raise RuntimeError("the fit runs do not separate compute from round trips")
    trips = (count * sxy - sx * sy) / det
    compute = (sy - trips * sx) / count
    total = sum(device_reads(profile, [(0, profile.n_device_layers)]))
    bandwidth = total * 1e3 / (compute * 1e9 * base.bandwidth_efficiency)
    return Fit(round_trips_per_device=trips, bandwidth_gbps=bandwidth, compute_ms=compute)


def _pool(profile: ModelProfile, rtt_ms: float, bandwidth: float) -> tuple[Inventory, int]:
    """Three equal nodes; each offers NODE_SHARE of what the model needs on one device."""
    serving = ServingParams(ctx=CTX, parallel=1)
    whole = estimate_memory(profile, serving, [(0, profile.n_device_layers)]).devices[0].total
    mib = int(whole * NODE_SHARE / 2**20)
    device = {
        "id": "CPU",
        "backend": "cpu",
        "memoryTotalMiB": mib,
        "memoryFreeMiB": mib,
        "bandwidthGBps": bandwidth,
    }
    nodes = [{"name": n, "rttMs": rtt_ms, "devices": [device]} for n in NODES]
    return parse_inventory({"nodes": nodes}), mib


@dataclass
class _Session:
    """What every run of one measurement shares: the model, the servers, the logs."""

    model: Path
    profile: ModelProfile
    log_dir: Path
    workers: Sequence[LlamaProcess]
    tokens: int
    runs: int
    progress: Callable[[Run], None]

    @property
    def targets(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", w.port) for w in self.workers]

    def host(self, args: Sequence[str], port: int) -> LlamaProcess:
        return start_llama_server(self.log_dir, args, port=port, timeout=300)

    def matrix(self) -> list[Run]:
        """Each round starts a host per server count and times one generation at
        every round trip (the proxy's delay changes between them), so the
        machine's drift falls on every cell alike; medians over the rounds."""
        n_layers = self.profile.n_device_layers
        measured = {rtt: measure_rtt_ms(rtt) for rtt in RTTS}
        samples: dict[tuple[int, float], list[float]] = {}
        with proxied(self.targets, 0.0) as proxies:
            addresses = [f"127.0.0.1:{r.port}" for r in proxies.routes]
            for _ in range(self.runs):
                for n in (1, 2, 3):
                    args = _plain_args(self.model, addresses[:n], [1] * n, 999)
                    port = free_port()
                    with running(self.host(args, port)) as (host,):
                        _warm(host)
                        for rtt in RTTS:
                            proxies.set_rtt(rtt)
                            _warm(host)
                            samples.setdefault((n, rtt), []).append(_generate(host, self.tokens))
                    proxies.set_rtt(0.0)
        out = []
        for rtt in RTTS:
            for n in (1, 2, 3):
                ms = samples[(n, rtt)]
                run = Run(
                    label=f"{n} server(s), every hop proxied",
                    servers=n,
                    rtt_ms=rtt,
                    measured_rtt_ms=measured[rtt],
                    layers=_layers_text(layers_for_split([1.0] * n, n_layers)),
                    ms_per_token=statistics.median(ms),
                    samples=tuple(ms),
                    fit=rtt in FIT_RTTS,
                )
                out.append(run)
                self.progress(run)
        return out

    def pool_runs(
        self, plan: PlacementResult, inventory: Inventory, request: PlacementRequest, fit: Fit
    ) -> list[Run]:
        """The pool's configurations, one generation each per round, in turn."""
        profile, model = self.profile, self.model
        n_layers = profile.n_device_layers
        rtt_ms = next(iter(inventory.nodes)).rtt_ms or 0.0
        measured_rtt = measure_rtt_ms(rtt_ms)
        proportional = layers_for_split([1.0] * len(NODES), n_layers)
        default_layout = [(n, "CPU", r) for n, r in zip(NODES, proportional, strict=True)]
        default_local = evaluate_layout(profile, inventory, default_layout, request, NODES[0])
        host = plan.host_node or plan.rpc[0]
        mesh_ranges = [d.layers for d in plan.devices]
        # The lever: mesh's plan as a pool with hostUsesOwnNode has it (hosted on the
        # node of its first layers, which run on the host's CPU), against the same
        # layout with those layers on a local server; both with mesh's builders.
        own = host_on_own_node(plan, profile, inventory, request)
        if own.host_tier is None or own.host_tier.device is None:
            raise RuntimeError(f"hostUsesOwnNode does not apply to {plan.reason}")
        own_host, own_layers = own.host_tier.node, own.host_tier.cpu_layers
        lever_ranges = [(0, own_layers), *(d.layers for d in own.devices)]
        lever_layout = [(own_host, "CPU", lever_ranges[0]), *own.layout()]
        lever = evaluate_layout(profile, inventory, lever_layout, request, own_host)
        samples: dict[str, list[float]] = {}
        with delayed(self.targets, rtt_ms) as proxied_addresses:
            direct = {n: w.address for n, w in zip(NODES, self.workers, strict=True)}
            through = dict(zip(NODES, proxied_addresses, strict=True))
            # Label, llama-server's arguments (or a plan: mesh's own arguments for it,
            # with these endpoints), the layers per device, and the prediction.
            cases: list[tuple[str, _How, list[tuple[int, int]], float]] = [
                ("mesh plan, host on its planned node",
                 (plan, {n: direct[n] if n == host else through[n] for n in plan.rpc}),
                 mesh_ranges, plan.predicted_token_ms),
                ("llama.cpp proportional, host on node-a",
                 _plain_args(model, [direct[NODES[0]], through[NODES[1]], through[NODES[2]]],
                             [1, 1, 1], 999),
                 proportional, default_local.predicted_token_ms),
                ("mesh plan, every hop proxied", (plan, {n: through[n] for n in plan.rpc}),
                 mesh_ranges, predict_remote(profile, mesh_ranges, measured_rtt, fit)),
                ("llama.cpp proportional, every hop proxied",
                 _plain_args(model, list(proxied_addresses), [1, 1, 1], 999),
                 proportional, predict_remote(profile, proportional, measured_rtt, fit)),
                ("host node's layers on a local rpc server",
                 (lever, {own_host: direct[own_host], **{n: through[n] for n in own.rpc}}),
                 lever_ranges, lever.predicted_token_ms),
                # llama.cpp keeps the first n_layers - ngl layers on its own CPU.
                ("host node's layers on the host's own CPU",
                 (own, {n: through[n] for n in own.rpc}),
                 lever_ranges, own.predicted_token_ms),
            ]  # fmt: skip
            for _ in range(self.runs):
                for label, how, _, _ in cases:
                    port = free_port()
                    if isinstance(how, tuple):
                        settings = ServerSettings(
                            serving=request.serving, host="127.0.0.1", port=port, metrics=False,
                            threads=1,
                        )  # fmt: skip
                        args = build_llama_server_args(how[0], str(model), settings, how[1])
                    else:
                        args = how
                    with running(self.host(args, port)) as (server,):
                        _warm(server)
                        samples.setdefault(label, []).append(_generate(server, self.tokens))
        out: list[Run] = []
        for label, _, ranges, predicted in cases:
            ms = samples[label]
            run = Run(
                label=label,
                servers=len(ranges),
                rtt_ms=rtt_ms,
                measured_rtt_ms=measured_rtt,
                layers=_layers_text(ranges),
                ms_per_token=statistics.median(ms),
                samples=tuple(ms),
                predicted_ms=predicted,
            )
            out.append(run)
            self.progress(run)
        return out


def measure(
    rtt_ms: float = 5.0,
    tokens: int = 64,
    runs: int = 5,
    progress: Callable[[Run], None] = lambda run: None,
) -> Report:
    """The time-model matrix, the fit, then the pool runs at `rtt_ms`."""
    model = parts.model_path()
    parts.binary("llama-server")
    parts.binary("ggml-rpc-server")
    profile = read_model_profile(model)
    n_layers = profile.n_device_layers
    serving = ServingParams(ctx=CTX, parallel=1)
    # The pool must split the model whatever the constants: check before measuring.
    inventory, _ = _pool(profile, rtt_ms, 0.0)
    one_node = evaluate_layout(profile, inventory, [(NODES[0], "CPU", (0, n_layers))])
    first = plan_placement(profile, inventory, PlacementRequest(serving=serving))
    if one_node.feasible or not first.feasible:
        raise RuntimeError(f"the pool must hold the model on two nodes, not one: {first.reason}")
    with tempfile.TemporaryDirectory(prefix="mesh-bench-real-") as tmp:
        log_dir = Path(tmp)
        workers = [start_worker(log_dir, threads=1, extra=["-d", "CPU"]) for _ in NODES]
        with running(*workers):
            session = _Session(model, profile, log_dir, workers, tokens, runs, progress)
            matrix = session.matrix()
            fit = fit_constants(profile, matrix, CostModel())
            matrix = [
                replace(
                    r,
                    predicted_ms=predict_remote(
                        profile,
                        layers_for_split([1.0] * r.servers, n_layers),
                        r.measured_rtt_ms,
                        fit,
                    ),
                )
                for r in matrix
            ]
            inventory, node_mib = _pool(profile, rtt_ms, fit.bandwidth_gbps)
            request = PlacementRequest(serving=serving, cost=fit.cost())
            plan = plan_placement(profile, inventory, request)
            if not plan.feasible:
                raise RuntimeError(f"mesh found no plan: {plan.reason}")
            pool_runs = session.pool_runs(plan, inventory, request, fit)
    thirds = layers_for_split([1.0] * len(NODES), n_layers)
    layout = [(n, "CPU", r) for n, r in zip(NODES, thirds, strict=True)]
    fits = evaluate_layout(profile, inventory, layout, request, NODES[0]).feasible
    return Report(matrix, fit, pool_runs, plan, node_mib, fits)


def format_run(run: Run) -> str:
    samples = ",".join(f"{s:.1f}" for s in run.samples)
    if run.predicted_ms is not None:
        predicted = f"{run.predicted_ms:>9.1f} {run.error * 100:>+6.1f}%"
    else:
        predicted = f"{'-':>9} {'':>7}"
    use = "fit" if run.fit else ("judged" if run.predicted_ms is not None else "")
    return (
        f"{run.label:<44} {run.rtt_ms:>4g} {run.measured_rtt_ms:>6.2f} {run.layers:>8} "
        f"{run.ms_per_token:>8.1f} {predicted} {use:>6}  {samples}"
    )


def format_real(report: Report) -> str:
    head = (
        f"{'configuration':<44} {'rtt':>4} {'meas.':>6} {'layers':>8} "
        f"{'ms/tok':>8} {'predicted':>9} {'error':>7} {'':>6}  runs"
    )
    fit = report.fit
    judged = report.judged()
    worst = max(judged, key=lambda r: abs(r.error)) if judged else None
    lines = [
        "gemma-3-270m Q4_K_M, ggml-rpc-server processes (CPU, 1 thread each) behind a delay "
        "proxy; rtt: added, meas.: measured through the proxy (ms)",
        "-- the time model: fit on the 0 and 10 ms runs, judged on the others",
        head,
        *(format_run(r) for r in report.runs),
        f"fit: {fit.round_trips_per_device:.2f} round trips per remote device and token "
        f"(the default is {CostModel().round_trips_per_device:g}); a server computes the whole "
        f"model in {fit.compute_ms:.1f} ms ({fit.bandwidth_gbps:.1f} GB/s as the model counts it)",
        "",
        f"-- a pool of three equal nodes of {report.node_mib} MiB each (none holds the model), "
        f"{report.pool_runs[0].rtt_ms:g} ms; mesh's plan: {report.plan.reason}",
        head,
        *(format_run(r) for r in report.pool_runs),
    ]
    if worst is not None:
        lines.append(
            f"judged runs within {TOLERANCE:.0%} of their prediction: {report.within()}/"
            f"{len(judged)} (worst {worst.error * 100:+.1f}%, {worst.label} at {worst.rtt_ms:g} ms)"
        )
    if not report.proportional_fits:
        lines.append(
            "llama.cpp's proportional split overflows a node of this pool (its device with the "
            "output layer); it runs here only because the CPU servers have memory to spare"
        )
    by_label = {r.label: r.ms_per_token for r in report.pool_runs}
    pairs = [
        ("host on its first node", "mesh plan, host on its planned node",
         "llama.cpp proportional, host on node-a"),
        ("every hop proxied", "mesh plan, every hop proxied",
         "llama.cpp proportional, every hop proxied"),
        ("host's own CPU vs a local rpc server", "host node's layers on the host's own CPU",
         "host node's layers on a local rpc server"),
    ]  # fmt: skip
    for text, ours, theirs in pairs:
        if ours in by_label and theirs in by_label:
            lines.append(f"tokens per second, {text}: {by_label[theirs] / by_label[ours]:.2f}x")
    return "\n".join(lines)
