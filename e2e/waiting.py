"""Waiting for something to become true, and finding a free port: the two things
every test and harness here does. Test infrastructure."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeoutError(AssertionError):
    """What was waited for did not happen in time (an assertion: tests fail on it)."""


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    timeout: float = 60.0,
    every: float = 0.5,
    explain: Callable[[], str] | None = None,
) -> T:
    """Poll `probe` until it returns something truthy; fail naming `what`, and
    saying what `explain` finds then (the state that kept it from happening)."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    state = f"; {explain()}" if explain is not None else ""
    raise WaitTimeoutError(
        f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r}){state}"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
