"""The end-to-end tests share one installation of mesh on real nodes with the
chart's integration tests: `e2e.realcluster` is registered as a plugin of the
session (its `real_mesh` fixture), here and in tests/integration/conftest.py."""

from __future__ import annotations

import pytest

from e2e import realcluster


def pytest_configure(config: pytest.Config) -> None:
    realcluster.register(config)
