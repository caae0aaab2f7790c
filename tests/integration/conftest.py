"""The chart's install and dashboards tests run on the installation of mesh on
real nodes that the end-to-end tests use: `e2e.realcluster` is registered as a
plugin of the session (its `real_mesh` fixture), here and in e2e/conftest.py."""

from __future__ import annotations

import pytest

from e2e import realcluster


def pytest_configure(config: pytest.Config) -> None:
    realcluster.register(config)
