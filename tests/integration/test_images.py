"""The built images run what the operator deploys.

The llama.cpp CPU image's ggml-rpc-server and llama-server are started with the
operator's own command lines (`mesh_operator.planning`, the functions whose output
the workload builders put into container args), each in its own container on a
network of its own, as the pods would be: read-only root filesystem, the image's
non-root user, no capabilities, the real model mounted read-only and a writable
LLAMA_CACHE volume. `$(POD_IP)`, which the kubelet expands, is each container's
address. The mesh and agent images answer their CLI as uid 65532. An older
ggml-rpc-server (`build-images.sh --old`) is refused by the pinned llama-server.

The images come from `make images` (scripts/build-images.sh).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from e2e import parts
from e2e.llama import listening, post_json
from mesh_operator import planning
from mesh_operator.api.meshmodel import MeshModelSpec
from mesh_operator.api.meshpool import MeshPoolSpec
from mesh_operator.manifests.workloads import MODELS_MOUNT, RPC_CACHE_MOUNT
from mesh_operator.planner import parse_inventory, read_model_profile
from tests.conftest import require_part

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
REGISTRY = "ghcr.io/mesh-dev"
POD_IP = "$(POD_IP)"
NONROOT = "65532"
MODEL_NAME = "gemma"


def pin(key: str) -> str:
    text = (REPO / "scripts" / "llama-cpp.pin").read_text()
    match = re.search(rf"^{key}=(\S+)$", text, flags=re.MULTILINE)
    assert match, f"scripts/llama-cpp.pin has no {key}"
    return match.group(1)


def app_version() -> str:
    text = (REPO / "charts" / "mesh" / "Chart.yaml").read_text()
    match = re.search(r'^appVersion:\s*"?([^"\s]+)"?\s*$', text, flags=re.MULTILINE)
    assert match, "charts/mesh/Chart.yaml has no appVersion"
    return match.group(1)


LLAMA_IMAGE = f"{REGISTRY}/llama.cpp:{pin('LLAMA_CPP_PYTHON_VERSION')}-cpu"
OLD_RPC_IMAGE = f"{REGISTRY}/llama.cpp:{pin('LLAMA_CPP_OLD_PYTHON_VERSION')}-cpu"
MESH_IMAGE = f"{REGISTRY}/mesh:{app_version()}"
AGENT_IMAGE = f"{REGISTRY}/mesh-agent:{app_version()}"


@dataclass
class Engine:
    """The container engine scripts/build-base-image.sh chose, with its settings."""

    binary: str
    env: dict[str, str]
    created: list[str] = field(default_factory=list)

    @property
    def hardened(self) -> list[str]:
        """Run options of the pods' securityContext: read-only root, no privileges."""
        options = ["--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges"]
        if Path(self.binary).name == "podman":
            # podman's --read-only alone still mounts writable tmpfs on /tmp and /run.
            options.append("--read-only-tmpfs=false")
        return options

    def run(self, *args: str, check: bool = True, timeout: float = 120) -> str:
        result = subprocess.run(
            [self.binary, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{self.binary} {' '.join(args)}: {result.stderr[-2000:]}")
        return result.stdout

    def image(self, tag: str) -> str:
        """`tag`, or the part is missing: images are built by `make images`."""
        probe = subprocess.run(
            [self.binary, "image", "inspect", tag],
            env=self.env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        if probe.returncode != 0:
            raise parts.PartMissingError(f"image {tag} not built: run make images")
        return tag


def find_engine() -> Engine:
    result = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-base-image.sh"), "--engine"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["no container engine"]
        raise parts.PartMissingError(lines[-1])
    binary, conf = [*result.stdout.splitlines(), ""][:2]
    env = dict(os.environ)
    if conf:
        env["CONTAINERS_CONF"] = conf
    return Engine(binary, env)


@pytest.fixture(scope="module")
def engine() -> Engine:
    found: list[Engine] = []

    def lookup() -> Path:
        found.append(find_engine())
        return Path(found[-1].binary)

    require_part(lookup)
    return found[-1]


@pytest.fixture
def containers(engine: Engine) -> Iterator[list[str]]:
    """Names of the containers a test starts, removed after it."""
    try:
        yield engine.created
    finally:
        for name in reversed(engine.created):
            engine.run("rm", "--force", name, check=False)
        engine.created.clear()


@pytest.fixture(scope="module")
def network(engine: Engine) -> Iterator[tuple[str, str]]:
    """A network of its own: (name, first three octets of its /24)."""
    name = f"mesh-test-{uuid.uuid4().hex[:8]}"
    rng = random.Random()
    for _ in range(20):
        prefix = f"10.{rng.randint(180, 250)}.{rng.randint(0, 255)}"
        made = subprocess.run(
            [engine.binary, "network", "create", "--subnet", f"{prefix}.0/24", name],
            env=engine.env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        if made.returncode == 0:
            break
    else:
        pytest.fail(f"cannot create a test network: {made.stderr.decode()[-500:]}")
    try:
        yield name, prefix
    finally:
        engine.run("network", "rm", "--force", name, check=False)


def substitute(args: Sequence[str], pod_ip: str) -> list[str]:
    """What the kubelet does to $(POD_IP) in container args."""
    return [a.replace(POD_IP, pod_ip) for a in args]


def start(
    engine: Engine, name: str, image: str, options: Sequence[str], command: Sequence[str]
) -> None:
    """Start a detached container running `command` (entrypoint, then args)."""
    engine.created.append(name)
    engine.run(
        "run", "--detach", "--pull=never", "--name", name, *engine.hardened, *options,
        "--entrypoint", command[0], image, *command[1:],
    )  # fmt: skip


def wait_listening(engine: Engine, name: str, ip: str, port: int) -> None:
    """Wait until the container's server listens on ip:port (read in its network
    namespace, never connected to), so that a host started next finds it."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pid = engine.run("inspect", "--format", "{{.State.Pid}}", name).strip()
        if pid not in ("", "0") and listening(ip, port, Path(f"/proc/{pid}/net/tcp")):
            return
        time.sleep(0.2)
    raise AssertionError(f"{name} does not listen on {ip}:{port}:\n{logs(engine, name)[-2000:]}")


def logs(engine: Engine, name: str) -> str:
    result = subprocess.run(
        [engine.binary, "logs", name],
        env=engine.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.stdout + result.stderr


def running(engine: Engine, name: str) -> bool:
    return engine.run("inspect", "--format", "{{.State.Running}}", name).strip() == "true"


def wait_healthy(engine: Engine, name: str, url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not running(engine, name):
            pytest.fail(f"{name} exited:\n{logs(engine, name)[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    pytest.fail(f"{name} not healthy within {timeout:.0f} s:\n{logs(engine, name)[-3000:]}")


@dataclass(frozen=True)
class Commands:
    """The operator's commands for one model planned onto one CPU node."""

    rpc: list[str]
    llama: list[str]
    model_path: str


def operator_commands(model_file: Path, worker_address: str) -> Commands:
    spec = MeshModelSpec.model_validate(
        {
            "source": {"pvc": {"claimName": "models", "path": model_file.name}},
            "poolRef": "cpu",
            "contextSize": 1024,
            "parallel": 1,
        }
    )
    pool = MeshPoolSpec.model_validate({"backend": "cpu"})
    profile = read_model_profile(str(model_file))
    inventory = parse_inventory(
        {
            "nodes": [
                {
                    "name": "node-a",
                    "devices": [
                        {"id": "CPU", "backend": "cpu", "memoryTotalMiB": 4096,
                         "memoryFreeMiB": 4096}
                    ],
                }
            ]
        }
    )  # fmt: skip
    request = planning.placement_request(spec, pool, profile)
    result = planning.plan(profile, inventory, request, None, pool)
    assert result.feasible, result.reason
    plan = planning.to_plan(result)
    (rpc_args,) = planning.rpc_args(plan, pool).values()
    llama_args = planning.llama_args(plan, spec, MODEL_NAME, [worker_address])
    return Commands(
        rpc=[*pool.images.rpc_server_command, *rpc_args],
        llama=[*pool.images.llama_server_command, *llama_args],
        model_path=planning.model_path(spec),
    )


@pytest.fixture
def llama_image(engine: Engine) -> str:
    return require_part(lambda: Path(engine.image(LLAMA_IMAGE))).as_posix()


def cache_dir(tmp_path: Path) -> Path:
    """A LLAMA_CACHE volume the image's user owns, as a pod's fsGroup would make it."""
    path = tmp_path / "llama-cache"
    path.mkdir()
    os.chown(path, int(NONROOT), int(NONROOT))
    return path


@pytest.mark.usefixtures("containers")
def test_llama_image_serves_with_the_operators_commands(
    engine: Engine, network: tuple[str, str], llama_image: str, model_file: Path, tmp_path: Path
) -> None:
    net, prefix = network
    worker_ip, host_ip = f"{prefix}.10", f"{prefix}.11"
    rpc_port = MeshPoolSpec.model_validate({}).rpc_port
    commands = operator_commands(model_file.resolve(), f"{worker_ip}:{rpc_port}")
    assert commands.rpc[0] == "/app/ggml-rpc-server"
    assert commands.llama[0] == "/app/llama-server"
    assert commands.model_path.startswith(f"{MODELS_MOUNT}/")
    cache = cache_dir(tmp_path)
    tag = uuid.uuid4().hex[:8]
    worker, host = f"mesh-test-rpc-{tag}", f"mesh-test-host-{tag}"

    start(
        engine, worker, llama_image,
        ["--network", net, "--ip", worker_ip,
         "--env", f"LLAMA_CACHE={RPC_CACHE_MOUNT}", "--volume", f"{cache}:{RPC_CACHE_MOUNT}"],
        substitute(commands.rpc, worker_ip),
    )  # fmt: skip
    wait_listening(engine, worker, worker_ip, rpc_port)
    start(
        engine, host, llama_image,
        ["--network", net, "--ip", host_ip,
         "--volume", f"{model_file.resolve()}:{commands.model_path}:ro"],
        substitute(commands.llama, host_ip),
    )  # fmt: skip
    port = commands.llama[commands.llama.index("--port") + 1]
    url = f"http://{host_ip}:{port}"
    wait_healthy(engine, host, url)

    reply = post_json(
        f"{url}/v1/completions",
        {"model": MODEL_NAME, "prompt": "The capital of France is", "max_tokens": 8,
         "temperature": 0},
    )  # fmt: skip
    usage = reply["usage"]
    assert isinstance(usage, dict) and usage["completion_tokens"] > 0, reply
    choices = reply["choices"]
    assert isinstance(choices, list) and str(choices[0]["text"]).strip(), reply
    # The host holds its worker's one client slot while it serves, and the
    # worker's tensor cache lives in the volume.
    worker_log = logs(engine, worker)
    events = re.findall(
        r"^(Accepted client connection|Client connection closed)$", worker_log, re.M
    )
    assert events and events[-1] == "Accepted client connection", worker_log
    assert f"local cache    : {RPC_CACHE_MOUNT}/rpc" in worker_log, worker_log
    assert (cache / "rpc").is_dir(), logs(engine, worker)
    for name in (worker, host):
        user = engine.run("inspect", "--format", "{{.Config.User}}", name).strip()
        assert user.split(":")[0] == NONROOT


@pytest.mark.usefixtures("containers")
def test_older_rpc_server_is_refused(
    engine: Engine, network: tuple[str, str], llama_image: str, model_file: Path, tmp_path: Path
) -> None:
    """A worker of another RPC protocol (an older image) stops the host at start."""
    old_image = require_part(lambda: Path(engine.image(OLD_RPC_IMAGE))).as_posix()
    net, prefix = network
    worker_ip, host_ip = f"{prefix}.20", f"{prefix}.21"
    rpc_port = MeshPoolSpec.model_validate({}).rpc_port
    commands = operator_commands(model_file.resolve(), f"{worker_ip}:{rpc_port}")
    tag = uuid.uuid4().hex[:8]
    worker, host = f"mesh-test-oldrpc-{tag}", f"mesh-test-oldhost-{tag}"
    cache = cache_dir(tmp_path)
    start(
        engine, worker, old_image,
        ["--network", net, "--ip", worker_ip,
         "--env", f"LLAMA_CACHE={RPC_CACHE_MOUNT}", "--volume", f"{cache}:{RPC_CACHE_MOUNT}"],
        substitute(commands.rpc, worker_ip),
    )  # fmt: skip
    wait_listening(engine, worker, worker_ip, rpc_port)
    start(
        engine, host, llama_image,
        ["--network", net, "--ip", host_ip,
         "--volume", f"{model_file.resolve()}:{commands.model_path}:ro"],
        substitute(commands.llama, host_ip),
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while running(engine, host) and time.monotonic() < deadline:
        time.sleep(0.5)
    text = logs(engine, host)
    assert not running(engine, host), f"llama-server kept running:\n{text[-2000:]}"
    assert "RPC server version mismatch" in text, text[-2000:]


@pytest.mark.parametrize(
    ("image", "args", "expect"),
    [
        (MESH_IMAGE, ["--help"], "operator"),
        (MESH_IMAGE, ["fetch", "--help"], "--dest"),
        (AGENT_IMAGE, ["agent", "--help"], "usage"),
    ],
)
def test_mesh_images_answer_as_the_unprivileged_user(
    engine: Engine, image: str, args: list[str], expect: str
) -> None:
    tag = require_part(lambda: Path(engine.image(image))).as_posix()
    out = engine.run("run", "--rm", "--pull=never", *engine.hardened, tag, *args)
    assert expect in out
    uid = engine.run(
        "run", "--rm", "--pull=never", *engine.hardened, "--entrypoint", "id", tag, "-u"
    )
    assert uid.strip() == NONROOT


def test_llama_image_holds_both_programs_for_the_unprivileged_user(
    engine: Engine, llama_image: str
) -> None:
    config = json.loads(engine.run("image", "inspect", llama_image))[0]["Config"]
    assert config["User"].split(":")[0] == NONROOT
    assert f"LLAMA_CACHE={RPC_CACHE_MOUNT}" in config["Env"]
    for program in ("/app/llama-server", "/app/ggml-rpc-server"):
        engine.run(
            "run", "--rm", "--pull=never", *engine.hardened, "--entrypoint", program,
            llama_image, "--help",
        )  # fmt: skip
