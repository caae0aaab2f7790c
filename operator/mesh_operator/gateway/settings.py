"""The gateway's tunables and their defaults, in one frozen value the CLI fills in."""

from __future__ import annotations

from dataclasses import dataclass

from mesh_operator.gateway.affinity import PREFIX_CHARS, Routing

MIB = 1024 * 1024


@dataclass(frozen=True)
class GatewaySettings:
    host: str = "0.0.0.0"
    port: int = 8000
    # How long a request may wait for its model (not Ready, or every slot busy).
    hold_timeout: float = 120.0
    # Requests waiting per model beyond which new ones are refused at once.
    max_queue: int = 1024
    max_body_bytes: int = 16 * MIB
    # Sends of one request that failed after reaching a host, before answering 502.
    max_attempts: int = 3
    retry_after: int = 5
    connect_timeout: float = 5.0
    # Longest silence from a host (between two reads) before the request fails.
    read_timeout: float = 600.0
    probe_timeout: float = 2.0
    # Graceful shutdown: keep serving this long after SIGTERM (endpoints update),
    # then stop listening and give in-flight requests up to drain_timeout.
    shutdown_delay: float = 0.0
    drain_timeout: float = 150.0
    access_log: bool = False
    # Which host of a model a request goes to (docs/gateway.md, "Routing").
    routing: Routing = "prefix"
    # Characters at the start of a prompt that make its affinity key.
    prefix_chars: int = PREFIX_CHARS
