"""The image recipes and their build scripts, checked without a container engine.

Recipes: multi-stage, bases pinned, a non-root numeric user, no build tools or
installers in what is shipped, OCI labels, an exec-form entrypoint; the llama.cpp
image built by the same script as the tests' binaries, in both variants. Scripts:
one clear `error:` line and nothing tagged when the engine, the Debian mirror or
the disk is missing, or an unknown image is asked for. hadolint runs on every
recipe in tests/integration/test_chart_images.py; the built images are run in
tests/integration/test_images.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.unit.test_scripts import TOOLS, fake_path, one_error_line

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
OCI_LABELS = {
    "org.opencontainers.image.title",
    "org.opencontainers.image.description",
    "org.opencontainers.image.source",
    "org.opencontainers.image.licenses",
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
}
BUILD_TOOLS = re.compile(
    r"\b(gcc|g\+\+|clang|make|cmake|build-essential|git|cargo|rustc|go)\b(?![-.\w])"
)
INSTALLERS = re.compile(r"\b(apt-get|apt|apk|yum|dnf)\s+install\b|\bpip3?\s+install\b")
# What the installs of a shipped image's stages may not bring: compilers, pip.
SHIPPED_PACKAGES = re.compile(r"\b(python3-pip|python3-venv|build-essential|g\+\+|gcc|cmake)\b")
PINNED = re.compile(r"^[\w./-]+(:[\w.-]+)?(@sha256:[a-f0-9]{64})?$")
# A Debian release name pins the release; the packages installed on it are pinned
# by version, and on a developer machine scripts/build-base-image.sh makes the
# base from that release's packages under this very name.
RELEASE_TAGS = {"bookworm", "bookworm-slim"}
ARG_REF = re.compile(r"\$\{(\w+)\}|\$(\w+)")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def logical_lines(text: str) -> list[str]:
    """Instructions of a Dockerfile, continuation lines joined, comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return logical


def parse(text: str, build_args: Mapping[str, str] | None = None) -> list[Stage]:
    """Stages of a Dockerfile; FROM lines see the global ARGs and `build_args`."""
    values: dict[str, str] = {}

    def expand(match: re.Match[str]) -> str:
        return values.get(match.group(1) or match.group(2), "")

    stages: list[Stage] = []
    for line in logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not stages:
            key, _, default = args.strip().partition("=")
            values[key] = default.strip('"')
        elif keyword == "FROM":
            values.update(build_args or {})
            words = ARG_REF.sub(expand, args).split()
            image = next(w for w in words if not w.startswith("--"))
            name = words[words.index("AS") + 1] if "AS" in words else None
            stages.append(Stage(image, name))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


@dataclass(frozen=True)
class Recipe:
    """A Dockerfile and the build arguments that select what it builds."""

    path: str
    build_args: Mapping[str, str] = field(default_factory=dict)

    def text(self) -> str:
        return (REPO / self.path).read_text()

    def stages(self) -> list[Stage]:
        return parse(self.text(), self.build_args)


IMAGES = {
    "Dockerfile.operator": Recipe("Dockerfile.operator"),
    "Dockerfile.agent": Recipe("Dockerfile.agent"),
    "Dockerfile.llama (cpu)": Recipe("Dockerfile.llama", {"VARIANT": "cpu"}),
    "Dockerfile.llama (cuda)": Recipe("Dockerfile.llama", {"VARIANT": "cuda"}),
}
DOCKERFILES = sorted({recipe.path for recipe in IMAGES.values()})


def by_name(stages: list[Stage]) -> dict[str, Stage]:
    return {s.name: s for s in stages if s.name}


def shipped(stages: list[Stage]) -> Stage:
    """The default target: the last stage."""
    return stages[-1]


def base_chain(stages: list[Stage], stage: Stage) -> list[Stage]:
    """`stage` and the stages of this file it is built FROM: the shipped layers."""
    names = by_name(stages)
    chain = [stage]
    while chain[-1].base in names:
        chain.append(names[chain[-1].base])
    return chain


def used(stages: list[Stage]) -> list[Stage]:
    """Stages the shipped stage needs, through FROM or COPY --from."""
    names = by_name(stages)
    todo, seen = [shipped(stages)], []
    while todo:
        stage = todo.pop()
        if stage in seen:
            continue
        seen.append(stage)
        refs = [stage.base] + [
            m.group(1) for args in stage.all("COPY") if (m := re.search(r"--from=(\S+)", args))
        ]
        todo += [names[r] for r in refs if r in names]
    return seen


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_multi_stage_with_pinned_bases(name: str) -> None:
    stages = IMAGES[name].stages()
    needed = used(stages)
    assert len(needed) >= 2, "a build stage and a final stage"
    names = by_name(stages)
    for stage in needed:
        if stage.base in names:
            continue
        assert PINNED.match(stage.base), f"base {stage.base} is not a name:tag[@digest]"
        tag = stage.base.split("@")[0].rpartition(":")[2]
        exact_tag = tag != "latest" and (any(c.isdigit() for c in tag) or tag in RELEASE_TAGS)
        assert "@sha256:" in stage.base or exact_tag, f"base {stage.base} is not pinned"
    final = shipped(stages)
    assert any("--from=" in args for args in final.all("COPY")), (
        f"the final stage of {name} copies nothing from a build stage"
    )


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_final_stage_runs_as_a_non_root_user(name: str) -> None:
    final = shipped(IMAGES[name].stages())
    users = final.all("USER")
    assert users, f"{name}: no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{name}: USER {users[-1]}"
    assert user.isdigit(), "a numeric user, so runAsNonRoot can verify it"
    last_user = max(i for i, (kw, _) in enumerate(final.instructions) if kw == "USER")
    after = [kw for kw, _ in final.instructions[last_user:]]
    assert "RUN" not in after, "nothing runs after the switch to the final user"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_no_build_tools_or_installers_in_what_is_shipped(name: str) -> None:
    stages = IMAGES[name].stages()
    final = shipped(stages)
    for args in final.all("RUN"):
        assert not INSTALLERS.search(args), f"{name}: installs in the final stage: {args}"
        assert not BUILD_TOOLS.search(args), f"{name}: build tool in: {args}"
    # The final stage may sit on a stage of this file (Debian's python3): that
    # stage's installs are in the image too, and bring no compiler nor pip.
    for stage in base_chain(stages, final)[1:]:
        for args in stage.all("RUN"):
            assert not SHIPPED_PACKAGES.search(args), f"{name}: {stage.name} ships {args}"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_oci_labels_and_exec_entrypoint(name: str) -> None:
    final = shipped(IMAGES[name].stages())
    labels = " ".join(final.all("LABEL"))
    missing = sorted(key for key in OCI_LABELS if f"{key}=" not in labels)
    assert not missing, f"{name}: missing labels {missing}"
    entrypoint = final.all("ENTRYPOINT")
    assert entrypoint and entrypoint[-1].startswith("["), "exec-form ENTRYPOINT"


def test_mesh_images_run_the_mesh_cli() -> None:
    operator = shipped(IMAGES["Dockerfile.operator"].stages())
    agent = shipped(IMAGES["Dockerfile.agent"].stages())
    assert operator.all("ENTRYPOINT") == ['["mesh"]'] == agent.all("ENTRYPOINT")
    assert operator.all("CMD") == ['["operator"]']
    assert agent.all("CMD") == ['["agent"]']
    for final in (operator, agent):
        assert final.base == "python", "Debian's python3 stage, no pip"


@pytest.mark.parametrize("variant", ["cpu", "cuda"])
def test_llama_image_is_built_by_the_tests_recipe(variant: str) -> None:
    stages = IMAGES[f"Dockerfile.llama ({variant})"].stages()
    needed = {s.name for s in used(stages)}
    assert f"build-{variant}" in needed and f"runtime-{variant}" in needed
    other = "cuda" if variant == "cpu" else "cpu"
    assert f"build-{other}" not in needed and f"runtime-{other}" not in needed
    build = by_name(stages)["build"]
    assert build.base == f"build-{variant}"
    copied = " ".join(build.all("COPY"))
    for script in ("scripts/lib.sh", "scripts/llama-cpp.pin", "scripts/build-llama.sh"):
        assert script in copied
    assert "bash scripts/build-llama.sh" in " ".join(build.all("RUN"))
    final = shipped(stages)
    copies = final.all("COPY")
    assert "--from=build /out/app/ /app/" in copies
    assert final.all("ENTRYPOINT") == ['["/app/llama-server"]']
    assert any(env.startswith("LLAMA_CACHE=") for env in final.all("ENV"))
    if variant == "cuda":
        flags = " ".join(by_name(stages)["build-cuda"].all("ENV"))
        assert "-DGGML_CUDA=ON" in flags and "LLAMA_SKIP_RUN_CHECK=1" in flags
        runtime = by_name(stages)["runtime-cuda"].base
        assert runtime.startswith("nvidia/cuda:") and "-runtime-" in runtime


def test_build_script_makes_both_programs_with_the_rpc_backend() -> None:
    script = (REPO / "scripts" / "build-llama.sh").read_text()
    assert "-DGGML_RPC=ON" in script
    assert "targets=(llama-server" in script
    assert "LLAMA_CMAKE_FLAGS" in script
    pin = (REPO / "scripts" / "llama-cpp.pin").read_text()
    for key in ("LLAMA_CPP_PYTHON_VERSION", "LLAMA_CPP_OLD_PYTHON_VERSION"):
        assert re.search(rf"^{key}=\d+\.\d+\.\d+$", pin, flags=re.MULTILINE), key


def test_build_context_holds_only_the_sources() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*", "ignore everything (.venv, .mesh, caches), then allow the sources"
    allowed = {rule[1:] for rule in rules if rule.startswith("!")}
    for path in DOCKERFILES:
        for stage in parse((REPO / path).read_text()):
            for args in stage.all("COPY"):
                if "--from=" in args:
                    continue
                for source in args.split()[:-1]:
                    if not source.startswith("--"):
                        assert source in allowed, f"{path}: COPY {source} is not in the context"


# ---- the build scripts' failures ------------------------------------------------

# What the image scripts use besides the set-up scripts' tools; never apt-get, so
# a test never installs anything.
IMAGE_TOOLS = (*TOOLS, "basename", "ln", "git", "grep", "nproc")


def run_script(
    script: str, tmp: Path, path: str, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / script), *args],
        env={"PATH": path, "HOME": str(tmp), "MESH_CACHE": str(tmp / "cache"), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def image_path(tmp: Path, fakes: dict[str, str] | None = None) -> str:
    """Real tools minus apt-get, plus `fakes`; extra tools linked beside them."""
    path = fake_path(tmp, drop=("apt-get",), fakes=fakes)
    bin_dir = Path(path)
    for tool in IMAGE_TOOLS:
        real = shutil.which(tool)
        target = bin_dir / tool
        if real and tool != "apt-get" and not target.exists():
            target.symlink_to(real)
    return path


# A podman that has no image, runs nothing and records what it was asked.
FAKE_PODMAN = """
echo "$*" >>"$HOME/podman-calls"
case "$1" in
    info) echo "$HOME/storage" ;;
    image) exit 1 ;;
esac
exit 0
"""


def podman_calls(tmp: Path) -> list[str]:
    calls = tmp / "podman-calls"
    return calls.read_text().splitlines() if calls.exists() else []


def test_no_container_engine(tmp_path: Path) -> None:
    line = one_error_line(run_script("build-images.sh", tmp_path, image_path(tmp_path)))
    assert "no container engine" in line


def test_named_engine_missing(tmp_path: Path) -> None:
    path = image_path(tmp_path)
    result = run_script("build-images.sh", tmp_path, path, MESH_ENGINE="nerdctl")
    assert "container engine nerdctl (MESH_ENGINE) not found" in one_error_line(result)


def test_unknown_image(tmp_path: Path) -> None:
    path = image_path(tmp_path, fakes={"podman": FAKE_PODMAN, "runc": "exit 0"})
    line = one_error_line(run_script("build-images.sh", tmp_path, path, "llama", "mesh-gpu"))
    assert "unknown image 'mesh-gpu'" in line
    assert podman_calls(tmp_path) == []


def test_disk_full_before_any_build(tmp_path: Path) -> None:
    df = 'echo "Filesystem 1M-blocks Used Available Use% Mounted"; echo "fake 100 99 1 99% /"'
    path = image_path(tmp_path, fakes={"podman": FAKE_PODMAN, "runc": "exit 0", "df": df})
    line = one_error_line(run_script("build-images.sh", tmp_path, path))
    assert "disk full" in line and "needs 4000 MiB" in line
    assert not any(call.startswith(("build", "import", "tag")) for call in podman_calls(tmp_path))


def test_debian_mirror_unreachable(tmp_path: Path) -> None:
    path = image_path(tmp_path, fakes={"podman": FAKE_PODMAN, "runc": "exit 0"})
    result = run_script(
        "build-base-image.sh", tmp_path, path, MESH_DEBIAN_MIRROR="http://127.0.0.1:9/debian"
    )
    assert "no network to Debian's mirror" in one_error_line(result)
    assert not any(call.startswith("import") for call in podman_calls(tmp_path))
    assert not list((tmp_path / "cache").glob(".base-image.*"))


def test_engine_query_names_podman_and_its_settings(tmp_path: Path) -> None:
    path = image_path(tmp_path, fakes={"podman": FAKE_PODMAN})
    result = run_script("build-base-image.sh", tmp_path, path, "--engine")
    assert result.returncode == 0, result.stderr
    engine, conf = result.stdout.splitlines()
    assert Path(engine).name == "podman"
    text = Path(conf).read_text()
    assert 'runtime = "runc"' in text and "nofile=20000:20000" in text
