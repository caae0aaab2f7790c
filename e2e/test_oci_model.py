"""A model kept as an OCI image, served on real nodes (`e2e.realcluster`, whose
nodes run containerd 2 with the ImageVolume gate on): `mesh push-model` pushes
gemma-3-270m to the nodes' registry, a MeshModel names it by digest in
`source.oci`, the operator (in its pod) reads the header through the registry
API and plans, and the host pod mounts the image read-only as an `image` volume
(pulled by the node's containerd, no fetch container) and answers a chat through
the gateway."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from e2e import parts
from e2e.realcluster import CONTEXT, OUTSIDE, POOL, Model, RealCluster
from e2e.test_real_cluster import CHAT, gateway_url
from tests.conftest import require_part

pytestmark = pytest.mark.e2e

IMAGE_MODEL = Model("gemma-oci", "ai")
REPOSITORY = "models/gemma-3-270m"


@pytest.fixture(scope="module")
def served(real_mesh: RealCluster) -> Iterator[tuple[RealCluster, str]]:
    """gemma-3-270m pushed as an image and served from it; its reference by
    digest. The model and the probe pods go again afterwards (the installation
    is shared)."""
    mesh = real_mesh
    model_file = require_part(parts.model_path)
    result = subprocess.run(
        [
            str(parts.mesh_cli()), "push-model", str(model_file),
            f"{mesh.nodes.registry}/{REPOSITORY}:q4_k_m", "--plain-http",
        ],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    reference = result.stdout.strip()
    mesh.apply(
        {
            "apiVersion": "mesh.dev/v1alpha1",
            "kind": "MeshModel",
            "metadata": {"name": IMAGE_MODEL.name, "namespace": IMAGE_MODEL.namespace},
            "spec": {
                "poolRef": POOL,
                "source": {"oci": {"reference": reference}},
                "contextSize": CONTEXT,
                "parallel": 1,
            },
        }
    )
    try:
        mesh.wait_ready(IMAGE_MODEL)
        yield mesh, reference
    finally:
        mesh.delete_started_pods()
        mesh.kubectl(
            "delete", "meshmodel", IMAGE_MODEL.name, "-n", IMAGE_MODEL.namespace,
            "--ignore-not-found", "--wait=true", check=False,
        )  # fmt: skip


def test_the_host_mounts_the_image_and_fetches_nothing(served: tuple[RealCluster, str]) -> None:
    mesh, reference = served
    (host,) = mesh.model_pods(IMAGE_MODEL, "host")
    spec: dict[str, Any] = host["spec"]
    assert "initContainers" not in spec
    volume = next(v for v in spec["volumes"] if v["name"] == "models")
    assert volume["image"]["reference"] == reference
    (server,) = spec["containers"]
    args = server["args"]
    assert args[args.index("-m") + 1] == "/models/model.gguf"
    # The file is there, read-only, in the running container.
    listing = mesh.exec(host, "llama-server", "ls", "-l", "/models/model.gguf")
    assert listing.startswith("-r--r--r--"), listing
    refused = mesh.kubectl_run(
        "exec", "-n", IMAGE_MODEL.namespace, host["metadata"]["name"], "-c", "llama-server",
        "--", "touch", "/models/written",
    )  # fmt: skip
    assert refused.returncode != 0
    assert "Read-only file system" in refused.stderr + refused.stdout


def test_the_image_was_pulled_by_the_node(served: tuple[RealCluster, str]) -> None:
    mesh, reference = served
    (host,) = mesh.model_pods(IMAGE_MODEL, "host")
    events = mesh.get(
        "events", "-n", IMAGE_MODEL.namespace,
        "--field-selector", f"involvedObject.name={host['metadata']['name']}",
    )  # fmt: skip
    pulled = [e["message"] for e in events["items"] if e.get("reason") == "Pulled"]
    assert any(f'Successfully pulled image "{reference}"' in m for m in pulled), pulled


def test_it_answers_a_chat_through_the_gateway(served: tuple[RealCluster, str]) -> None:
    mesh, _ = served
    url = gateway_url(mesh, "/v1/chat/completions")
    mesh.start_pod(
        "chat-oci", OUTSIDE, {"app": "probe"}, ["python3", "-c", CHAT, url, IMAGE_MODEL.name]
    )
    answers = mesh.pod_output("chat-oci", OUTSIDE).strip().splitlines()
    assert [line.split(" ", 1)[0] for line in answers] == [IMAGE_MODEL.name], answers
