"""One log line per state change.

The agent runs a loop every few seconds; logging every failed attempt would bury
the one line that matters. `TransitionLog` remembers the last state of each named
subject (NVML, a GPU, the API server, an RPC server, the node's health) and logs
only when that state changes, at a level that follows the new state.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("mesh_agent")

# States that read as trouble are logged as warnings; everything else as info.
_TROUBLE_PREFIXES = (
    "unavailable",
    "lost",
    "error",
    "failing",
    "down",
    "hung",
    "unhealthy",
    "degraded",
    "conflict",
)


class TransitionLog:
    """Last known state per subject; logs a line only when a state changes."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self._states: dict[str, str] = {}
        self._logger = logger
        self._lock = threading.Lock()

    def record(self, subject: str, state: str, message: str) -> bool:
        """Set `subject`'s state; log `message` and return True if it changed."""
        with self._lock:
            if self._states.get(subject) == state:
                return False
            self._states[subject] = state
        trouble = state.lower().startswith(_TROUBLE_PREFIXES)
        self._logger.log(logging.WARNING if trouble else logging.INFO, "%s", message)
        return True

    def state(self, subject: str) -> str | None:
        with self._lock:
            return self._states.get(subject)

    def forget(self, subject: str) -> None:
        with self._lock:
            self._states.pop(subject, None)
