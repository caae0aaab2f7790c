"""Fixtures shared by every tier: the real parts and the local control plane.

A test that needs a real part asks for it through a fixture. When the part is
missing, the test is skipped on a developer machine but fails under CI
(`CI=true`), where `scripts/setup.sh` has built everything.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from e2e import parts, tinymodels
from e2e.cluster import ClusterError, LocalCluster
from e2e.hubserver import HubServer, project_repos, project_tokens, serve_hub


def require_part(lookup: Callable[[], Path]) -> Path:
    """Return the part, or skip (fail under CI) naming what is missing."""
    try:
        return lookup()
    except parts.PartMissingError as exc:
        if parts.under_ci():
            pytest.fail(f"real part missing under CI: {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    return require_part(lambda: parts.binary("llama-server"))


@pytest.fixture(scope="session")
def rpc_server_bin() -> Path:
    return require_part(lambda: parts.binary("ggml-rpc-server"))


@pytest.fixture(scope="session")
def model_file() -> Path:
    return require_part(parts.model_path)


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., Path]:
    """`tiny_model("qwen3moe")`: the project's tiny model of an architecture.

    Made from seeded random weights by `e2e.tinymodels` (numpy and the gguf
    package only, so never missing), then cached.
    """
    return tinymodels.make_model


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A real control plane for the whole session, stopped by pid at the end.

    Set MESH_TEST_CLUSTER_DIR to reuse a cluster started by `python -m e2e.cluster up`.
    """
    for name in ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"):
        require_part(lambda name=name: parts.binary(name))  # type: ignore[misc]
    shared = os.environ.get("MESH_TEST_CLUSTER_DIR")
    if shared:
        local = LocalCluster(Path(shared))
        local.up()
        yield local
        return
    local = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        local.up()
    except ClusterError:
        local.down()
        raise
    try:
        yield local
    finally:
        local.down()


@pytest.fixture
def namespace(cluster: LocalCluster) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def crds(cluster: LocalCluster) -> LocalCluster:
    """The generated CRDs from crds/, installed and Established."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO_ROOT / "crds"))
    cluster.wait_established(*(f"{p}.mesh.dev" for p in ("meshpools", "meshmodels", "meshnodes")))
    return cluster


@pytest.fixture(scope="session")
def hub(model_file: Path) -> Iterator[HubServer]:
    """A stand-in Hugging Face Hub (`HF_ENDPOINT`) serving the project's model under
    the README's repository and file name, and in a gated repository."""
    with serve_hub(project_repos(model_file), project_tokens()) as server:
        yield server
