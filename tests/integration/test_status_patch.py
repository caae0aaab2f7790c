"""A status patch names the object it is for (its uid): a decision about a model
that was deleted never lands on the model made after it under the same name."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from e2e.cluster import LocalCluster
from mesh_operator.handlers.kube import Kube
from mesh_operator.kubeclient import api_client
from tests.integration.kube_helpers import apply, get

pytestmark = pytest.mark.integration


@pytest.fixture
def kube(crds: LocalCluster) -> Iterator[Kube]:
    client = api_client(crds.kubeconfig)
    yield Kube(client)
    client.close()  # type: ignore[no-untyped-call]


def _model(cluster: LocalCluster, namespace: str) -> str:
    apply(
        cluster,
        {
            "apiVersion": "mesh.dev/v1alpha1",
            "kind": "MeshModel",
            "metadata": {"name": "same", "namespace": namespace},
            "spec": {"source": {"url": "http://files/a.gguf"}, "poolRef": "p"},
        },
    )
    uid: str = get(cluster, "meshmodel", "same", "-n", namespace)["metadata"]["uid"]
    return uid


def test_a_status_patch_for_a_replaced_model_is_refused(
    crds: LocalCluster, namespace: str, kube: Kube
) -> None:
    old = _model(crds, namespace)
    assert kube.replace_model_status("same", namespace, old, {"nodes": "a", "split": "1"})
    crds.kubectl("delete", "meshmodel", "same", "-n", namespace)
    new = _model(crds, namespace)
    assert new != old
    assert not kube.replace_model_status("same", namespace, old, {"nodes": "stale"}), (
        "the old object's status must not land on the new one"
    )
    assert "nodes" not in (get(crds, "meshmodel", "same", "-n", namespace).get("status") or {})
    assert kube.replace_model_status("same", namespace, new, {"nodes": "b", "split": "2"})
    assert kube.replace_model_status("same", namespace, new, {"nodes": "c"})
    status = get(crds, "meshmodel", "same", "-n", namespace)["status"]
    assert status["nodes"] == "c" and "split" not in status, "the whole status is replaced"
    crds.kubectl("delete", "meshmodel", "same", "-n", namespace)
    assert not kube.replace_model_status("same", namespace, new, {"nodes": "d"}), "gone"
