"""`mesh agent` configuration, and the loop's behaviour when the API server is away."""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from e2e.waiting import free_port
from mesh_agent.agent import Agent, AgentConfig, backoff_delay
from mesh_agent.inventory import BackendMode, CollectorConfig
from mesh_agent.rpc_liveness import RpcTarget
from mesh_operator.cli import agent_cmd
from mesh_operator.cli.main import build_parser, main
from tests.fixtures.nvml.double import FakeNvml

pytestmark = pytest.mark.unit


def parse(argv: list[str]) -> AgentConfig:
    parser, _ = build_parser()
    return agent_cmd.build_config(parser.parse_args(["agent", *argv]))


def test_environment_configures_and_flags_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NODE_NAME", "gpu-node-7")
    monkeypatch.setenv("MESH_AGENT_INTERVAL", "15")
    monkeypatch.setenv("MESH_AGENT_RPC_SERVERS", "ns/a=10.0.0.1:50052, ns/b=10.0.0.1:50053")
    monkeypatch.setenv("MESH_AGENT_BACKEND", "cuda")
    config = parse(["--interval", "2", "--listen", "127.0.0.1:0"])
    assert config.node_name == "gpu-node-7"
    assert config.interval_seconds == 2
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 0)
    assert config.rpc_targets == (
        RpcTarget("ns/a", "10.0.0.1", 50052),
        RpcTarget("ns/b", "10.0.0.1", 50053),
    )
    assert config.collector.mode is BackendMode.CUDA
    assert config.rules.require_gpu
    assert (config.rtt.interval_seconds, config.rtt.peers_per_round) == (20.0, 8)
    monkeypatch.setenv("MESH_AGENT_RTT_INTERVAL", "0")
    assert not parse(["--rtt-peers", "3"]).rtt.enabled
    assert parse(["--rtt-peers", "3"]).rtt.peers_per_round == 3


@pytest.mark.parametrize(
    ("env", "argv", "message"),
    [
        ({}, [], "no node name"),
        ({"NODE_NAME": "n"}, ["--interval", "0"], "interval"),
        ({"NODE_NAME": "n"}, ["--backend", "tpu"], "backend"),
        ({"NODE_NAME": "n"}, ["--rpc-servers", "nowhere"], "host:port"),
        ({"NODE_NAME": "n"}, ["--listen", "9464x"], "listen"),
        ({"NODE_NAME": "n"}, ["--rtt-interval", "0.5"], "rtt-interval"),
        ({"NODE_NAME": "n"}, ["--rtt-peers", "0"], "rtt-peers"),
        ({"NODE_NAME": "n"}, ["--rtt-peers", "many"], "rtt-peers"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    argv: list[str],
    message: str,
) -> None:
    monkeypatch.delenv("NODE_NAME", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["agent", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


@pytest.mark.parametrize("failures", range(1, 12))
def test_backoff_is_jittered_and_capped(failures: int) -> None:
    rng = random.Random(failures)
    delays = [backoff_delay(failures, 1.0, 30.0, rng) for _ in range(50)]
    ceiling = min(30.0, 2 ** (failures - 1))
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert len(set(delays)) > 1


def dead_kubeconfig(tmp_path: Path) -> Path:
    port = free_port()  # closed again: nobody listens there
    path = tmp_path / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:{port}'}}}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
    )
    return path


def test_unreachable_api_server_keeps_metrics_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kubeconfig = dead_kubeconfig(tmp_path)
    config = AgentConfig(
        node_name="node-a",
        interval_seconds=1,
        listen_host="127.0.0.1",
        listen_port=0,
        kubeconfig=kubeconfig,
        backoff_base_seconds=0.05,
        collector=CollectorConfig(bandwidth_cache=tmp_path / "bw.json", bandwidth_size_mib=8),
    )
    fake = FakeNvml.from_fixtures("rtx-3060-12gb")
    agent = Agent(config, nvml_factory=lambda: fake)

    async def scenario() -> tuple[int, int, str]:
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        while agent.metrics.stats.results.get("unreachable", 0) < 4:
            await asyncio.sleep(0.05)
        async with aiohttp.ClientSession() as http:
            base = f"http://127.0.0.1:{agent.port}"
            async with http.get(f"{base}/readyz") as ready:
                ready_status = ready.status
            async with http.get(f"{base}/healthz") as live:
                live_status = live.status
            async with http.get(f"{base}/metrics") as resp:
                text = await resp.text()
        stop.set()
        await task
        return ready_status, live_status, text

    with caplog.at_level(logging.INFO, logger="mesh_agent"):
        ready_status, live_status, text = asyncio.run(scenario())
    assert (ready_status, live_status) == (503, 200)
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert "mesh_gpu_memory_free_bytes" in names
    failing = [r for r in caplog.records if "MeshNode write failing" in r.getMessage()]
    assert len(failing) == 1  # four failures, one line
    assert "unreachable" in failing[0].getMessage()
