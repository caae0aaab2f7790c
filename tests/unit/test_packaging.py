"""The project's own packaging metadata builds without deprecation warnings: the
license is an SPDX expression, and the build asks for a setuptools that reads it
(77 and later; earlier ones refuse the string, and later ones warn at length about
the `{text = ...}` table on every install of `scripts/setup.sh`)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.licenses import canonicalize_license_expression
from packaging.requirements import Requirement
from packaging.version import Version

pytestmark = pytest.mark.unit

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def test_license_is_an_spdx_expression_and_setuptools_reads_it() -> None:
    data = tomllib.loads(PYPROJECT.read_text())
    license_ = data["project"]["license"]
    assert isinstance(license_, str), "project.license as a table is deprecated"
    assert canonicalize_license_expression(license_) == license_
    requires = [Requirement(r) for r in data["build-system"]["requires"]]
    (setuptools,) = [r for r in requires if r.name == "setuptools"]
    assert not setuptools.specifier.contains(Version("76.9")), setuptools
    assert setuptools.specifier.contains(Version("77.0.0"))
    # Classifiers would repeat the license, which setuptools refuses with an SPDX one.
    assert not any(c.startswith("License ::") for c in data["project"].get("classifiers", []))
