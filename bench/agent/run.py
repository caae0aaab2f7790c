"""CPU and RSS of a real `mesh agent` process against the real local control plane.

Starts (or reuses, with --cluster-dir) the local control plane, installs the
MeshNode CRD, runs `mesh agent` on the CPU path at the production interval
(10 s), lets its first cycle finish (bandwidth measured and cached), then
measures its CPU time from /proc/<pid>/stat and its RSS from /proc/<pid>/status
over --duration seconds while /metrics is scraped every 15 s as Prometheus would.
With --peers N (default 8) it first starts N more agents on other loopback
addresses, as other nodes' agents: the measured agent probes their round trips
at the production rate (8 peers every 20 s) and answers theirs. Budget (issue
5): under 1% of one core, RSS under 80 MB. Exits 1 over budget.

    python -m bench agent [--duration 120] [--interval 10] [--peers 8] [--cluster-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from e2e import parts
from e2e.cluster import LocalCluster
from e2e.waiting import free_port

REPO = Path(__file__).resolve().parents[2]
CPU_BUDGET_PERCENT = 1.0
RSS_BUDGET_MB = 80.0
SCRAPE_EVERY = 15.0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of stat; index 11 and 12 after the name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _meshnode_written(cluster: LocalCluster, node: str, field: str = "heartbeatTime") -> bool:
    out = cluster.kubectl("get", "meshnode", node, "-o", "json", "--ignore-not-found")
    return bool(out.strip()) and field in out


def _meshnode_status(cluster: LocalCluster, node: str) -> dict[str, Any]:
    out = cluster.kubectl("get", "meshnode", node, "-o", "json", "--ignore-not-found")
    return dict(json.loads(out).get("status") or {}) if out.strip() else {}


def _start_peers(
    cluster: LocalCluster, count: int, interval: int, work: Path
) -> list[tuple[str, subprocess.Popen[bytes]]]:
    """Other nodes' agents on 127.0.0.2, .3, ...: what the measured one probes."""
    peers = []
    for k in range(count):
        node = f"bench-peer-{os.getpid()}-{k}"
        env = {
            **os.environ,
            "NODE_NAME": node,
            "KUBECONFIG": str(cluster.kubeconfig),
            "MESH_AGENT_INTERVAL": str(interval),
            "MESH_AGENT_LISTEN": f"127.0.0.{k + 2}:{free_port()}",
            "MESH_AGENT_STATE_DIR": str(work / "state"),
            "MESH_AGENT_DISCOVER_RPC": "false",
            "MESH_AGENT_LOG_LEVEL": "warning",
        }
        with (work / f"{node}.log").open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, *ENTRIES["mesh"]],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        peers.append((node, proc))
    deadline = time.monotonic() + 180
    for node, proc in peers:
        while not _meshnode_written(cluster, node, "probeEndpoint"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"peer agent {node} did not publish; see {work}")
            time.sleep(0.5)
    return peers


# `mesh agent` as the DaemonSet runs it, and the agent's subcommand module alone
# (what `mesh agent` costs once the dispatcher imports only the chosen command).
ENTRIES = {
    "mesh": ["-m", "mesh_operator.cli.main", "agent"],
    "direct": [
        "-c",
        "import argparse, sys; from mesh_operator.cli import agent_cmd; "
        "p = argparse.ArgumentParser(); agent_cmd.add_parser(p.add_subparsers()); "
        "sys.exit(agent_cmd.run(p.parse_args(['agent'])))",
    ],
}


def measure(
    cluster: LocalCluster,
    duration: float,
    interval: int,
    work: Path,
    entry: str = "mesh",
    *,
    peers: int = 8,
) -> dict[str, object]:
    cluster.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        str(REPO / "crds" / "mesh.dev_meshnodes.yaml"),
    )
    cluster.kubectl(
        "wait", "--for=condition=Established", "crd/meshnodes.mesh.dev", "--timeout=60s"
    )
    node = f"bench-agent-{os.getpid()}"
    port = free_port()
    models = parts.mesh_dir() / "models"
    env = {
        **os.environ,
        "NODE_NAME": node,
        "KUBECONFIG": str(cluster.kubeconfig),
        "MESH_AGENT_INTERVAL": str(interval),
        "MESH_AGENT_LISTEN": f"127.0.0.1:{port}",
        "MESH_AGENT_STATE_DIR": str(work / "state"),
        "MESH_AGENT_MODEL_CACHE": str(models),
        "MESH_AGENT_LOG_LEVEL": "warning",
    }
    log = work / "agent.log"
    # Started first, so the measured agent finds every peer in its first listing.
    peer_procs = _start_peers(cluster, peers, interval, work)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, *ENTRIES[entry]],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while not _meshnode_written(cluster, node):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent did not write its MeshNode; see {log}")
            time.sleep(0.5)
        time.sleep(interval)  # one steady cycle before measuring
        cpu0, wall0 = _cpu_seconds(proc.pid), time.monotonic()
        rss_samples: list[int] = []
        scrapes = 0
        next_scrape = wall0
        while time.monotonic() - wall0 < duration:
            if time.monotonic() >= next_scrape:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    r.read()
                scrapes += 1
                next_scrape += SCRAPE_EVERY
            rss_samples.append(_status_kb(proc.pid, "VmRSS"))
            time.sleep(1.0)
        cpu1, wall1 = _cpu_seconds(proc.pid), time.monotonic()
        peak = _status_kb(proc.pid, "VmHWM")
        status = _meshnode_status(cluster, node)
    finally:
        for name, running in [(node, proc), *peer_procs]:
            os.killpg(running.pid, signal.SIGTERM)
            running.wait(timeout=30)
            cluster.kubectl("delete", "meshnode", name, "--wait=false", check=False)
    trips = status.get("roundTrips", [])
    cpu_percent = 100 * (cpu1 - cpu0) / (wall1 - wall0)
    return {
        "entry": entry,
        "interval_s": interval,
        "measured_s": round(wall1 - wall0, 1),
        "scrapes": scrapes,
        "cpu_percent_of_one_core": round(cpu_percent, 3),
        "rss_mb_mean": round(sum(rss_samples) / len(rss_samples) / 1024, 1),
        "rss_mb_max": round(max(rss_samples) / 1024, 1),
        "rss_mb_peak_hwm": round(peak / 1024, 1),
        "peers": peers,
        "round_trips_published": len(trips),
        "probes_per_peer": min((t["samples"] for t in trips), default=0),
        "round_trip_ms": status.get("roundTripMs"),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench agent", description=__doc__)
    parser.add_argument("--duration", type=float, default=120.0)
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument(
        "--entry",
        choices=sorted(ENTRIES),
        default="mesh",
        help="mesh: `mesh agent`; direct: the agent command module alone",
    )
    parser.add_argument(
        "--cluster-dir",
        type=Path,
        default=None,
        help="reuse a cluster started by `python -m e2e.cluster up`",
    )
    parser.add_argument(
        "--peers", type=int, default=8, help="other agents the measured one probes (0: none)"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.peers <= 200:
        parser.error("--peers must be between 0 and 200")
    with tempfile.TemporaryDirectory(prefix="mesh-bench-agent-") as tmp:
        work = Path(tmp)
        cluster = LocalCluster(args.cluster_dir or work / "cluster")
        started_here = not (args.cluster_dir and cluster.status())
        cluster.up()
        try:
            result = measure(
                cluster, args.duration, args.interval, work, args.entry, peers=args.peers
            )
        finally:
            if started_here:
                cluster.down()
    print(json.dumps(result, indent=2))
    over = (
        float(result["cpu_percent_of_one_core"]) >= CPU_BUDGET_PERCENT  # type: ignore[arg-type]
        or float(result["rss_mb_max"]) >= RSS_BUDGET_MB  # type: ignore[arg-type]
    )
    print(
        f"agent: {result['cpu_percent_of_one_core']}% of a core (budget {CPU_BUDGET_PERCENT}%), "
        f"RSS {result['rss_mb_max']} MB max (budget {RSS_BUDGET_MB} MB): "
        + ("OVER BUDGET" if over else "within budget")
    )
    return 1 if over else 0
