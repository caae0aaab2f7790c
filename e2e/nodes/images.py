"""Images for the real test nodes: the infrastructure images the harness makes
itself (the sandbox "pause" image and CoreDNS, each one static program on an
empty base; Prometheus for the tests that scrape pods, Debian's program on the
Debian base the project's images use), and pushes of the project's own images
into the local registry.

Test infrastructure. The container engine is podman, run as root with the
configuration this machine needs (runtime runc, ulimits inside the machine's hard
limits), written into the cache and passed through CONTAINERS_CONF.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

import yaml

from e2e import parts

PAUSE_IMAGE = "pause:1"
COREDNS_IMAGE = "coredns:v1.15.0"
# The program each infrastructure image runs, built by scripts/build-node-parts.sh.
INFRA_PROGRAMS = {PAUSE_IMAGE: "pause", COREDNS_IMAGE: "coredns"}

CONTAINERS_CONF = """\
# podman as root on this machine: crun refuses cgroup v1 in hybrid mode, and the
# default ulimits exceed the machine's hard limits.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
"""


class ImageError(RuntimeError):
    """An image could not be built, found or pushed."""


def podman_env() -> dict[str, str]:
    conf = parts.cache_dir() / "podman" / "containers.conf"
    if not conf.exists() or conf.read_text() != CONTAINERS_CONF:
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(CONTAINERS_CONF)
    return {**os.environ, "CONTAINERS_CONF": str(conf)}


def podman(*args: str, input_bytes: bytes | None = None, timeout: float = 600) -> str:
    try:
        result = subprocess.run(
            ["podman", *args],
            capture_output=True,
            input=input_bytes,
            env=podman_env(),
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise ImageError("podman not found: run scripts/build-images.sh (via make images)") from exc
    if result.returncode != 0:
        err = result.stderr.decode(errors="replace").strip().splitlines()
        raise ImageError(f"podman {args[0]}: {err[-1] if err else 'failed'}")
    return result.stdout.decode(errors="replace")


def exists(image: str) -> bool:
    try:
        podman("image", "exists", image)
    except ImageError:
        return False
    return True


def registry_answers(registry: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{registry}/v2/", timeout=2) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def ensure_infra_images(registry: str) -> None:
    """Build the static infrastructure images (once) and push them to `registry`."""
    for image, program in INFRA_PROGRAMS.items():
        local = f"localhost/mesh-e2e/{image}"
        if not exists(local):
            with tempfile.TemporaryDirectory() as context:
                binary = Path(context) / program
                binary.write_bytes(parts.binary(program).read_bytes())
                binary.chmod(0o755)
                (Path(context) / "Containerfile").write_text(
                    f"FROM scratch\nCOPY {program} /{program}\nUSER 65532:65532\n"
                    f'ENTRYPOINT ["/{program}"]\n'
                )
                podman("build", "--pull=never", "-t", local, context)
        push({local: f"e2e/{image}"}, registry)


# The base of the project's images (scripts/build-base-image.sh makes it here).
DEBIAN_BASE = "docker.io/library/debian:bookworm-slim"


def prometheus_image(registry: str) -> str:
    """This machine's Prometheus (Debian's package, linked against glibc alone) on
    the Debian base, built once per program and pushed to `registry`; the image's
    name there."""
    program = parts.binary("prometheus")
    data = program.read_bytes()
    tag = f"debian-{hashlib.sha256(data).hexdigest()[:12]}"
    local = f"localhost/mesh-e2e/prometheus:{tag}"
    if not exists(local):
        if not exists(DEBIAN_BASE):
            raise ImageError(f"image {DEBIAN_BASE} not found locally: run `make images`")
        with tempfile.TemporaryDirectory() as context:
            binary = Path(context) / "prometheus"
            binary.write_bytes(data)
            binary.chmod(0o755)
            (Path(context) / "Containerfile").write_text(
                f"FROM {DEBIAN_BASE}\nCOPY prometheus /bin/prometheus\nUSER 65532:65532\n"
                'ENTRYPOINT ["/bin/prometheus"]\n'
            )
            podman("build", "--pull=never", "-t", local, context)
    push({local: f"e2e/prometheus:{tag}"}, registry)
    return f"{registry}/e2e/prometheus:{tag}"


def push(images: Mapping[str, str], registry: str) -> None:
    """Push local images to paths in the plain-HTTP `registry` (unchanged blobs are
    skipped by the registry protocol, so a second push is quick)."""
    for local, path in images.items():
        if not exists(local):
            raise ImageError(f"image {local} not found locally: run `make images`")
        podman("push", "--tls-verify=false", "--quiet", local, f"docker://{registry}/{path}")


def chart_images(chart: Path | None = None) -> dict[str, str]:
    """The chart's default images (as `make images` tags them locally) and their
    paths in the registry that mirrors the chart's default registry."""
    folder = chart or parts.REPO_ROOT / "charts" / "mesh"
    meta = yaml.safe_load((folder / "Chart.yaml").read_text())
    values = yaml.safe_load((folder / "values.yaml").read_text())
    registry = str(values["registry"])
    app = str(meta["appVersion"])
    llama = str(meta["annotations"]["mesh.dev/llama-cpp"])
    names = [
        f"{registry}/mesh:{app}",
        f"{registry}/mesh-agent:{app}",
        f"{registry}/llama.cpp:{llama}-cpu",
    ]
    # ghcr.io/mesh-dev/mesh:0.1.0 is pulled through the mirror as mesh-dev/mesh:0.1.0.
    return {name: name.split("/", 1)[1] for name in names}


NODE_PROGRAMS = ("kubelet", "kube-proxy", "kube-router", "coredns", "registry", "crictl", "pause")


def require_real_nodes() -> Path:
    """What real nodes need, as a `parts.PartMissingError` naming the first part
    missing (tests skip on it, or fail under CI): root, the node programs, the
    Debian ones, podman, and the chart's default images built by `make images`."""
    if os.geteuid() != 0:
        raise parts.PartMissingError("real nodes need root (network namespaces, containerd)")
    for program in NODE_PROGRAMS:
        parts.binary(program)
    for program in ("containerd", "runc", "podman", "iptables", "ipset", "nsenter"):
        if shutil.which(program) is None:
            raise parts.PartMissingError(f"{program} not found: {parts.SETUP_HINT}")
    for image in chart_images():
        if not exists(image):
            raise parts.PartMissingError(f"image {image} not built: run `make images`")
    return parts.bin_dir()
