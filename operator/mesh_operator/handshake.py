"""Whether a model's host may run, given what its workers answered to its RPC
handshake: a host whose workers speak another RPC protocol stays stopped.

Pure. llama-server checks each worker's protocol version in its HELLO handshake
while it parses `--rpc`; on a mismatch it logs `RPC server version mismatch:
<major>.<minor>.<patch>` (the worker's version; its own is not printed) and aborts
with `<file>:<line>: RPC handshake failed for <host:port>`. The host container's
termination message (policy `FallbackToLogsOnError`: the tail of its log) carries
those lines into the pod's status, where the operator reads them. Restarting cannot
help while the images stay as they are, so the refusal is recorded in the model's
status and the host kept at zero replicas until the images, the model's spec or the
pool's spec change.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mesh_operator.api.meshmodel import VersionMismatch
from mesh_operator.manifests.workloads import images_digest

MISMATCH_REASON = "RpcVersionMismatch"
_MISMATCH = re.compile(r"RPC server version mismatch: (?P<version>\d+\.\d+\.\d+)")
_REFUSED = re.compile(r"RPC handshake failed for (?P<endpoint>[^\s,]+)")


@dataclass(frozen=True)
class HostExit:
    """What one host pod of the current plan left behind when its container ended."""

    pod: str
    images_key: str | None  # the pod's IMAGES_ANNOTATION
    messages: tuple[str, ...]  # termination messages, newest first


@dataclass(frozen=True)
class Worker:
    node: str
    image: str
    endpoint: str | None = None  # "ip:port" as passed to --rpc, once known


@dataclass(frozen=True)
class Group:
    """The images a host and its workers run, and the specs they come from."""

    llama_server: str
    workers: tuple[Worker, ...]
    generation: int
    pool_generation: int

    @property
    def images_key(self) -> str:
        return images_digest(self.llama_server, [w.image for w in self.workers])


@dataclass(frozen=True)
class Refusal:
    """A handshake refused for a protocol mismatch, read from one log."""

    worker_version: str | None
    endpoint: str | None
    line: str


@dataclass(frozen=True)
class HostVerdict:
    run: bool  # may the host Deployment have a replica?
    mismatch: VersionMismatch | None  # what the status keeps
    found: bool = False  # seen in a host's log by this reconcile (worth an Event)

    @property
    def message(self) -> str:
        return mismatch_message(self.mismatch) if self.mismatch is not None else ""


def read_refusal(message: str) -> Refusal | None:
    """The protocol mismatch in one termination message, if it holds one.

    The version line goes through llama.cpp's asynchronous logger and the abort
    line straight to stderr, so they come in either order, and the version line
    may be missing when the process ended first. Either is enough: the handshake
    fails only for a version (a lost connection aborts with another message).
    """
    found = _MISMATCH.search(message)
    refused = _REFUSED.search(message)
    if found is None and refused is None:
        return None
    where = found or refused
    assert where is not None
    return Refusal(
        worker_version=found["version"] if found else None,
        endpoint=refused["endpoint"] if refused else None,
        line=message[where.start() :].splitlines()[0].strip(),
    )


def mismatch_message(mismatch: VersionMismatch) -> str:
    where = f" on {', '.join(mismatch.nodes)}" if mismatch.nodes else ""
    version = (
        f" (the worker speaks RPC protocol {mismatch.worker_version})"
        if mismatch.worker_version
        else ""
    )
    return (
        f"llama-server image {mismatch.llama_server} refused ggml-rpc-server image "
        f"{', '.join(mismatch.rpc_servers)}{where}: RPC server version mismatch{version}; "
        "the host stays stopped until the images or the spec change: give rpcServer and "
        "llamaServer images of one llama.cpp build"
    )


def _still_refused(mismatch: VersionMismatch, group: Group) -> bool:
    images = {w.image for w in group.workers}
    return (
        mismatch.llama_server == group.llama_server
        and set(mismatch.rpc_servers) <= images
        and mismatch.generation == group.generation
        and mismatch.pool_generation == group.pool_generation
    )


def decide_host(
    previous: VersionMismatch | None, hosts: Sequence[HostExit], group: Group
) -> HostVerdict:
    """Run the host unless a host of these very images was refused for a protocol
    mismatch, now or before with the same specs."""
    if previous is not None and _still_refused(previous, group):
        return HostVerdict(run=False, mismatch=previous)
    key = group.images_key
    for host in hosts:
        if host.images_key != key:
            continue  # a host of other images: not evidence about these
        for message in host.messages:
            refusal = read_refusal(message)
            if refusal is None:
                continue
            # The host names the worker it gave up on; without a name, every worker.
            refusing = [w for w in group.workers if refusal.endpoint in (None, w.endpoint)]
            if not refusing:
                continue  # a worker no longer in the group (its image changed since)
            mismatch = VersionMismatch(
                llama_server=group.llama_server,
                rpc_servers=list(dict.fromkeys(w.image for w in refusing)),
                nodes=[w.node for w in refusing],
                worker_version=refusal.worker_version,
                generation=group.generation,
                pool_generation=group.pool_generation,
            )
            return HostVerdict(run=False, mismatch=mismatch, found=True)
    return HostVerdict(run=True, mismatch=None)
