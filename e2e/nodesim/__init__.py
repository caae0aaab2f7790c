"""Simulated Kubernetes nodes that really run their pods, as local processes.

Why it stays beside the real nodes (`e2e.nodes`): what users install — images,
chart, Pod Security, NetworkPolicies, DNS, the end-to-end scenario and `make
demo`, the chart's install and dashboards tests — runs on real nodes (kubelet,
containerd, runc). The operator's integration tests (tests/integration/test_operator.py:
the header-reader pod of a model on a PVC) exercise reconciliation on the code in
the work tree, with no image build in between and no root; for them a node that
runs a pod's `mesh` command as a local process is enough and takes seconds.
Nothing here stands in for a property of the runtime: tests of images, users,
resources, policies, Services and llama.cpp's servers in pods use real nodes,
and the simulator runs only the `mesh` CLI and Python (`images`).

Each simulated node is one Python process (`e2e.nodesim.kubelet`) that registers a Node on the local
control plane (`e2e.cluster`), keeps its Lease, and runs the pods the real
scheduler binds to it:

* containers are local processes chosen by image/command (`images`), with the
  kubelet's environment rules (`environment`) and volumes as directories, paths
  under a mountPath rewritten to them (`volumes`);
* each pod gets its own IP in its own network namespace on a bridge, or a
  127.x address without root (`network`); pods reach the API server at their
  own 127.0.0.1 (`apiproxy`) with their service account's token through
  KUBECONFIG; KUBERNETES_SERVICE_HOST/PORT stay unset, since in-cluster loaders
  would then read the token from a fixed path that cannot exist here;
* probes, restarts with back-off, status and graceful deletion follow the
  kubelet (`probes`, `containers`, `pods`, `status`);
* tests drive it through `SimulatedCluster` (`harness`) or
  `python -m e2e.nodesim up|down|status|...`.

What is real: the API server, scheduler, controller-manager (DaemonSets,
ReplicaSets, EndpointSlices, node lifecycle), RBAC with the Node authorizer and
NodeRestriction, the TokenRequest API, the processes and their sockets. What
is simplified: no images, filesystems or resource limits (containers share the
machine's files, except for volumes); no Services' virtual IPs (no kube-proxy:
clients use pod IPs from EndpointSlices); NetworkPolicies are not enforced;
preStop/postStart hooks, ephemeral containers and in-place updates are not run.
"""

from e2e.nodesim.harness import NodeSimError, SimulatedCluster, SimulatedNode

__all__ = ["NodeSimError", "SimulatedCluster", "SimulatedNode"]
