"""`mesh gateway`: its arguments and the refusals it makes before starting anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh_operator.cli import gateway_cmd
from mesh_operator.cli.main import build_parser
from mesh_operator.gateway.settings import GatewaySettings

pytestmark = pytest.mark.unit


def test_defaults_are_the_settings_defaults() -> None:
    parser, _ = build_parser()
    args = parser.parse_args(["gateway"])
    assert gateway_cmd._settings(args) == GatewaySettings()


def test_flags_reach_the_settings() -> None:
    parser, _ = build_parser()
    args = parser.parse_args(
        ["gateway", "--port", "9000", "--hold-timeout", "30", "--max-queue", "5",
         "--max-body-bytes", "1024", "--drain-timeout", "10", "--access-log"]
    )  # fmt: skip
    settings = gateway_cmd._settings(args)
    assert (settings.port, settings.hold_timeout, settings.max_queue) == (9000, 30.0, 5)
    assert (settings.max_body_bytes, settings.drain_timeout, settings.access_log) == (
        1024,
        10.0,
        True,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["gateway", "--backend", "no-url"],
        ["gateway", "--backend", "m=ftp://h:1"],
        ["gateway", "--backend", "m=http://h:1", "--api-keys-dir", ".", "--api-keys-secret", "k"],
    ],
)
def test_bad_arguments_exit_1_before_serving(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    parser, _ = build_parser()
    assert gateway_cmd.run(parser.parse_args(argv)) == 1
    assert "mesh gateway:" in capsys.readouterr().err


def test_no_cluster_configuration_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser, _ = build_parser()
    absent = tmp_path / "kubeconfig"
    assert gateway_cmd.run(parser.parse_args(["gateway", "--kubeconfig", str(absent)])) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("mesh gateway: no usable cluster configuration") and str(absent) in err
