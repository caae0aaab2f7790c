"""Whether a model's host may run when its workers refuse its RPC protocol: the
host pods' statuses as the API server gives them, through the snapshot's reading
of them, to the decision. One row per answer the decision can give."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from mesh_operator.api.contract import IMAGES_ANNOTATION, PLAN_ANNOTATION
from mesh_operator.api.meshmodel import VersionMismatch
from mesh_operator.handlers.snapshot import pod_info
from mesh_operator.handshake import (
    Group,
    HostExit,
    Worker,
    decide_host,
    mismatch_message,
    read_refusal,
)
from mesh_operator.manifests.workloads import build_host_deployment, host_image, rpc_images
from tests.unit.test_manifests import workload

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "handshake"
# The host's termination message (FallbackToLogsOnError: its log's tail) from a
# real run: llama-server of the pinned build against an older ggml-rpc-server.
REFUSED = (FIXTURES / "rpc-version-mismatch.log").read_text()
# The same log without the version line, which llama.cpp's asynchronous logger
# may not have written before the abort.
ABORT_ONLY = "".join(
    line for line in REFUSED.splitlines(keepends=True) if "version mismatch" not in line
)
# Only the version line, as a tail cut short would hold it.
VERSION_ONLY = "".join(
    line for line in REFUSED.splitlines(keepends=True) if "version mismatch" in line
)
# A host that ended for another reason: its model file missing (a real run).
OTHER_CRASH = (FIXTURES / "model-missing.log").read_text()

NEW = "ghcr.io/mesh-dev/llama.cpp:0.3.36-cpu"
OLD = "ghcr.io/mesh-dev/llama.cpp:0.3.22-cpu"


def refused_endpoint() -> str | None:
    refusal = read_refusal(REFUSED)
    return refusal.endpoint if refusal is not None else None


GROUP = Group(
    llama_server=NEW,
    workers=(
        Worker("node-b", OLD, refused_endpoint()),
        Worker("node-c", OLD, "10.0.0.9:50052"),
    ),
    generation=1,
    pool_generation=1,
)
KEY = GROUP.images_key
RECORDED = VersionMismatch(
    llama_server=NEW,
    rpc_servers=[OLD],
    nodes=["node-b"],
    worker_version="4.0.0",
    generation=1,
    pool_generation=1,
)


def host_pod(
    *, state: dict[str, Any] | None = None, last: dict[str, Any] | None = None, key: str = KEY
) -> dict[str, Any]:
    """A host pod's body with one llama-server container in `state`."""
    status: dict[str, Any] = {"name": "llama-server", "restartCount": 1, "state": state or {}}
    if last is not None:
        status["lastState"] = last
    return {
        "metadata": {
            "name": "gemma-host-7d9c-x2x",
            "annotations": {PLAN_ANNOTATION: "1", IMAGES_ANNOTATION: key},
        },
        "status": {"phase": "Running", "containerStatuses": [status]},
    }


def terminated(message: str) -> dict[str, Any]:
    return {"terminated": {"exitCode": 134, "reason": "Error", "message": message}}


CRASH_LOOP = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s restarting"}}


@dataclass
class Row:
    id: str
    pods: list[dict[str, Any]] = field(default_factory=list)
    previous: VersionMismatch | None = None
    group: Group = GROUP
    run: bool = True
    found: bool = False
    named: list[str] = field(default_factory=list)  # rpc-server images the record names
    nodes: list[str] = field(default_factory=list)
    version: str | None = "4.0.0"


ROWS = [
    Row(
        "mismatch in the last state, waiting in CrashLoopBackOff",
        pods=[host_pod(state=CRASH_LOOP, last=terminated(REFUSED))],
        run=False, found=True, named=[OLD], nodes=["node-b"],
    ),
    Row(
        "mismatch in the current terminated state",
        pods=[host_pod(state=terminated(REFUSED))],
        run=False, found=True, named=[OLD], nodes=["node-b"],
    ),
    Row(
        "only the abort line: a mismatch of unknown version",
        pods=[host_pod(state=terminated(ABORT_ONLY))],
        run=False, found=True, named=[OLD], nodes=["node-b"], version=None,
    ),
    Row(
        "another crash is not a mismatch",
        pods=[host_pod(state=CRASH_LOOP, last=terminated(OTHER_CRASH))],
    ),
    Row("no host pod", pods=[]),
    Row(
        "a host of other images is no evidence about these",
        pods=[host_pod(state=terminated(REFUSED), key="0123456789abcdef")],
    ),
    Row(
        "only the version line: every worker is named",
        pods=[host_pod(state=terminated(VERSION_ONLY))],
        run=False, found=True, named=[OLD], nodes=["node-b", "node-c"],
    ),
    Row(
        "refused by a worker no longer in the group (its image changed since)",
        pods=[host_pod(state=terminated(REFUSED))],
        group=replace(GROUP, workers=tuple(replace(w, endpoint=None) for w in GROUP.workers)),
    ),
    Row(
        "recorded, same images and specs: stays stopped without a pod",
        previous=RECORDED, run=False, named=[OLD], nodes=["node-b"],
    ),
    Row("recorded, the model's spec changed: retried", previous=RECORDED,
        group=replace(GROUP, generation=2)),
    Row("recorded, the pool's spec changed: retried", previous=RECORDED,
        group=replace(GROUP, pool_generation=2)),
    Row(
        "recorded, the workers' image changed: retried",
        previous=RECORDED,
        group=replace(GROUP, workers=tuple(replace(w, image=NEW) for w in GROUP.workers)),
    ),
]  # fmt: skip


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_host_verdict(row: Row) -> None:
    infos = [pod_info(body) for body in row.pods]
    hosts = [HostExit(p.name, p.images_key, p.exits) for p in infos]
    verdict = decide_host(row.previous, hosts, row.group)
    assert verdict.run is row.run
    assert verdict.found is row.found
    if row.run:
        assert verdict.mismatch is None and verdict.message == ""
        return
    assert verdict.mismatch is not None
    assert verdict.mismatch.llama_server == NEW
    assert verdict.mismatch.rpc_servers == row.named
    assert verdict.mismatch.nodes == row.nodes
    assert verdict.mismatch.worker_version == row.version
    assert (verdict.mismatch.generation, verdict.mismatch.pool_generation) == (
        row.group.generation,
        row.group.pool_generation,
    )
    # The condition's message names both images and the worker's version.
    assert NEW in verdict.message and OLD in verdict.message
    assert row.version is None or row.version in verdict.message


def test_recorded_log_holds_the_refusal() -> None:
    refusal = read_refusal(REFUSED)
    assert refusal is not None
    assert refusal.worker_version == "4.0.0"
    assert refusal.line == "RPC server version mismatch: 4.0.0"
    assert refusal.endpoint is not None and refusal.endpoint.endswith(":50052")


def test_kubelet_keeps_the_refusal_in_the_termination_message() -> None:
    # FallbackToLogsOnError keeps the last 80 lines or 2048 bytes of the log,
    # whichever is less: the refusal must be within that tail.
    tail = "\n".join(REFUSED.encode()[-2048:].decode(errors="replace").splitlines()[-80:])
    assert read_refusal(tail) is not None


def test_message_without_version_or_nodes() -> None:
    bare = RECORDED.model_copy(update={"worker_version": None, "nodes": []})
    message = mismatch_message(bare)
    assert NEW in message and OLD in message and " on " not in message


def test_host_pods_carry_the_images_the_decision_compares() -> None:
    w = workload(pool={"images": {"rpcServer": OLD, "llamaServer": NEW}})
    deployment = build_host_deployment(w)
    template = deployment["spec"]["template"]
    container = template["spec"]["containers"][0]
    assert container["terminationMessagePolicy"] == "FallbackToLogsOnError"
    group = Group(
        llama_server=host_image(w),
        workers=tuple(Worker(n, image) for n, image in rpc_images(w).items()),
        generation=1,
        pool_generation=1,
    )
    assert template["metadata"]["annotations"][IMAGES_ANNOTATION] == group.images_key
    other = workload(pool={"images": {"rpcServer": NEW, "llamaServer": NEW}})
    other_key = build_host_deployment(other)["spec"]["template"]["metadata"]["annotations"]
    assert other_key[IMAGES_ANNOTATION] != group.images_key
