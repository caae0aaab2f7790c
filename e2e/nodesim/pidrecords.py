"""Pid records of the processes a simulated node runs for its pods' containers.

Test infrastructure. The node process writes one record per running container
(`<pod dir>/pids/<container>.json`); the harness reads them to kill a lost node's
containers after the node process itself is gone, and to tell tests which pid a
container has. A record holds the pid and the process's start time (field 22 of
/proc/<pid>/stat), so a pid the kernel reused for something else is never
signalled: the command line cannot be compared, since a script's /proc cmdline
starts with its interpreter.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PidRecord:
    pid: int
    start_time: int
    argv: list[str]


def process_start_time(pid: int) -> int | None:
    """Clock ticks after boot at which `pid` started, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); start time is field 22.
    if fields[0] == "Z":
        return None
    return int(fields[19])


def write_record(path: Path, pid: int, argv: list[str]) -> PidRecord | None:
    start = process_start_time(pid)
    if start is None:
        return None
    record = PidRecord(pid, start, argv)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": pid, "start_time": start, "argv": argv}))
    tmp.replace(path)
    return record


def read_record(path: Path) -> PidRecord | None:
    """The record at `path` when its process still runs, else None."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    record = PidRecord(int(raw["pid"]), int(raw["start_time"]), list(raw["argv"]))
    if process_start_time(record.pid) != record.start_time:
        return None
    return record


def live_records(folder: Path, pattern: str = "*.json") -> dict[Path, PidRecord]:
    found: dict[Path, PidRecord] = {}
    for path in sorted(folder.glob(pattern)):
        record = read_record(path)
        if record is not None:
            found[path] = record
    return found


def is_running(record: PidRecord) -> bool:
    return process_start_time(record.pid) == record.start_time


def signal_group(record: PidRecord, sig: signal.Signals) -> None:
    """Signal the process group the container leads (each starts its own session)."""
    if not is_running(record):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(record.pid, sig)


def kill_and_wait(records: list[PidRecord], timeout: float = 10.0) -> None:
    """SIGKILL every record's process group and wait until the processes are gone."""
    for record in records:
        signal_group(record, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while any(is_running(r) for r in records) and time.monotonic() < deadline:
        time.sleep(0.05)
