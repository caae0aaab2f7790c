"""RPC liveness against a real ggml-rpc-server: ready, busy with its one client,
hung (stopped with SIGSTOP: the kernel still completes handshakes), and down; and
the agent reporting it in its MeshNode."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.cluster import LocalCluster
from mesh_agent.agent import Agent, AgentConfig
from mesh_agent.inventory import BackendMode, CollectorConfig
from mesh_agent.inventory.nvml import MESH_SERVER_NAMES
from mesh_agent.rpc_liveness import (
    RpcState,
    RpcTarget,
    SocketRow,
    probe,
    visible_socket_rows,
)
from tests.integration.agent_support import (
    free_port,
    get_meshnode,
    install_meshnode_crd,
    wait_for,
)

pytestmark = pytest.mark.integration


def rows() -> list[SocketRow] | None:
    return visible_socket_rows(Path("/proc"), MESH_SERVER_NAMES)


@pytest.fixture
def rpc_server(rpc_server_bin: Path, tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    port = free_port()
    log = tmp_path / "rpc.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(rpc_server_bin), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        # Its stdout is block-buffered into the file: wait for the port to answer.
        target = RpcTarget("", "127.0.0.1", port)
        wait_for(
            "the RPC server to answer",
            lambda: probe(target, timeout=0.5, socket_rows=rows).state is RpcState.READY,
            timeout=30,
        )
        yield proc.pid, port, log
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def hold_client(port: int) -> socket.socket:
    """Be the server's one client, as a llama-server host is."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(bytes([14]) + struct.pack("<Q", 24) + bytes(24))
    (size,) = struct.unpack("<Q", sock.recv(8))
    sock.recv(size)
    return sock


def test_probe_tells_ready_serving_hung_and_down(rpc_server: tuple[int, int, Path]) -> None:
    pid, port, _ = rpc_server
    target = RpcTarget("ns/gemma", "127.0.0.1", port)
    ready = probe(target, timeout=1.0, socket_rows=rows)
    assert ready.state is RpcState.READY
    # The 28-byte answer of protocol 3 and later, decoded as major.minor.patch.
    version = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", ready.version or "")
    assert version is not None and int(version.group(1)) >= 3

    client = hold_client(port)
    try:
        busy = probe(target, timeout=0.5, socket_rows=rows)
        assert busy.state is RpcState.SERVING
        assert busy.answering
    finally:
        client.close()
    wait_for(
        "the server to be free again",
        lambda: probe(target, timeout=0.5, socket_rows=rows).state is RpcState.READY,
        timeout=10,
    )

    os.kill(pid, signal.SIGSTOP)
    try:
        hung = probe(target, timeout=0.5, socket_rows=rows)
        assert hung.state is RpcState.HUNG
        assert not hung.answering
    finally:
        os.kill(pid, signal.SIGCONT)

    os.kill(pid, signal.SIGTERM)
    wait_for(
        "the server to be gone",
        lambda: probe(target, timeout=0.5, socket_rows=rows).state is RpcState.DOWN,
        timeout=10,
    )


def test_agent_reports_its_rpc_servers(
    cluster: LocalCluster, rpc_server: tuple[int, int, Path], tmp_path: Path
) -> None:
    install_meshnode_crd(cluster)
    _, port, _ = rpc_server
    node = f"rpc-{uuid.uuid4().hex[:8]}"
    dead = free_port()
    config = AgentConfig(
        node_name=node,
        interval_seconds=1,
        listen_host="127.0.0.1",
        listen_port=0,
        kubeconfig=cluster.kubeconfig,
        rpc_targets=(
            RpcTarget("ns/gemma", "127.0.0.1", port),
            RpcTarget("ns/qwen", "127.0.0.1", dead),
        ),
        collector=CollectorConfig(
            mode=BackendMode.CPU, bandwidth_cache=tmp_path / "bw.json", bandwidth_size_mib=16
        ),
    )
    agent = Agent(config)
    assert asyncio.run(agent.cycle())
    obj = get_meshnode(cluster, node)
    assert obj is not None
    assert obj["status"]["rpcServers"] == [
        {"model": "ns/gemma", "port": port, "answering": True},
        {"model": "ns/qwen", "port": dead, "answering": False},
    ]
    health = obj["status"]["health"]
    assert (health["state"], health["reason"]) == ("Degraded", "RpcServerDown")
    assert f"127.0.0.1:{dead}" in health["message"]
    agent.collector.close()
    agent.metrics.shutdown()
    cluster.kubectl("delete", "meshnode", node, "--wait=false")
