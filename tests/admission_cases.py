"""The admission fixtures of tests/fixtures/admission.yaml, loaded once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

FIXTURE = Path(__file__).parent / "fixtures" / "admission.yaml"


def load() -> dict[str, list[dict[str, Any]]]:
    data: dict[str, list[dict[str, Any]]] = yaml.safe_load(FIXTURE.read_text())
    return data


CASES = load()
