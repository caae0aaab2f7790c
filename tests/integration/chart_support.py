"""Helpers of the chart's tests: run the built helm, render the chart, install
stand-ins for the Prometheus operator's CRDs (`e2e.realcluster`), run a `mesh`
command as a local process."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from e2e import parts
from e2e.cluster import LocalCluster
from e2e.procs import stop_popen
from e2e.realcluster import install_monitoring_crds
from tests.conftest import require_part

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "mesh"
EXAMPLES = REPO / "manifests" / "examples"
VALUES_FILES = sorted(EXAMPLES.glob("values-*.yaml"))

__all__ = [
    "CHART",
    "EXAMPLES",
    "REPO",
    "VALUES_FILES",
    "MeshProcess",
    "documents",
    "helm",
    "helm_bin",
    "http_ok",
    "install_monitoring_crds",
    "template",
    "values_of",
]


def helm_bin() -> Path:
    return require_part(lambda: parts.binary("helm"))


def helm(*args: str, cluster: LocalCluster | None = None, check: bool = True) -> str:
    """Run helm (against `cluster` when given) and return its stdout."""
    argv = [str(helm_bin()), *args]
    if cluster is not None:
        argv += ["--kubeconfig", str(cluster.kubeconfig)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}{result.stdout}")
    return result.stdout


def template(
    release: str,
    namespace: str,
    values: Sequence[Path] = (),
    sets: Sequence[str] = (),
    set_json: Sequence[str] = (),
) -> str:
    """`helm template` of the chart, hooks (the helm test pod) included."""
    args = ["template", release, str(CHART), "--namespace", namespace, "--kube-version", "1.34.0"]
    for path in values:
        args += ["-f", str(path)]
    for item in sets:
        args += ["--set", item]
    for item in set_json:
        args += ["--set-json", item]
    return helm(*args)


def documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def values_of(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    loaded: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
    return loaded


class MeshProcess:
    """A `mesh <command>` process of the repository's Python, logging to a file,
    stopped by its pid (SIGTERM, then SIGKILL)."""

    def __init__(self, args: Sequence[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        argv = [sys.executable, "-m", "mesh_operator.cli.main", *args]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env={**os.environ, **env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 20.0) -> int:
        return stop_popen(self.proc, grace)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False
