"""The configuration builders of the real test nodes (`e2e.nodes.configs`): the
containerd 2 file is valid TOML of version 3 with the settings the nodes need, and
the kubelet turns the ImageVolume gate on."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import yaml

from e2e.nodes import configs

pytestmark = pytest.mark.unit


def test_containerd_2_config() -> None:
    files = configs.NodeFiles(Path("/n/node-a"))
    text = configs.containerd2_config(
        files, "172.30.0.1:5000/e2e/pause:1", "/usr/lib/cni", "/usr/bin/runc", "/c2/shim"
    )
    config = tomllib.loads(text)
    assert config["version"] == 3
    assert config["grpc"]["address"] == str(files.containerd_socket)
    assert "io.containerd.nri.v1.nri" in config["disabled_plugins"]
    images = config["plugins"]["io.containerd.cri.v1.images"]
    assert images["pinned_images"]["sandbox"] == "172.30.0.1:5000/e2e/pause:1"
    assert images["registry"]["config_path"] == str(files.registry_hosts)
    runtime = config["plugins"]["io.containerd.cri.v1.runtime"]
    assert runtime["restrict_oom_score_adj"] is True
    assert runtime["netns_mounts_under_state_dir"] is True
    runc = runtime["containerd"]["runtimes"]["runc"]
    assert runc["runtime_path"] == "/c2/shim"
    assert runc["options"] == {"BinaryName": "/usr/bin/runc", "SystemdCgroup": False}
    assert runtime["cni"] == {"bin_dirs": ["/usr/lib/cni"], "conf_dir": str(files.cni_conf_dir)}


def test_containerd_1_6_config_is_still_version_2() -> None:
    files = configs.NodeFiles(Path("/n/node-a"))
    config = tomllib.loads(configs.containerd_config(files, "p:1", "/usr/lib/cni", "runc"))
    assert config["version"] == 2
    assert config["plugins"]["io.containerd.grpc.v1.cri"]["sandbox_image"] == "p:1"


def test_kubelet_turns_image_volumes_on() -> None:
    files = configs.NodeFiles(Path("/n/node-a"))
    config = yaml.safe_load(configs.kubelet_config(files, "172.30.0.11", Path("/ca.crt")))
    assert config["featureGates"] == {"ImageVolume": True}
