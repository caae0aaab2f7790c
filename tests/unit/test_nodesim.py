"""The node simulator's pure rules: `$(VAR)` expansion, env resolution, path
rewriting, image mapping, restart back-off and pod phase."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from e2e.nodesim.containers import Backoff, exit_code_of, termination_message
from e2e.nodesim.environment import ConfigError, Downward, container_env, expand
from e2e.nodesim.images import ImageError, image_entrypoint, resolve
from e2e.nodesim.status import ContainerView, build_conditions, pod_phase
from e2e.nodesim.volumes import MountTable, mount_table

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("$(A)", "1"),
        ("x$(A)y$(B)", "x1y2"),
        ("$$(A)", "$(A)"),
        ("$(MISSING)", "$(MISSING)"),
        ("$(A", "$(A"),
        ("$A", "$A"),
        ("cost $$5", "cost $5"),
    ],
)
def test_expand_follows_kubernetes(value: str, expected: str) -> None:
    assert expand(value, {"A": "1", "B": "2"}) == expected


class Objects:
    async def configmap(self, namespace: str, name: str) -> dict[str, str] | None:
        return {"mode": "fast"} if name == "cfg" else None

    async def secret(self, namespace: str, name: str) -> dict[str, str] | None:
        return {"token": "t0k"} if name == "creds" else None


POD = {
    "metadata": {"name": "p", "namespace": "ns", "uid": "u", "labels": {"app": "x"}},
    "spec": {"nodeName": "n1", "serviceAccountName": "sa"},
}


def env_of(container: dict[str, object]) -> dict[str, str]:
    downward = Downward(POD, "10.200.1.2", "10.200.1.1", {"cpu": "4", "memory": "8Gi"})
    return asyncio.run(container_env(container, downward, Objects()))


def test_env_from_downward_api_secrets_and_config_maps() -> None:
    env = env_of(
        {
            "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
            "env": [
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
                {"name": "URL", "value": "http://$(IP):8080/$(CFG_mode)"},
                {
                    "name": "CPU",
                    "valueFrom": {
                        "resourceFieldRef": {"resource": "limits.memory", "divisor": "1Gi"}
                    },
                },
                {
                    "name": "GONE",
                    "valueFrom": {"secretKeyRef": {"name": "x", "key": "k", "optional": True}},
                },
            ],
        }
    )
    assert env == {
        "CFG_mode": "fast",
        "IP": "10.200.1.2",
        "APP": "x",
        "TOKEN": "t0k",
        "URL": "http://10.200.1.2:8080/fast",
        "CPU": "8",
    }


@pytest.mark.parametrize(
    "ref",
    [
        {"secretKeyRef": {"name": "missing", "key": "k"}},
        {"secretKeyRef": {"name": "creds", "key": "nope"}},
        {"configMapKeyRef": {"name": "missing", "key": "k"}},
        {"fieldRef": {"fieldPath": "status.phase"}},
    ],
)
def test_unresolvable_references_are_config_errors(ref: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        env_of({"env": [{"name": "X", "valueFrom": ref}]})


TABLE = MountTable((("/data/cache", Path("/s/cache")), ("/data", Path("/s/data"))))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/data", "/s/data"),
        ("/data/x.gguf", "/s/data/x.gguf"),
        ("/data/cache/y", "/s/cache/y"),
        ("--model=/data/x.gguf", "--model=/s/data/x.gguf"),
        ("/database", "/database"),
        ("relative/data", "relative/data"),
        ("open('/data/x')", "open('/data/x')"),
    ],
)
def test_paths_under_a_mount_are_rewritten(value: str, expected: str) -> None:
    assert TABLE.rewrite(value) == expected


def test_the_termination_message_file_is_a_mount_of_its_own(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    container = {"volumeMounts": [{"name": "dev", "mountPath": "/dev/shm"}]}
    files = {"/dev/termination-log": log}
    table = mount_table(container, {"dev": tmp_path / "shm"}, {}, files=files)
    assert table.rewrite("/dev/termination-log") == str(log)
    assert table.rewrite("/dev/shm/x") == str(tmp_path / "shm" / "x")
    assert table.rewrite("/dev/null") == "/dev/null"


def test_termination_message_keeps_the_last_4096_bytes(tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    assert termination_message(None) is None
    assert termination_message(log) is None  # never written
    log.write_bytes(b"")
    assert termination_message(log) is None
    log.write_bytes(b"a" * 5000 + b"tail")
    message = termination_message(log)
    assert message is not None and len(message) == 4096 and message.endswith("tail")


def test_images_map_to_known_executables_only() -> None:
    table = {"mesh": lambda: Path("/bin/ls"), "python": lambda: Path("/usr/bin/py")}
    assert resolve("any", ["/usr/local/bin/mesh"], ["profile", "x"], table=table).argv == [
        "/bin/ls",
        "profile",
        "x",
    ]
    assert resolve("any", ["python3.11", "-c", "1"], [], table=table).argv[0] == "/usr/bin/py"
    assert resolve("ghcr.io/mesh-dev/mesh:0.1.0", [], ["-h"], table=table).argv == [
        "/bin/ls",
        "-h",
    ]
    with pytest.raises(ImageError, match="'sh'"):
        resolve("busybox", ["sh", "-c", "true"], [], table=table)
    with pytest.raises(ImageError, match="no command"):
        resolve("busybox", [], [], table=table)
    # The llama.cpp images run on real nodes only.
    with pytest.raises(ImageError, match="no command"):
        resolve("ghcr.io/mesh-dev/llama.cpp:0.3.36-cpu", [], ["-m", "x"], table=table)
    with pytest.raises(ImageError, match="'llama-server'"):
        resolve("any", ["/app/llama-server"], [], table=table)
    assert image_entrypoint("registry.local/team/mesh:0.1.0") == "mesh"


def test_backoff_doubles_from_ten_seconds_to_the_cap_and_resets() -> None:
    backoff = Backoff(10, 300)
    delays = [backoff.next_delay(1) for _ in range(8)]
    assert delays == [0, 10, 20, 40, 80, 160, 300, 300]
    assert backoff.next_delay(601) == 0
    assert exit_code_of(-9) == (137, 9)
    assert exit_code_of(3) == (3, None)


def view(
    state: str, *, done: bool = False, code: int | None = None, restarts: int = 0
) -> ContainerView:
    return ContainerView("c", "img", state=state, done=done, exit_code=code, restart_count=restarts)


@pytest.mark.parametrize(
    ("inits", "mains", "phase"),
    [
        ([view("running")], [view("waiting")], "Pending"),
        ([view("terminated", done=True, code=1)], [view("waiting")], "Failed"),
        ([view("terminated", done=True, code=0)], [view("running")], "Running"),
        ([], [view("waiting", restarts=2)], "Running"),
        ([], [view("waiting")], "Pending"),
        ([], [view("terminated", done=True, code=0)], "Succeeded"),
        ([], [view("terminated", done=True, code=2)], "Failed"),
    ],
)
def test_pod_phase(inits: list[ContainerView], mains: list[ContainerView], phase: str) -> None:
    assert pod_phase(inits, mains) == phase


def test_conditions_keep_their_transition_time_and_foreign_conditions() -> None:
    previous = [
        {"type": "PodScheduled", "status": "True"},
        {"type": "Ready", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z"},
    ]
    ready = view("running")
    ready.ready = True
    conditions = {
        c["type"]: c for c in build_conditions(previous, [], [ready], "Running", sandbox_ready=True)
    }
    assert conditions["PodScheduled"] == previous[0]
    assert conditions["Ready"]["lastTransitionTime"] == "2020-01-01T00:00:00Z"
    assert conditions["ContainersReady"]["status"] == "True"
    unready = build_conditions(previous, [], [view("running")], "Running", sandbox_ready=True)
    assert next(c for c in unready if c["type"] == "Ready")["reason"] == "ContainersNotReady"
