"""Imports between mesh's parts run one way.

Every module under operator/mesh_operator and node_agent/mesh_agent is parsed
(imports inside functions included) and each import mapped to the part it
reaches: a subpackage of mesh_operator (`api`, `planner`, `manifests`,
`handlers`, `gateway`, `cli`, `kubeclient`, ...), a top-level module of it
(`planning`, `source`, ...), the package itself, or the node agent. Then:

- no two parts import each other, directly or through others;
- the node agent imports only `mesh_operator.api` and `mesh_operator.kubeclient`;
- nothing but the CLI imports `mesh_operator.cli`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
ROOTS = {"mesh_operator": REPO / "operator", "mesh_agent": REPO / "node_agent"}
AGENT = "mesh_agent"
CLI = "mesh_operator.cli"
AGENT_MAY_IMPORT = frozenset({"mesh_operator.api", "mesh_operator.kubeclient"})

# Imports that break a rule in files whose owners are changing them, as (file,
# the part it imports); each goes when its file imports from the right place.
ALLOWED: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Import:
    file: str
    line: int
    source: str  # the part the importing module belongs to
    target: str  # the part the import reaches

    def __str__(self) -> str:
        return f"{self.file}:{self.line} {self.source} -> {self.target}"


def parts_of(roots: Mapping[str, Path]) -> frozenset[str]:
    """The parts of mesh: each subpackage and top-level module of mesh_operator."""
    package = roots["mesh_operator"] / "mesh_operator"
    return frozenset(
        f"mesh_operator.{path.stem}"
        for path in package.iterdir()
        if (path.is_dir() and any(path.glob("*.py")))
        or (path.suffix == ".py" and path.stem != "__init__")
    )


def part_of(module: str, parts: frozenset[str]) -> str | None:
    """The part a dotted module name belongs to; None outside mesh.

    `mesh_operator.__version__` belongs to the package itself, `mesh_operator`.
    """
    names = module.split(".")
    if names[0] == AGENT:
        return AGENT
    if names[0] != "mesh_operator":
        return None
    part = ".".join(names[:2])
    return part if part in parts else "mesh_operator"


def _module_name(path: Path, root: Path) -> str:
    names = list(path.relative_to(root).with_suffix("").parts)
    if names[-1] == "__init__":
        names.pop()
    return ".".join(names)


def _imported(node: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            package = module.split(".")
            keep = len(package) - node.level + (1 if is_package else 0)
            base = ".".join(package[:keep] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        if base in ("mesh_operator", AGENT):
            # `from mesh_operator import api` reaches the subpackage it names.
            yield from (f"{base}.{alias.name}" for alias in node.names)
        else:
            yield base


def find_imports(roots: Mapping[str, Path] = ROOTS, base: Path = REPO) -> list[Import]:
    """Every import of one mesh part by another, in file order (paths relative to `base`)."""
    parts = parts_of(roots)
    found = []
    for top, root in roots.items():
        for path in sorted((root / top).rglob("*.py")):
            module = _module_name(path, root)
            source = part_of(module, parts)
            assert source is not None
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                for name in _imported(node, module, path.name == "__init__.py"):
                    target = part_of(name, parts)
                    if target is not None and target != source:
                        line = getattr(node, "lineno", 0)
                        found.append(
                            Import(path.relative_to(base).as_posix(), line, source, target)
                        )
    return sorted(found, key=lambda i: (i.file, i.line, i.target))


def parts_on_cycles(imports: Sequence[Import]) -> set[tuple[str, str]]:
    """The edges (source, target) that lie on a cycle of the part graph."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.source, set()).add(imp.target)

    def reaches(start: str, goal: str) -> bool:
        seen, todo = {start}, [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    return {(a, b) for a, targets in graph.items() for b in targets if reaches(b, a)}


def violations(
    imports: Sequence[Import], allowed: frozenset[tuple[str, str]] = frozenset()
) -> list[str]:
    """One line per import that breaks a rule: `file:line from -> to (why)`."""
    cyclic = parts_on_cycles(imports)
    out = []
    for imp in imports:
        if (imp.file, imp.target) in allowed:
            continue
        if (imp.source, imp.target) in cyclic:
            out.append(f"{imp} (a cycle: {imp.target} imports {imp.source} too)")
        if imp.source == AGENT and imp.target not in AGENT_MAY_IMPORT:
            may = " and ".join(sorted(AGENT_MAY_IMPORT))
            out.append(f"{imp} (the node agent imports only {may})")
        if imp.target == CLI and imp.source != CLI:
            out.append(f"{imp} (nothing imports the CLI)")
    return out


def test_imports_run_one_way() -> None:
    found = violations(find_imports(), allowed=ALLOWED)
    assert not found, "imports against the rules:\n" + "\n".join(found)


def test_the_allow_list_holds_only_imports_still_there() -> None:
    present = {(imp.file, imp.target) for imp in find_imports()}
    gone = sorted(f"{file} -> {target}" for file, target in ALLOWED - present)
    assert not gone, "remove from ALLOWED, no longer imported: " + ", ".join(gone)


# -- the checker itself, on small trees -------------------------------------------


def _tree(tmp_path: Path, files: Mapping[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return {"mesh_operator": tmp_path / "operator", "mesh_agent": tmp_path / "node_agent"}


def _violations_in(tmp_path: Path, files: Mapping[str, str]) -> list[str]:
    return violations(find_imports(_tree(tmp_path, files), base=tmp_path))


BASE = {
    "operator/mesh_operator/__init__.py": "",
    "operator/mesh_operator/fleet.py": "from mesh_operator import __version__\n",
    "operator/mesh_operator/api/__init__.py": "",
    "operator/mesh_operator/kubeclient.py": "",
    "operator/mesh_operator/manifests/labels.py": "",
    "operator/mesh_operator/planner/__init__.py": "from mesh_operator.api import x\n",
    "operator/mesh_operator/cli/__init__.py": "import mesh_agent.agent\n",
    "node_agent/mesh_agent/__init__.py": "",
    "node_agent/mesh_agent/agent.py": "from mesh_operator.api.contract import y\n",
}


def test_a_clean_tree_has_no_violations(tmp_path: Path) -> None:
    assert _violations_in(tmp_path, BASE) == []


def test_a_cycle_through_an_import_inside_a_function(tmp_path: Path) -> None:
    files = {
        **BASE,
        "operator/mesh_operator/api/late.py": "def f():\n    from ..planner import z\n",
    }
    found = _violations_in(tmp_path, files)
    assert found == [
        "operator/mesh_operator/api/late.py:2 mesh_operator.api -> mesh_operator.planner "
        "(a cycle: mesh_operator.planner imports mesh_operator.api too)",
        "operator/mesh_operator/planner/__init__.py:1 mesh_operator.planner -> "
        "mesh_operator.api (a cycle: mesh_operator.api imports mesh_operator.planner too)",
    ]


def test_the_agent_imports_only_the_api_and_the_client(tmp_path: Path) -> None:
    files = {
        **BASE,
        "node_agent/mesh_agent/x.py": "import mesh_operator.kubeclient\n"
        "from mesh_operator import manifests\n",
    }
    assert _violations_in(tmp_path, files) == [
        "node_agent/mesh_agent/x.py:2 mesh_agent -> mesh_operator.manifests "
        "(the node agent imports only mesh_operator.api and mesh_operator.kubeclient)"
    ]


def test_nothing_imports_the_cli(tmp_path: Path) -> None:
    files = {**BASE, "operator/mesh_operator/source.py": "import mesh_operator.cli.main\n"}
    assert _violations_in(tmp_path, files) == [
        "operator/mesh_operator/source.py:1 mesh_operator.source -> mesh_operator.cli "
        "(nothing imports the CLI)"
    ]
