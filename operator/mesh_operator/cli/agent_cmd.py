"""`mesh agent`: run the node agent on this node.

Configured by environment (the DaemonSet sets NODE_NAME from the downward API),
each variable overridable by its flag. This module only parses and validates; the
agent itself lives in `mesh_agent`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mesh_agent.agent import Agent, AgentConfig
from mesh_agent.health import HealthRules
from mesh_agent.inventory import BackendMode, CollectorConfig
from mesh_agent.inventory.cpu import HostPaths
from mesh_agent.rpc_liveness import RpcTarget
from mesh_agent.rtt import RttSettings
from mesh_operator.kubeclient import KubeconfigError, api_client

EXIT_OK = 0
EXIT_BAD_INPUT = 2

T = TypeVar("T")

# flag dest -> (environment variable, help)
ENVIRONMENT: dict[str, tuple[str, str]] = {
    "node_name": ("NODE_NAME", "Kubernetes node this agent reports on (required)."),
    "interval": ("MESH_AGENT_INTERVAL", "seconds between heartbeats (default 10)"),
    "listen": (
        "MESH_AGENT_LISTEN",
        "host:port of /healthz, /readyz, /metrics (default 0.0.0.0:9464)",
    ),
    "kubeconfig": (
        "KUBECONFIG",
        "kubeconfig file (else in a pod its service account, else ~/.kube/config)",
    ),
    "address": ("NODE_IP", "the node's address to report (downward API status.hostIP)"),
    "model_cache": (
        "MESH_AGENT_MODEL_CACHE",
        "folder of the node's model cache (else $LLAMA_CACHE)",
    ),
    "rpc_servers": (
        "MESH_AGENT_RPC_SERVERS",
        "comma-separated [namespace/model=]host:port of RPC servers to probe",
    ),
    "discover_rpc": (
        "MESH_AGENT_DISCOVER_RPC",
        "probe the operator's RPC server pods on this node: true or false (default true)",
    ),
    "rpc_timeout": ("MESH_AGENT_RPC_TIMEOUT", "seconds to wait for an RPC HELLO (default 1)"),
    "rtt_interval": (
        "MESH_AGENT_RTT_INTERVAL",
        "seconds between round-trip probe rounds to other agents; 0: off (default 20)",
    ),
    "rtt_peers": ("MESH_AGENT_RTT_PEERS", "peers probed per round, 1-64 (default 8)"),
    "backend": ("MESH_AGENT_BACKEND", "auto, cuda or cpu (default auto)"),
    "state_dir": ("MESH_AGENT_STATE_DIR", "folder for the cached bandwidth figure"),
    "memory_cgroup": (
        "MESH_AGENT_MEMORY_CGROUP",
        "cgroup whose limit bounds workload memory (default: the agent's)",
    ),
    "proc": ("MESH_AGENT_PROC", "the proc filesystem to read (default /proc)"),
    "cgroup_root": ("MESH_AGENT_CGROUP_ROOT", "the cgroup filesystem (default /sys/fs/cgroup)"),
    "nvml_module": ("MESH_AGENT_NVML_MODULE", "NVML binding, module[:factory] (default pynvml)"),
    "bandwidth_mib": ("MESH_AGENT_BANDWIDTH_MIB", "MiB per stream of the copy benchmark (64)"),
    "bandwidth_streams": (
        "MESH_AGENT_BANDWIDTH_STREAMS",
        "copy benchmark processes (default: one per core, at most 8)",
    ),
    "host_memory_reserve_percent": (
        "MESH_AGENT_HOST_MEMORY_RESERVE_PERCENT",
        "share of system RAM a node with GPUs never offers to the RAM tier (20)",
    ),
    "slowdown_c": (
        "MESH_AGENT_SLOWDOWN_C",
        "temperature that degrades a GPU when NVML has no threshold (90)",
    ),
    "log_level": ("MESH_AGENT_LOG_LEVEL", "debug, info, warning or error (default info)"),
}


class ConfigError(ValueError):
    """The agent's configuration is not usable."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "agent",
        help="run the node agent (inventory, health, heartbeat, /metrics)",
        description="Report this node's devices, health and heartbeat as its MeshNode; "
        "serve /healthz, /readyz and /metrics. Every flag defaults to its environment "
        "variable.",
    )
    for dest, (env, text) in ENVIRONMENT.items():
        flag = "--" + dest.replace("_", "-")
        parser.add_argument(flag, dest=dest, default=None, help=f"{text} [${env}]")
    return parser


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def _setting(args: argparse.Namespace, dest: str) -> str | None:
    value = getattr(args, dest, None)
    if value is not None:
        return str(value)
    return os.environ.get(ENVIRONMENT[dest][0]) or None


def _convert(args: argparse.Namespace, dest: str, kind: Callable[[str], T], default: T) -> T:
    raw = _setting(args, dest)
    if raw is None:
        return default
    try:
        return kind(raw)
    except ValueError as exc:
        raise ConfigError(f"{dest.replace('_', '-')} / ${ENVIRONMENT[dest][0]}: {exc}") from exc


def _positive_int(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 3600:
        raise ValueError(f"{value} is not between 1 and 3600")
    return value


def _percent(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 100:
        raise ValueError(f"{value} is not between 0 and 100")
    return value


def _listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r} is not host:port")
    return host or "0.0.0.0", int(port)


def _rtt_interval(text: str) -> float:
    value = float(text)
    if not (value == 0 or 1 <= value <= 3600):
        raise ValueError(f"{text} is neither 0 nor between 1 and 3600")
    return value


def _rtt_peers(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 64:
        raise ValueError(f"{value} is not between 1 and 64")
    return value


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mesh" / "agent"


def build_config(args: argparse.Namespace) -> AgentConfig:
    """The AgentConfig from flags and environment; raises ConfigError."""
    node = _setting(args, "node_name")
    if not node:
        raise ConfigError("no node name: set NODE_NAME (downward API spec.nodeName) or --node-name")
    host, port = _convert(args, "listen", _listen, ("0.0.0.0", 9464))
    backend = _convert(args, "backend", BackendMode, BackendMode.AUTO)
    targets_text = _setting(args, "rpc_servers") or ""
    try:
        targets = tuple(RpcTarget.parse(t) for t in targets_text.split(",") if t.strip())
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    cache = _setting(args, "model_cache") or os.environ.get("LLAMA_CACHE")
    state_dir = Path(_setting(args, "state_dir") or _default_state_dir())
    collector = CollectorConfig(
        mode=backend,
        host=HostPaths(
            proc=Path(_setting(args, "proc") or "/proc"),
            cgroup_root=Path(_setting(args, "cgroup_root") or "/sys/fs/cgroup"),
        ),
        memory_cgroup=_setting(args, "memory_cgroup"),
        model_cache_dir=Path(cache) if cache else None,
        bandwidth_cache=state_dir / "bandwidth.json",
        bandwidth_size_mib=_convert(args, "bandwidth_mib", _positive_int, 64),
        bandwidth_streams=_convert(args, "bandwidth_streams", int, 0),
        host_memory_reserve_percent=_convert(args, "host_memory_reserve_percent", _percent, 20.0),
    )
    return AgentConfig(
        node_name=node,
        interval_seconds=_convert(args, "interval", _positive_int, 10),
        listen_host=host,
        listen_port=port,
        # $KUBECONFIG (which may list several files) is read by mesh_operator.kubeclient.
        kubeconfig=Path(args.kubeconfig) if args.kubeconfig else None,
        address=_setting(args, "address"),
        rpc_targets=targets,
        discover_rpc=_convert(args, "discover_rpc", _boolean, True),
        rpc_timeout_seconds=_convert(args, "rpc_timeout", float, 1.0),
        nvml_module=_setting(args, "nvml_module") or "pynvml",
        collector=collector,
        rules=HealthRules(
            fallback_slowdown_c=_convert(args, "slowdown_c", int, 90),
            require_gpu=backend == BackendMode.CUDA,
        ),
        rtt=RttSettings(
            interval_seconds=_convert(args, "rtt_interval", _rtt_interval, 20.0),
            peers_per_round=_convert(args, "rtt_peers", _rtt_peers, 8),
        ),
    )


def run(args: argparse.Namespace) -> int:
    level = (_setting(args, "log_level") or "info").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = build_config(args)
    except ConfigError as exc:
        print(f"mesh agent: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    try:
        # Fail at start on a kubeconfig that cannot work; an API server that is
        # merely down is the loop's business.
        api_client(config.kubeconfig).close()  # type: ignore[no-untyped-call]
    except KubeconfigError as exc:
        print(f"mesh agent: no usable Kubernetes configuration: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Agent(config).run(stop)

    asyncio.run(main())
    return EXIT_OK
