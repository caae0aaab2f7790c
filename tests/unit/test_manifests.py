"""The pure builders of a model's children, grouped by what they build."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from mesh_operator.api.contract import MODEL_NAME_MAX, PLAN_ANNOTATION, REPLICA_LABEL, build_labels
from mesh_operator.api.meshmodel import MeshModelSpec
from mesh_operator.api.meshpool import ImageVariant, MeshPoolSpec
from mesh_operator.manifests.workloads import (
    ModelWorkload,
    PolicyPeers,
    build_header_pod,
    build_host_deployment,
    build_network_policy,
    build_rpc_daemonsets,
    build_service,
    host_deployment_name,
    rpc_daemonset_name,
)

pytestmark = pytest.mark.unit

Obj = dict[str, Any]

RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "image",
    "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip
BASELINE_CAPABILITIES = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip


def pod_security_level(pod: dict[str, Any]) -> str:
    """The strictest Pod Security Standard a pod spec meets (the rules its fields touch)."""
    containers = pod.get("initContainers", []) + pod["containers"]
    volumes = [next(k for k in v if k != "name") for v in pod.get("volumes", [])]
    contexts = [c.get("securityContext", {}) for c in containers]
    if (
        "hostPath" in volumes
        or any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        or any(sc.get("privileged") for sc in contexts)
        or any(
            set(sc.get("capabilities", {}).get("add", [])) - BASELINE_CAPABILITIES
            for sc in contexts
        )
    ):
        return "privileged"
    pod_sc = pod.get("securityContext", {})
    restricted = (
        set(volumes) <= RESTRICTED_VOLUMES
        and pod_sc.get("runAsUser") != 0
        and all(
            sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True
            and sc.get("runAsUser") != 0
            and sc.get("allowPrivilegeEscalation") is False
            and sc.get("capabilities", {}).get("drop") == ["ALL"]
            and set(sc.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}
            and sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type")
            in ("RuntimeDefault", "Localhost")
            for sc in contexts
        )
    )
    return "restricted" if restricted else "baseline"


def workload(
    *,
    pool: dict[str, Any] | None = None,
    spec: dict[str, Any] | None = None,
    rpc_args: dict[str, list[str]] | None = None,
    gpus: dict[str, int] | None = None,
    variants: dict[str, ImageVariant] | None = None,
) -> ModelWorkload:
    nodes = ["node-a", "node-b"]
    return ModelWorkload(
        name="gemma",
        namespace="ai",
        uid="uid-1",
        spec=MeshModelSpec.model_validate(
            {"source": {"url": "https://m.example/gemma.gguf"}, "poolRef": "gpus", **(spec or {})}
        ),
        pool_name="gpus",
        pool=MeshPoolSpec.model_validate(pool or {}),
        plan_generation=3,
        rpc_nodes=nodes,
        host_node="node-b",
        rpc_args=rpc_args or {n: ["-H", "$(POD_IP)", "-p", "50052", "-d", "CUDA0"] for n in nodes},
        llama_args=["-m", "/models/x/gemma.gguf", "--rpc", "10.0.0.1:50052,10.0.0.2:50052"],
        model_path="/models/x/gemma.gguf",
        fetch_args=["--dest", "/models/x/gemma.gguf", "--url", "https://m.example/gemma.gguf"],
        gpus_per_node=gpus or {},
        variants=variants or {},
    )


class TestLabels:
    def test_every_recommended_label_and_the_model_selector(self) -> None:
        labels = build_labels("gemma", "host")
        assert labels == {
            "app.kubernetes.io/name": "mesh",
            "app.kubernetes.io/instance": "gemma",
            "app.kubernetes.io/component": "host",
            "app.kubernetes.io/part-of": "mesh",
            "app.kubernetes.io/managed-by": "mesh-operator",
            "mesh.dev/model": "gemma",
        }


class TestRpcDaemonSets:
    def test_pinned_to_planned_nodes_and_bound_to_the_pod_ip(self) -> None:
        (ds,) = build_rpc_daemonsets(workload())
        pod = ds["spec"]["template"]["spec"]
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        names = [t["matchFields"][0]["values"] for t in terms["nodeSelectorTerms"]]
        assert names == [["node-a"], ["node-b"]]
        container = pod["containers"][0]
        assert container["args"][:2] == ["-H", "$(POD_IP)"]
        assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in (
            container["env"]
        )
        assert "hostNetwork" not in pod
        assert pod["automountServiceAccountToken"] is False
        assert ds["spec"]["template"]["metadata"]["annotations"][PLAN_ANNOTATION] == "3"
        assert ds["metadata"]["ownerReferences"][0]["controller"] is True

    @pytest.mark.parametrize(
        ("pool", "gpus", "variants", "expected"),
        [
            ({"backend": "cuda", "sharing": "exclusive"}, {}, {}, "1"),
            ({"backend": "cuda", "sharing": "exclusive"}, {"node-a": 2, "node-b": 2}, {}, "2"),
            ({"backend": "cuda", "sharing": "shared"}, {}, {}, None),
            ({"backend": "cpu"}, {}, {}, None),
            # A CPU-only node of a cuda pool asks the device plugin for nothing.
            ({"backend": "cuda"}, {}, {"node-a": "cpu", "node-b": "cpu"}, None),
        ],
    )
    def test_gpu_requests_follow_the_sharing_mode_and_the_node(
        self,
        pool: dict[str, Any],
        gpus: dict[str, int],
        variants: dict[str, ImageVariant],
        expected: str | None,
    ) -> None:
        (ds,) = build_rpc_daemonsets(workload(pool=pool, gpus=gpus, variants=variants))
        limits = ds["spec"]["template"]["spec"]["containers"][0].get("resources", {}).get("limits")
        assert (limits or {}).get("nvidia.com/gpu") == expected

    @pytest.mark.parametrize("sharing", ["exclusive", "shared"])
    def test_a_mixed_pool_gets_one_daemonset_per_image_variant(self, sharing: str) -> None:
        pool = {"backend": "cuda", "sharing": sharing, "runtimeClassName": "nvidia"}
        args = {
            "node-a": ["-H", "$(POD_IP)", "-d", "CUDA0"],
            "node-b": ["-H", "$(POD_IP)", "-d", "CPU"],
        }
        sets = build_rpc_daemonsets(
            workload(pool=pool, rpc_args=args, variants={"node-a": "cuda", "node-b": "cpu"})
        )
        pods = {
            d["spec"]["template"]["spec"]["affinity"]["nodeAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ]["nodeSelectorTerms"][0]["matchFields"][0]["values"][0]: d["spec"]["template"]["spec"]
            for d in sets
        }
        assert sorted(pods) == ["node-a", "node-b"]
        gpu, cpu = pods["node-a"], pods["node-b"]
        assert gpu["containers"][0]["image"] == "ghcr.io/mesh-dev/llama.cpp:0.3.36-cuda"
        assert cpu["containers"][0]["image"] == "ghcr.io/mesh-dev/llama.cpp:0.3.36-cpu"
        gpu_env = {e["name"] for e in gpu["containers"][0]["env"]}
        cpu_env = {e["name"] for e in cpu["containers"][0]["env"]}
        assert "CUDA_DEVICE_ORDER" in gpu_env
        assert not {"CUDA_DEVICE_ORDER", "NVIDIA_VISIBLE_DEVICES"} & cpu_env
        assert "resources" not in cpu["containers"][0]
        # The NVIDIA runtime class exists only on GPU nodes.
        assert gpu["runtimeClassName"] == "nvidia"
        assert "runtimeClassName" not in cpu

    @pytest.mark.parametrize(
        ("image", "variant", "expected"),
        [
            ("r.example/llama.cpp:b1-{variant}", "cuda", "r.example/llama.cpp:b1-cuda"),
            ("r.example/llama.cpp:b1-{variant}", "cpu", "r.example/llama.cpp:b1-cpu"),
            ("r.example/rpc:b1", "cuda", "r.example/rpc:b1"),
            ("r.example/rpc:b1", "cpu", "r.example/rpc:b1"),
        ],
    )
    def test_the_variant_placeholder_is_replaced_and_an_image_without_it_kept(
        self, image: str, variant: ImageVariant, expected: str
    ) -> None:
        w = workload(
            pool={"images": {"rpcServer": image}},
            variants={"node-a": variant, "node-b": variant},
        )
        (ds,) = build_rpc_daemonsets(w)
        assert ds["spec"]["template"]["spec"]["containers"][0]["image"] == expected

    @pytest.mark.parametrize(
        ("backend", "expected"),
        [
            ("cuda", "ghcr.io/mesh-dev/llama.cpp:0.3.36-cuda"),
            ("cpu", "ghcr.io/mesh-dev/llama.cpp:0.3.36-cpu"),
        ],
    )
    def test_a_node_without_a_known_variant_follows_the_pool_backend(
        self, backend: str, expected: str
    ) -> None:
        (ds,) = build_rpc_daemonsets(workload(pool={"backend": backend}))
        assert ds["spec"]["template"]["spec"]["containers"][0]["image"] == expected

    def test_nodes_needing_other_arguments_get_their_own_daemonset(self) -> None:
        args = {
            "node-a": ["-H", "$(POD_IP)", "-d", "CUDA0,CUDA1"],
            "node-b": ["-H", "$(POD_IP)", "-d", "CUDA0"],
        }
        sets = build_rpc_daemonsets(workload(rpc_args=args))
        assert [d["metadata"]["name"] for d in sets] == ["gemma-rpc", "gemma-rpc-1"]
        selectors = [d["spec"]["selector"]["matchLabels"] for d in sets]
        assert selectors[0] != selectors[1]  # overlapping selectors would fight over pods

    @pytest.mark.parametrize(
        ("cache", "volume", "owner_init", "level"),
        [
            (
                {"hostPath": "/data/rpc"},
                {"hostPath": {"path": "/data/rpc", "type": "DirectoryOrCreate"}},
                True,
                "privileged",
            ),
            ({"volume": "emptyDir"}, {"emptyDir": {}}, False, "restricted"),
            (
                {"volume": "emptyDir", "sizeLimit": "20Gi"},
                {"emptyDir": {"sizeLimit": "20Gi"}},
                False,
                "restricted",
            ),
            (
                {"volume": "pvc", "claimName": "rpc-cache"},
                {"persistentVolumeClaim": {"claimName": "rpc-cache"}},
                False,
                "restricted",
            ),
            ({"enabled": False}, None, False, "restricted"),
        ],
    )
    def test_tensor_cache_volume_and_pod_security_level(
        self, cache: dict[str, Any], volume: Obj | None, owner_init: bool, level: str
    ) -> None:
        (ds,) = build_rpc_daemonsets(workload(pool={"rpcCache": cache}))
        pod = ds["spec"]["template"]["spec"]
        server = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in server["env"]}
        if volume is None:
            assert "volumes" not in pod
            assert "LLAMA_CACHE" not in env
        else:
            assert pod["volumes"] == [{"name": "rpc-cache", **volume}]
            assert env["LLAMA_CACHE"] == "/var/cache/llama"
            assert server["volumeMounts"] == [
                {"name": "rpc-cache", "mountPath": "/var/cache/llama"}
            ]
        inits = pod.get("initContainers", [])
        assert [c["name"] for c in inits] == (["cache-owner"] if owner_init else [])
        if owner_init:
            (init,) = inits
            assert init["command"] == ["chown", "-R", "65532:65532", "/var/cache/llama"]
            assert init["image"] == server["image"]  # no other image to pull
            assert init["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
        assert pod_security_level(pod) == level

    def test_the_server_runs_as_the_images_non_root_user(self) -> None:
        (ds,) = build_rpc_daemonsets(workload())
        pod = ds["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 65532
        assert "runAsUser" not in pod["containers"][0]["securityContext"]


class TestHostDeployment:
    def test_recreate_pinned_to_the_host_node_with_probes(self) -> None:
        dep = build_host_deployment(workload())
        assert dep["spec"]["strategy"] == {"type": "Recreate"}
        pod = dep["spec"]["template"]["spec"]
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms["nodeSelectorTerms"] == [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node-b"]}]}
        ]
        server = pod["containers"][0]
        assert server["readinessProbe"]["httpGet"]["path"] == "/health"
        startup = server["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 3600
        fetch = next(c for c in pod["initContainers"] if c["name"] == "fetch")
        assert fetch["args"][0] == "fetch"

    def test_zero_replicas_until_workers_are_up(self) -> None:
        assert build_host_deployment(workload(), replicas=0)["spec"]["replicas"] == 0

    def test_pvc_source_mounts_the_claim_instead_of_fetching(self) -> None:
        spec = {"source": {"pvc": {"claimName": "models", "path": "g/gemma.gguf"}}}
        pod = build_host_deployment(workload(spec=spec))["spec"]["template"]["spec"]
        assert "initContainers" not in pod
        assert pod["volumes"][0]["persistentVolumeClaim"] == {
            "claimName": "models",
            "readOnly": True,
        }

    def test_token_secret_reaches_only_the_fetcher(self) -> None:
        spec = {
            "source": {
                "huggingface": {
                    "repo": "org/model",
                    "file": "m.gguf",
                    "tokenSecretRef": {"name": "hf", "key": "token"},
                }
            }
        }
        pod = build_host_deployment(workload(spec=spec))["spec"]["template"]["spec"]
        fetch_env = next(c for c in pod["initContainers"] if c["name"] == "fetch")["env"]
        assert fetch_env[0]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
        assert all(e["name"] != "HF_TOKEN" for e in pod["containers"][0]["env"])

    def test_a_hub_mirror_reaches_the_fetcher(self) -> None:
        spec = {"source": {"huggingface": {"repo": "org/model", "file": "m.gguf"}}}
        plain = build_host_deployment(workload(spec=spec))["spec"]["template"]["spec"]
        assert "env" not in next(c for c in plain["initContainers"] if c["name"] == "fetch")
        mirrored = dataclasses.replace(workload(spec=spec), hf_endpoint="http://hub.mirror:8080")
        pod = build_host_deployment(mirrored)["spec"]["template"]["spec"]
        fetch_env = next(c for c in pod["initContainers"] if c["name"] == "fetch")["env"]
        assert {"name": "HF_ENDPOINT", "value": "http://hub.mirror:8080"} in fetch_env

    def test_api_key_secret_is_mounted(self) -> None:
        spec = {"apiKeySecretRef": {"name": "keys", "key": "key"}}
        pod = build_host_deployment(workload(spec=spec))["spec"]["template"]["spec"]
        assert {"name": "api-key", "secret": {"secretName": "keys"}} in pod["volumes"]

    @pytest.mark.parametrize(
        ("variant", "image", "visible", "runtime_class"),
        [
            ("cuda", "ghcr.io/mesh-dev/llama.cpp:0.3.36-cuda", "none", "nvidia"),
            ("cpu", "ghcr.io/mesh-dev/llama.cpp:0.3.36-cpu", None, None),
        ],
    )
    def test_the_host_runs_the_variant_of_its_node(
        self, variant: ImageVariant, image: str, visible: str | None, runtime_class: str | None
    ) -> None:
        # node-b hosts; node-a's variant must not matter.
        other: ImageVariant = "cpu" if variant == "cuda" else "cuda"
        w = workload(
            pool={"backend": "cuda", "runtimeClassName": "nvidia"},
            variants={"node-a": other, "node-b": variant},
        )
        pod = build_host_deployment(w)["spec"]["template"]["spec"]
        server = pod["containers"][0]
        assert server["image"] == image
        env = {e["name"]: e.get("value") for e in server["env"]}
        assert env.get("NVIDIA_VISIBLE_DEVICES") == visible
        assert pod.get("runtimeClassName") == runtime_class
        assert "resources" not in server  # never a GPU of its own

    @pytest.mark.parametrize(
        ("host_resources", "expected"),
        [
            (None, {"requests": {"memory": "4096Mi"}}),
            (
                {"limits": {"cpu": "4"}},
                {"requests": {"memory": "4096Mi"}, "limits": {"cpu": "4"}},
            ),
            ({"requests": {"memory": "8Gi"}}, {"requests": {"memory": "8Gi"}}),
        ],
    )
    def test_a_ram_tier_is_requested_as_host_memory(
        self, host_resources: dict[str, Any] | None, expected: dict[str, Any]
    ) -> None:
        spec = {"hostResources": host_resources} if host_resources else {}
        w = dataclasses.replace(workload(spec=spec), host_tier_mib=4096)
        server = build_host_deployment(w)["spec"]["template"]["spec"]["containers"][0]
        assert server["resources"] == expected

    @pytest.mark.parametrize(
        ("cache", "volume", "inits", "level"),
        [
            (
                {},
                {"hostPath": {"path": "/var/lib/mesh/models", "type": "DirectoryOrCreate"}},
                ["cache-owner", "fetch"],
                "privileged",
            ),
            ({"volume": "emptyDir"}, {"emptyDir": {}}, ["fetch"], "restricted"),
            (
                {"volume": "pvc", "claimName": "model-cache"},
                {"persistentVolumeClaim": {"claimName": "model-cache"}},
                ["fetch"],
                "restricted",
            ),
        ],
    )
    def test_model_cache_volume_and_pod_security_level(
        self, cache: dict[str, Any], volume: Obj, inits: list[str], level: str
    ) -> None:
        pod = build_host_deployment(workload(pool={"modelCache": cache}))["spec"]["template"][
            "spec"
        ]
        assert pod["volumes"][0] == {"name": "models", **volume}
        assert [c["name"] for c in pod["initContainers"]] == inits
        fetch = pod["initContainers"][-1]
        # The fetcher writes as the images' user: the folder is made its own
        # (hostPath) or writable through fsGroup (emptyDir, PVC).
        assert "runAsUser" not in fetch["securityContext"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["fsGroup"] == 65532
        if "cache-owner" in inits:
            owner = pod["initContainers"][0]
            assert owner["command"] == ["chown", "-R", "65532:65532", "/models"]
            assert owner["image"] == fetch["image"]
        assert pod_security_level(pod) == level

    def test_a_model_on_a_pvc_runs_at_restricted_whatever_the_cache(self) -> None:
        spec = {"source": {"pvc": {"claimName": "models", "path": "g/gemma.gguf"}}}
        pod = build_host_deployment(workload(spec=spec))["spec"]["template"]["spec"]
        assert pod_security_level(pod) == "restricted"


class TestReplicas:
    def test_replica_zero_keeps_the_names_and_every_pod_is_labelled(self) -> None:
        w = workload()
        (ds,) = build_rpc_daemonsets(w)
        host = build_host_deployment(w)
        assert (ds["metadata"]["name"], host["metadata"]["name"]) == ("gemma-rpc", "gemma-host")
        for child in (ds, host):
            assert child["spec"]["selector"]["matchLabels"][REPLICA_LABEL] == "0"
            assert child["spec"]["template"]["metadata"]["labels"][REPLICA_LABEL] == "0"

    def test_other_replicas_get_their_own_names_and_selectors(self) -> None:
        args = {
            "node-a": ["-H", "$(POD_IP)", "-d", "CUDA0,CUDA1"],
            "node-b": ["-H", "$(POD_IP)", "-d", "CUDA0"],
        }
        zero = workload(rpc_args=args)
        two = dataclasses.replace(zero, replica=2)
        sets = build_rpc_daemonsets(two)
        assert [d["metadata"]["name"] for d in sets] == ["gemma-rpc-r2", "gemma-rpc-1-r2"]
        host = build_host_deployment(two)
        assert host["metadata"]["name"] == "gemma-host-r2"
        assert host["spec"]["template"]["metadata"]["labels"][REPLICA_LABEL] == "2"
        selectors = [
            c["spec"]["selector"]["matchLabels"] for c in [*build_rpc_daemonsets(zero), *sets]
        ]
        # No selector may select another's pods: none is a subset of another.
        for i, a in enumerate(selectors):
            for j, b in enumerate(selectors):
                if i != j:
                    assert not a.items() <= b.items(), (a, b)
        zero_host = build_host_deployment(zero)["spec"]["selector"]["matchLabels"]
        assert zero_host != host["spec"]["selector"]["matchLabels"]
        # The Service selects the hosts of every replica.
        service = build_service(two)["spec"]["selector"]
        assert REPLICA_LABEL not in service
        assert service.items() <= host["spec"]["template"]["metadata"]["labels"].items()
        assert service.items() <= zero_host.items()

    def test_names_stay_dns_labels_and_never_meet_another_models(self) -> None:
        longest = "m" * MODEL_NAME_MAX
        assert len(rpc_daemonset_name(longest, 15, 15)) <= 63 - 6, "room for the pod suffix"
        assert len(host_deployment_name(longest, 15)) <= 63
        names = {
            (model, rpc_daemonset_name(model, index, replica))
            for model in ("a", "a-r1", "a-rpc", "a-host", "a-rpc-1")
            for index in (0, 1)
            for replica in (0, 1)
        } | {
            (model, host_deployment_name(model, replica))
            for model in ("a", "a-r1", "a-rpc", "a-host", "a-rpc-1")
            for replica in (0, 1)
        }
        owners: dict[str, str] = {}
        for model, name in names:
            assert owners.setdefault(name, model) == model, name


class TestServiceAndPolicy:
    def test_service_selects_the_host_pods(self) -> None:
        svc = build_service(workload())
        assert svc["metadata"]["name"] == "gemma-host"
        assert svc["spec"]["selector"]["app.kubernetes.io/component"] == "host"
        assert svc["spec"]["ports"][0]["port"] == 8080

    @pytest.mark.parametrize(
        ("peers", "scrapers"),
        [
            (PolicyPeers("mesh-agent", "mesh-system", ("monitoring",)), ["monitoring"]),
            (PolicyPeers("mesh-system", "mesh-system", ("mesh-system",)), ["mesh-system"]),
            (PolicyPeers("mesh-agent", "mesh-system", ("b", "a", "b")), ["a", "b"]),
            (PolicyPeers("mesh-agent", "mesh-system", ()), None),
        ],
    )
    def test_every_peer_of_every_rule(self, peers: PolicyPeers, scrapers: list[str] | None) -> None:
        policy = build_network_policy(workload(pool={"rpcPort": 50100}), peers)
        spec = policy["spec"]
        assert spec["podSelector"] == {
            "matchLabels": {"app.kubernetes.io/name": "mesh", "mesh.dev/model": "gemma"}
        }
        assert spec["policyTypes"] == ["Ingress"]
        rpc_rule, http_rule = spec["ingress"]
        assert rpc_rule["ports"] == [{"protocol": "TCP", "port": 50100}]
        assert rpc_rule["from"] == [
            # This model's host, in the model's own namespace (no namespaceSelector).
            {
                "podSelector": {
                    "matchLabels": {
                        "app.kubernetes.io/name": "mesh",
                        "app.kubernetes.io/component": "host",
                        "mesh.dev/model": "gemma",
                    }
                }
            },
            # The release's node agents, in their namespace only.
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": peers.agent_namespace}
                },
                "podSelector": {
                    "matchLabels": {
                        "app.kubernetes.io/name": "mesh",
                        "app.kubernetes.io/component": "agent",
                    }
                },
            },
        ]
        assert http_rule["ports"] == [{"protocol": "TCP", "port": 8080}]
        expected: list[Obj] = [
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": peers.gateway_namespace}
                },
                "podSelector": {
                    "matchLabels": {
                        "app.kubernetes.io/name": "mesh",
                        "app.kubernetes.io/component": "gateway",
                    }
                },
            }
        ]
        if scrapers is not None:
            expected.append(
                {
                    "namespaceSelector": {
                        "matchExpressions": [
                            {
                                "key": "kubernetes.io/metadata.name",
                                "operator": "In",
                                "values": scrapers,
                            }
                        ]
                    },
                    "podSelector": {"matchLabels": {"mesh.dev/metrics-scraper": "true"}},
                }
            )
        assert http_rule["from"] == expected

    def test_no_peer_selects_every_namespace(self) -> None:
        policy = build_network_policy(workload(), PolicyPeers("a", "b", ("c",)))
        for rule in policy["spec"]["ingress"]:
            for peer in rule["from"]:
                assert peer.get("namespaceSelector", {"x": 1}) != {}, peer
                assert peer["podSelector"]["matchLabels"], peer


class TestHeaderPod:
    def pod(self, pool: dict[str, Any] | None = None) -> dict[str, Any]:
        spec = MeshModelSpec.model_validate(
            {"source": {"pvc": {"claimName": "weights", "path": "g/gemma.gguf"}}, "poolRef": "p"}
        )
        return build_header_pod(
            "gemma",
            "ai",
            "uid-1",
            spec=spec,
            pool=MeshPoolSpec.model_validate(pool or {}),
            source_key="abc123",
            model_path="/models/g/gemma.gguf",
        )

    def test_reads_the_file_read_only_and_reports_through_its_termination_message(self) -> None:
        pod = self.pod()
        (container,) = pod["spec"]["containers"]
        assert container["args"] == [
            "profile", "--model", "/models/g/gemma.gguf",
            "--termination-log", container["terminationMessagePath"],
        ]  # fmt: skip
        assert container["volumeMounts"] == [
            {"name": "models", "mountPath": "/models", "readOnly": True}
        ]
        assert pod["spec"]["volumes"] == [
            {"name": "models", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}}
        ]
        assert pod["spec"]["restartPolicy"] == "Never"
        assert pod["spec"]["activeDeadlineSeconds"] > 0
        assert pod["metadata"]["annotations"] == {"mesh.dev/source": "abc123"}
        assert pod["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "header-reader"

    def test_meets_the_restricted_pod_security_standard(self) -> None:
        pod = self.pod()
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["automountServiceAccountToken"] is False
        context = pod["spec"]["containers"][0]["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        assert context["readOnlyRootFilesystem"] is True

    def test_runs_on_a_pool_node(self) -> None:
        toleration = {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}
        pod = self.pod({"nodeSelector": {"pool": "a"}, "tolerations": [toleration]})
        assert pod["spec"]["nodeSelector"] == {"pool": "a"}
        assert pod["spec"]["tolerations"] == [toleration]
