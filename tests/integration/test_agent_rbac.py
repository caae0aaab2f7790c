"""The RBAC and admission policy of docs/agent.md, applied to the real API server and
checked by impersonating the agent's service account on one node."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from e2e.cluster import LocalCluster
from mesh_operator.api.base import GROUP, MESHNODE_PLURAL, VERSION
from mesh_operator.kubeclient import api_client
from tests.integration.agent_support import REPO, install_meshnode_crd, wait_for

pytestmark = pytest.mark.integration

AGENT_USER = "system:serviceaccount:mesh-system:mesh-agent"
NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
APPLY = "application/apply-patch+yaml"


def rbac_documents() -> list[dict[str, Any]]:
    text = (REPO / "docs" / "agent.md").read_text()
    section = text.split("## RBAC", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```yaml\n(.*?)```", section, flags=re.DOTALL)
    return [d for d in yaml.safe_load_all(block) if d]


def as_agent_on(cluster: LocalCluster, node: str) -> client.CustomObjectsApi:
    api = api_client(cluster.kubeconfig)
    headers = {
        "Impersonate-User": AGENT_USER,
        "Impersonate-Group": "system:serviceaccounts",
        # Header names carry the extra key percent-encoded.
        "Impersonate-Extra-" + NODE_NAME_EXTRA.replace("/", "%2F"): node,
    }
    api.default_headers.update(headers)
    return client.CustomObjectsApi(api)


def apply_meshnode(api: client.CustomObjectsApi, name: str) -> None:
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MeshNode",
        "metadata": {"name": name},
        "spec": {"nodeName": name},
    }
    api.patch_cluster_custom_object(
        GROUP,
        VERSION,
        MESHNODE_PLURAL,
        name,
        body,
        field_manager="mesh-agent",
        force=True,
        _content_type=APPLY,
    )


def test_agent_may_write_only_its_own_meshnode(cluster: LocalCluster, tmp_path: Path) -> None:
    install_meshnode_crd(cluster)
    docs = rbac_documents()
    assert {d["kind"] for d in docs} == {
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    manifest = tmp_path / "rbac.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(manifest))

    mine, other = f"own-{uuid.uuid4().hex[:6]}", f"other-{uuid.uuid4().hex[:6]}"
    agent = as_agent_on(cluster, mine)

    def own_write_allowed() -> bool:
        # The policy takes a moment to be loaded by the API server.
        try:
            apply_meshnode(agent, mine)
        except ApiException:
            return False
        return True

    wait_for("the agent's write to its own MeshNode", own_write_allowed, timeout=30)
    agent.patch_cluster_custom_object_status(
        GROUP,
        VERSION,
        MESHNODE_PLURAL,
        mine,
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "MeshNode",
            "metadata": {"name": mine},
            "status": {"intervalSeconds": 10},
        },
        field_manager="mesh-agent",
        force=True,
        _content_type=APPLY,
    )
    assert agent.get_cluster_custom_object(GROUP, VERSION, MESHNODE_PLURAL, mine)

    def other_write_denied() -> ApiException | None:
        try:
            apply_meshnode(agent, other)
        except ApiException as exc:
            return exc
        cluster.kubectl("delete", "meshnode", other, "--wait=false")
        return None

    denied = wait_for("the policy to deny another node's MeshNode", other_write_denied, 30)
    assert "only write the MeshNode of the node it runs on" in (denied.body or "")

    with pytest.raises(ApiException) as deleting:
        agent.delete_cluster_custom_object(GROUP, VERSION, MESHNODE_PLURAL, mine)
    assert deleting.value.status == 403
    # Listing is allowed: the other agents' probe endpoints (round trips).
    listed = agent.list_cluster_custom_object(GROUP, VERSION, MESHNODE_PLURAL)
    assert isinstance(listed, dict)
    assert mine in {item["metadata"]["name"] for item in listed["items"]}
    cluster.kubectl("delete", "meshnode", mine, "--wait=false")
