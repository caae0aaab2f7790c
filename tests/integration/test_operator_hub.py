"""The operator, a `mesh operator` process on the real API server, reading the GGUF
header of Hugging Face models through the stand-in Hub given as `HF_ENDPOINT`: the
README's model plans, a gated one plans with the token of its Secret, and a gated
model without a token, with a refused token, or a file that is not there each get
a condition saying so."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from e2e.chaos import OperatorProcess
from e2e.cluster import LocalCluster
from e2e.hubserver import GATED_REPO, GRANTED_TOKEN, README_FILE, README_REPO, HubServer
from e2e.waiting import wait_for
from mesh_operator.planner import read_model_profile
from tests.integration.kube_helpers import apply, condition, get, gpu_device, put_meshnode

pytestmark = pytest.mark.integration

KWOK_TOLERATION = {"key": "kwok.x-k8s.io/node", "operator": "Exists", "effect": "NoSchedule"}


@pytest.fixture
def operator(
    crds: LocalCluster,
    hub: HubServer,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[OperatorProcess]:
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    proc = OperatorProcess(
        crds.kubeconfig, tmp_path, namespace=namespace, identity="hub-test", lease="mesh-hub-test"
    )
    proc.start()
    try:
        wait_for("the operator to be healthy", proc.healthy, timeout=60)
        yield proc
    finally:
        proc.stop()
        logs = "".join(p.read_text(errors="replace") for p in tmp_path.glob("operator-*.log"))
        assert "Traceback" not in logs, logs[-5000:]


@pytest.fixture
def pool(crds: LocalCluster, namespace: str) -> Iterator[str]:
    """A pool of three simulated GPU nodes, one for each model that plans (a device
    serves one model), each with RAM for a draft model on the host's CPU."""
    name = f"hub-{namespace}"
    nodes = [f"{name}-{i}" for i in range(3)]
    for node in nodes:
        crds.add_kwok_node(node, gpus=1, labels={"mesh-test-pool": name})
        put_meshnode(
            crds, node, [gpu_device(0, 1000, 990, 900.0, "Test GPU")], hostMemoryFreeMiB=4096
        )
    apply(
        crds,
        {
            "apiVersion": "mesh.dev/v1alpha1",
            "kind": "MeshPool",
            "metadata": {"name": name},
            "spec": {
                "backend": "cuda",
                "nodeSelector": {"mesh-test-pool": name},
                "tolerations": [KWOK_TOLERATION],
            },
        },
    )
    yield name
    made = [f"meshpool/{name}", *(f"{kind}/{n}" for n in nodes for kind in ("node", "meshnode"))]
    crds.kubectl("delete", *made, "--wait=false", "--ignore-not-found", check=False)


def _secret(cluster: LocalCluster, namespace: str, name: str, token: str) -> None:
    apply(
        cluster,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace},
            "data": {"token": base64.b64encode(token.encode()).decode()},
        },
    )


def _model(
    cluster: LocalCluster,
    namespace: str,
    name: str,
    pool: str,
    draft: dict[str, Any] | None = None,
    **hf: Any,
) -> None:
    """A MeshModel of the Hub file `hf`, with a draft model from the Hub file `draft`."""
    spec: dict[str, Any] = {"poolRef": pool, "contextSize": 1024, "source": {"huggingface": hf}}
    if draft is not None:
        spec["draft"] = {"source": {"huggingface": draft}}
    apply(
        cluster,
        {
            "apiVersion": "mesh.dev/v1alpha1",
            "kind": "MeshModel",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        },
    )


def _planned(
    cluster: LocalCluster, namespace: str, name: str, status: str, reason: str | None = None
) -> dict[str, Any] | None:
    """The model once its Planned condition has `status` (and `reason`)."""
    obj: dict[str, Any] | None = get(cluster, "meshmodel", name, "-n", namespace)
    cond = condition(obj, "Planned")
    if obj and cond and cond["status"] == status and reason in (None, cond["reason"]):
        return obj
    return None


def test_hugging_face_models_are_read_through_the_hub_or_say_why_not(
    operator: OperatorProcess,
    crds: LocalCluster,
    hub: HubServer,
    model_file: Path,
    namespace: str,
    pool: str,
) -> None:
    cluster = crds
    since = hub.mark()
    _secret(cluster, namespace, "hf-granted", GRANTED_TOKEN)
    _secret(cluster, namespace, "hf-refused", "hf_revoked_token")
    readme: dict[str, Any] = {"repo": README_REPO, "file": README_FILE}
    gated: dict[str, Any] = {"repo": GATED_REPO, "file": README_FILE}
    _model(cluster, namespace, "readme", pool, **readme)
    _model(
        cluster, namespace, "gated", pool,
        **gated, tokenSecretRef={"name": "hf-granted", "key": "token"},
    )  # fmt: skip
    _model(cluster, namespace, "gated-no-token", pool, **gated)
    _model(
        cluster, namespace, "gated-refused", pool,
        **gated, tokenSecretRef={"name": "hf-refused", "key": "token"},
    )  # fmt: skip
    _model(
        cluster, namespace, "no-file", pool, repo=README_REPO, file="absent.gguf", revision="main"
    )
    _model(cluster, namespace, "no-revision", pool, **readme, revision="v1")
    # A public model whose draft is gated: the draft's own token reads and fetches it.
    # (A Secret of its own, so that its header is read, not the gated model's kept.)
    _secret(cluster, namespace, "hf-draft", GRANTED_TOKEN)
    granted = {"name": "hf-granted", "key": "token"}
    draft_token = {"name": "hf-draft", "key": "token"}
    _model(
        cluster, namespace, "gated-draft", pool, **readme,
        draft={**gated, "tokenSecretRef": draft_token},
    )  # fmt: skip
    _model(cluster, namespace, "gated-draft-no-token", pool, **readme, draft=gated)

    size = read_model_profile(model_file).file_bytes
    for name in ("readme", "gated"):
        obj = wait_for(f"{name} planned", partial(_planned, cluster, namespace, name, "True"))
        assert obj["status"]["modelSizeBytes"] == size
        assert len(obj["status"]["plan"]["rpc"]) == 1

    # The host's `mesh fetch` downloads the same file from the same Hub, with the token.
    def fetcher() -> dict[str, Any] | None:
        dep = get(cluster, "deployment", "gated-host", "-n", namespace)
        init = dep["spec"]["template"]["spec"]["initContainers"] if dep else []
        return next((c for c in init if c["name"] == "fetch"), None)

    fetch = wait_for("the gated model's fetch container", fetcher)
    args = fetch["args"]
    assert args[args.index("--hf-repo") + 1] == GATED_REPO
    assert args[args.index("--hf-file") + 1] == README_FILE
    env = {e["name"]: e for e in fetch["env"]}
    assert env["HF_ENDPOINT"]["value"] == hub.endpoint
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == granted

    # The gated draft was read with its own token, and its fetch carries that token
    # while the public model's fetch carries none.
    wait_for("gated-draft planned", partial(_planned, cluster, namespace, "gated-draft", "True"))

    def draft_fetchers() -> dict[str, dict[str, Any]] | None:
        dep = get(cluster, "deployment", "gated-draft-host", "-n", namespace)
        init = dep["spec"]["template"]["spec"]["initContainers"] if dep else []
        found = {c["name"]: c for c in init if c["name"] in ("fetch", "fetch-draft")}
        return found if len(found) == 2 else None

    fetchers = wait_for("gated-draft's fetch containers", draft_fetchers)
    draft_env = {e["name"]: e for e in fetchers["fetch-draft"]["env"]}
    assert draft_env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == draft_token
    assert "HF_TOKEN" not in {e["name"] for e in fetchers["fetch"].get("env", [])}

    expected = {
        "gated-no-token": ("SourceForbidden", ["token missing", GATED_REPO]),
        "gated-refused": ("SourceForbidden", ["token refused", GATED_REPO]),
        "no-file": ("SourceNotFound", ["file not found", README_REPO, "absent.gguf", "main"]),
        "no-revision": ("SourceNotFound", ["revision v1 not found", README_REPO, README_FILE]),
        "gated-draft-no-token": ("SourceForbidden", ["draft model", "token missing", GATED_REPO]),
    }
    for name, (reason, says) in expected.items():
        probe = partial(_planned, cluster, namespace, name, "False", reason)
        obj = wait_for(f"{name}'s condition {reason}", probe)
        cond = condition(obj, "Planned")
        assert cond and "\n" not in cond["message"], cond
        assert all(s in cond["message"] for s in says), cond
        ready = condition(obj, "Ready")
        assert ready and ready["reason"] == reason

    # The header was read by ranges of the blob; the Secret's token went to the Hub
    # for the gated model, never to the CDN.
    resolves = [s for s in hub.requests("hub", since=since) if "/resolve/" in s.path]
    assert {(s.path.split("/resolve/")[0], s.token) for s in resolves} >= {
        (f"/{README_REPO}", None),
        (f"/{GATED_REPO}", GRANTED_TOKEN),
        (f"/{GATED_REPO}", None),
        (f"/{GATED_REPO}", "hf_revoked_token"),
    }
    blob_reads = hub.requests("cdn", "GET", since=since)
    assert blob_reads and all(s.range and s.token is None for s in blob_reads)


def test_a_header_read_with_a_token_is_not_given_to_another_namespaces_secret(
    operator: OperatorProcess,
    crds: LocalCluster,
    hub: HubServer,
    namespace: str,
    pool: str,
) -> None:
    """The gated model's profile, once read with the granted token, is not handed
    to a model in another namespace whose Secret of the same name holds a token
    the Hub refuses: that model is read with its own token and refused."""
    cluster = crds
    other = f"{namespace}-b"
    cluster.kubectl("create", "namespace", other)
    try:
        gated: dict[str, Any] = {"repo": GATED_REPO, "file": README_FILE}
        ref = {"tokenSecretRef": {"name": "hf", "key": "token"}}
        _secret(cluster, namespace, "hf", GRANTED_TOKEN)
        _model(cluster, namespace, "gated", pool, **gated, **ref)
        wait_for("gated planned", partial(_planned, cluster, namespace, "gated", "True"))

        since = hub.mark()
        _secret(cluster, other, "hf", "hf_revoked_token")
        _model(cluster, other, "gated", pool, **gated, **ref)
        probe = partial(_planned, cluster, other, "gated", "False", "SourceForbidden")
        obj = wait_for("the other namespace's model refused", probe)
        cond = condition(obj, "Planned")
        assert cond and "token refused" in cond["message"], cond
        tokens = {s.token for s in hub.requests("hub", since=since) if "/resolve/" in s.path}
        assert tokens == {"hf_revoked_token"}, tokens
    finally:
        cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)
