"""The image recipes follow the rules of the issue, checked here without a container
engine: multi-stage, bases pinned by exact tag or digest, a non-root user, no build
tools or installers in the final stage, OCI labels, an exec-form entrypoint. The
same rules apply to the llama.cpp recipe in docs/install.md. hadolint (when
installed) runs on all of them in tests/integration/test_chart_images.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

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
PINNED = re.compile(r"^[\w./-]+(:[\w.-]*\d[\w.-]*)?(@sha256:[a-f0-9]{64})?$")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse(text: str) -> list[Stage]:
    """Stages of a Dockerfile: FROM lines and the instructions under them."""
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
    stages: list[Stage] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = args.split()
            image = next(w for w in words if not w.startswith("--"))
            name = words[words.index("AS") + 1] if "AS" in words else None
            stages.append(Stage(image, name))
        elif stages:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


def recipe_from_docs() -> str:
    text = (REPO / "docs" / "install.md").read_text()
    blocks = re.findall(r"```dockerfile\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 1, "docs/install.md should hold one dockerfile block: the recipe"
    return str(blocks[0])


IMAGES = {
    "Dockerfile.operator": (REPO / "Dockerfile.operator").read_text,
    "Dockerfile.agent": (REPO / "Dockerfile.agent").read_text,
    "docs/install.md (llama.cpp)": recipe_from_docs,
}


def final_stages(stages: list[Stage]) -> list[Stage]:
    """Stages no other stage builds on or copies from: what gets shipped."""
    used: set[str] = set()
    for stage in stages:
        used.add(stage.base)
        for args in stage.all("COPY"):
            match = re.search(r"--from=(\S+)", args)
            if match:
                used.add(match.group(1))
    return [s for s in stages if s.name is None or s.name not in used]


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_multi_stage_with_pinned_bases(name: str) -> None:
    stages = parse(IMAGES[name]())
    assert len(stages) >= 2, "a build stage and a final stage"
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.base in names:
            continue
        assert PINNED.match(stage.base), f"base {stage.base} is not a name:tag[@digest]"
        tag = stage.base.split("@")[0].rpartition(":")[2]
        exact_tag = bool(tag) and tag != "latest" and any(c.isdigit() for c in tag)
        assert "@sha256:" in stage.base or exact_tag, f"base {stage.base} is not pinned"
    for final in final_stages(stages):
        assert any("--from=" in args for args in final.all("COPY")), (
            f"final stage {final.name or final.base} copies nothing from a build stage"
        )


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_final_stages_run_as_a_non_root_user(name: str) -> None:
    for final in final_stages(parse(IMAGES[name]())):
        users = final.all("USER")
        assert users, f"{final.name or final.base}: no USER"
        user = users[-1].split(":")[0]
        assert user not in ("root", "0"), f"{final.name}: USER {users[-1]}"
        assert user.isdigit(), "a numeric user, so runAsNonRoot can verify it"
        last_user = max(i for i, (kw, _) in enumerate(final.instructions) if kw == "USER")
        after = [kw for kw, _ in final.instructions[last_user:]]
        assert "RUN" not in after, "nothing runs after the switch to the final user"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_no_build_tools_or_installers_in_final_stages(name: str) -> None:
    for final in final_stages(parse(IMAGES[name]())):
        for args in final.all("RUN"):
            assert not INSTALLERS.search(args), f"{final.name}: installs in the final stage: {args}"
            assert not BUILD_TOOLS.search(args), f"{final.name}: build tool in: {args}"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_oci_labels_and_exec_entrypoint(name: str) -> None:
    for final in final_stages(parse(IMAGES[name]())):
        labels = " ".join(final.all("LABEL"))
        missing = sorted(key for key in OCI_LABELS if f"{key}=" not in labels)
        assert not missing, f"{final.name or final.base}: missing labels {missing}"
        entrypoint = final.all("ENTRYPOINT")
        assert entrypoint and entrypoint[-1].startswith("["), "exec-form ENTRYPOINT"


def test_mesh_images_run_the_mesh_cli() -> None:
    operator = final_stages(parse(IMAGES["Dockerfile.operator"]()))[0]
    agent = final_stages(parse(IMAGES["Dockerfile.agent"]()))[0]
    assert operator.all("ENTRYPOINT") == ['["mesh"]'] == agent.all("ENTRYPOINT")
    assert operator.all("CMD") == ['["operator"]']
    assert agent.all("CMD") == ['["agent"]']


def test_llama_recipe_builds_both_programs_from_one_tree() -> None:
    stages = parse(recipe_from_docs())
    builds = [s for s in stages if any("cmake --build" in a for a in s.all("RUN"))]
    assert len(builds) == 1
    (build,) = builds
    command = " ".join(build.all("RUN"))
    assert "-DGGML_RPC=ON" in command
    assert "--target llama-server ggml-rpc-server" in command
    finals = {s.name for s in final_stages(stages)}
    assert finals == {"rpc-server", "llama-server"}


def test_build_context_holds_only_the_sources() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    rules = [line for line in lines if line and not line.startswith("#")]
    assert rules[0] == "*", "ignore everything (.venv, .mesh, caches), then allow the sources"
    assert {"!operator/", "!node_agent/", "!pyproject.toml"} <= set(rules)
