"""Where the real parts built by `scripts/setup.sh` live, and how a test asks for one.

Test infrastructure. `scripts/setup.sh` builds or fetches each part into the cache
(`$MESH_CACHE`, default `~/.cache/mesh`) and links it under `.mesh/` in the work
tree; this module only looks there. Under CI (`CI=true`) a missing part is a
failure, never a skip: a skipped integration test is a hidden red.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
SETUP_HINT = "run scripts/setup.sh first"


class PartMissingError(RuntimeError):
    """A real part the caller needs has not been built or fetched."""


def mesh_dir() -> Path:
    return Path(os.environ.get("MESH_DIR", str(REPO_ROOT / ".mesh")))


def cache_dir() -> Path:
    """The cache of built parts (`$MESH_CACHE`, as scripts/lib.sh sets it)."""
    default = Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "mesh"
    return Path(os.environ.get("MESH_CACHE", str(default)))


def bin_dir() -> Path:
    return mesh_dir() / "bin"


def binary(name: str) -> Path:
    """Path of a built executable (kube-apiserver, llama-server, helm, ...)."""
    path = bin_dir() / name
    if not (path.exists() and os.access(path, os.X_OK)):
        raise PartMissingError(f"{name} not found in {bin_dir()}: {SETUP_HINT}")
    return path


def containerd2_dir() -> Path:
    """containerd 2 (`containerd`, `containerd-shim-runc-v2`, `ctr`), built by
    scripts/build-containerd.sh: the runtime of nodes that mount image volumes."""
    folder = mesh_dir() / "containerd2"
    for name in ("containerd", "containerd-shim-runc-v2"):
        if not os.access(folder / name, os.X_OK):
            raise PartMissingError(f"{name} (containerd 2) not found in {folder}: {SETUP_HINT}")
    return folder


def model_path(name: str = MODEL_FILE) -> Path:
    path = mesh_dir() / "models" / name
    if not path.is_file():
        raise PartMissingError(f"model {name} not found in {path.parent}: {SETUP_HINT}")
    return path


def mesh_cli() -> Path:
    """The `mesh` console script of the environment running the tests."""
    beside = Path(sys.executable).parent / "mesh"
    if beside.exists():
        return beside
    found = shutil.which("mesh")
    if found is None:
        raise PartMissingError("the mesh console script is not on PATH: pip install -e .")
    return Path(found)


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}
