"""Real test nodes: kubelet, containerd, runc, CNI, kube-proxy, kube-router and
CoreDNS on one machine, each node in a network namespace of its own; see
`e2e.nodes.harness`."""

from e2e.nodes.harness import NodesError, RealNodes, default_state_dir, require_root
from e2e.nodes.images import ImageError, chart_images

__all__ = [
    "ImageError",
    "NodesError",
    "RealNodes",
    "chart_images",
    "default_state_dir",
    "require_root",
]
