"""Start and stop long-running local processes by pid.

Test infrastructure. Every process is started in its own session with its output
in a log file and its pid in `<state>/pids/<name>.pid`, so a later command (or a
later test run) can stop exactly what was started, and never anything by name.
Before signalling a recorded pid, its command line is compared with the one that
was recorded, so a pid reused by the kernel for something else is left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

NSENTER = "nsenter"


@dataclass(frozen=True)
class Started:
    name: str
    pid: int
    log: Path


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class ProcessTable:
    """The processes of one state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.pid_dir = state_dir / "pids"
        self.log_dir = state_dir / "logs"

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        netns: str | None = None,
    ) -> Started:
        """Start `argv` in its own session; inside the named network namespace
        `netns` when given. That goes through nsenter, which keeps the machine's
        mounts (the cgroup hierarchy) visible and then execs the program, so the
        record accepts both command lines."""
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        launch = list(argv)
        if netns:
            launch = [NSENTER, f"--net=/run/netns/{netns}", "--", *argv]
        with log.open("ab") as out:
            proc = subprocess.Popen(
                launch,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
            )
        record = {"pid": proc.pid, "argv": list(argv), "launcher": launch[0]}
        (self.pid_dir / f"{name}.pid").write_text(json.dumps(record))
        return Started(name, proc.pid, log)

    def recorded(self) -> dict[str, int]:
        """Names and pids of recorded processes that are still the ones we started."""
        found: dict[str, int] = {}
        if not self.pid_dir.is_dir():
            return found
        for path in sorted(self.pid_dir.glob("*.pid")):
            record = json.loads(path.read_text())
            pid = int(record["pid"])
            cmd = _cmdline(pid)
            # Right after fork the child's cmdline can still be empty (it has not
            # exec'd yet): that is our process, not a reused pid.
            first = {record["argv"][0], record.get("launcher", record["argv"][0])}
            ours = cmd is not None and (not cmd or cmd[0] in first)
            if ours and alive(pid):
                found[path.stem] = pid
            else:
                path.unlink(missing_ok=True)
        return found

    def running(self, name: str) -> bool:
        return name in self.recorded()

    def stop(self, name: str, grace: float = 10.0) -> None:
        pid = self.recorded().get(name)
        if pid is not None:
            _terminate(pid, grace)
        (self.pid_dir / f"{name}.pid").unlink(missing_ok=True)

    def stop_all(self, order: Sequence[str] = (), grace: float = 10.0) -> list[str]:
        """Stop every recorded process, those named in `order` first; return their names."""
        table = self.recorded()
        names = [n for n in order if n in table] + [n for n in table if n not in order]
        for name in names:
            self.stop(name, grace)
        return names


def stop_popen(proc: subprocess.Popen[bytes], grace: float = 10.0) -> int:
    """SIGTERM a child we hold, SIGKILL after `grace`; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


def _terminate(pid: int, grace: float) -> None:
    # Signal the process group the process leads (it was started in its own
    # session), so children it spawned go with it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not alive(pid):
            _reap(pid)
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    while alive(pid):
        time.sleep(0.05)
    _reap(pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
