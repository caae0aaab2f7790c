"""The work queue every reconcile runs through: due order, one worker per key,
triggers while running, periodic looks, keys that leave."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from mesh_operator.handlers.queue import WorkQueue

pytestmark = pytest.mark.unit


class Recorder:
    """A work function that records calls and answers per key."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.running: set[str] = set()
        self.overlap: list[str] = []
        self.answers: dict[str, float | None] = {}
        self.gate: dict[str, threading.Event] = {}
        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)

    def __call__(self, key: str) -> float | None:
        with self.lock:
            if key in self.running:
                self.overlap.append(key)
            self.running.add(key)
            self.done.notify_all()
        gate = self.gate.get(key)
        if gate is not None:
            gate.wait(5)
        with self.lock:
            self.running.discard(key)
            self.calls.append(key)
            self.done.notify_all()
        if key == "boom":
            raise RuntimeError("bad object")
        return self.answers.get(key, 3600.0)

    def wait_calls(self, key: str, count: int) -> None:
        with self.lock:
            assert self.done.wait_for(lambda: self.calls.count(key) >= count, timeout=5), (
                f"{key} ran {self.calls.count(key)} times, expected {count}"
            )


@pytest.fixture
def work() -> Iterator[tuple[WorkQueue, Recorder]]:
    recorder = Recorder()
    queue = WorkQueue(recorder, workers=3)
    queue.start()
    yield queue, recorder
    for gate in recorder.gate.values():
        gate.set()
    queue.stop(timeout=5)


def test_a_triggered_key_runs_and_comes_back_when_its_work_asks(
    work: tuple[WorkQueue, Recorder],
) -> None:
    queue, rec = work
    rec.answers["m"] = 0.05
    queue.trigger("m")
    rec.wait_calls("m", 3)
    assert "m" in queue


def test_a_key_whose_object_is_gone_leaves_the_queue(work: tuple[WorkQueue, Recorder]) -> None:
    queue, rec = work
    rec.answers["gone"] = None
    queue.trigger("gone")
    rec.wait_calls("gone", 1)
    deadline = time.monotonic() + 5
    while "gone" in queue and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "gone" not in queue
    assert rec.calls.count("gone") == 1


def test_a_trigger_while_running_runs_it_once_more_never_twice_at_once(
    work: tuple[WorkQueue, Recorder],
) -> None:
    queue, rec = work
    rec.gate["m"] = threading.Event()
    queue.trigger("m")
    with rec.lock:
        assert rec.done.wait_for(lambda: "m" in rec.running, timeout=5)
    queue.trigger("m")
    queue.trigger("m")
    rec.gate["m"].set()
    rec.wait_calls("m", 2)
    assert rec.overlap == []


def test_an_earlier_trigger_wins_over_a_later_look(work: tuple[WorkQueue, Recorder]) -> None:
    queue, rec = work
    queue.trigger("m", delay=3600)
    queue.trigger("m")
    rec.wait_calls("m", 1)


def test_a_failing_key_does_not_stop_the_others(work: tuple[WorkQueue, Recorder]) -> None:
    queue, rec = work
    queue.trigger("boom")
    queue.trigger("fine")
    rec.wait_calls("boom", 1)
    rec.wait_calls("fine", 1)
    assert "boom" in queue, "looked at again later"


def test_a_slow_key_does_not_hold_the_others(work: tuple[WorkQueue, Recorder]) -> None:
    queue, rec = work
    rec.gate["slow"] = threading.Event()
    queue.trigger("slow")
    for key in ("x", "y", "z"):
        queue.trigger(key)
    for key in ("x", "y", "z"):
        rec.wait_calls(key, 1)
    assert "slow" not in rec.calls
    rec.gate["slow"].set()
    rec.wait_calls("slow", 1)
