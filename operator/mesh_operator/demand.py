"""Demand for each model, as the gateways measure it, summed over every gateway.

Each gateway answers `GET /demand` with, per model (`namespace/name`), the
requests it holds now (`waiting`: the model is not Ready or every slot is busy),
those in flight to the model's hosts (`busy`) and how many it has received since
it started (`requests`). `DemandTracker` folds the answers of every gateway, poll
after poll, into one `Demand` per model: the load now (waiting plus busy), when
the model was last active at any gateway, and how the load moved over the last
hour, which is what scale to zero and the autoscaler decide from
(`handlers.decision`). Pure: the caller polls and gives the time.

A model is active at a poll when any gateway holds or serves a request for it, or
has received one since the poll before (a request that came and went in
between). Idle time starts from the first poll that saw the model, so a model
just made, or an operator just started, never counts as idle for longer than it
has been watched.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# How much load history is kept per model: the longest scale-down window honoured.
KEEP_SECONDS = 3600.0


class DemandFormatError(ValueError):
    """A gateway's /demand answer is not what the contract says."""


@dataclass(frozen=True)
class ModelLoad:
    waiting: int
    busy: int
    requests: int


@dataclass(frozen=True)
class GatewayReport:
    """One gateway's answer: its address and the models it knows."""

    gateway: str
    models: Mapping[str, ModelLoad]


def parse_report(gateway: str, body: Any) -> GatewayReport:
    """The report in a gateway's JSON answer; DemandFormatError naming what is wrong."""
    models = body.get("models") if isinstance(body, Mapping) else None
    if not isinstance(models, Mapping):
        raise DemandFormatError(f"{gateway}: /demand has no 'models' object")
    out: dict[str, ModelLoad] = {}
    for key, entry in models.items():
        if not isinstance(entry, Mapping):
            raise DemandFormatError(f"{gateway}: /demand entry {key!r} is not an object")
        values = []
        for name in ("waiting", "busy", "requests"):
            value = entry.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DemandFormatError(
                    f"{gateway}: /demand {key!r} field {name!r} is not a count: {value!r}"
                )
            values.append(value)
        out[str(key)] = ModelLoad(*values)
    return GatewayReport(gateway, out)


@dataclass(frozen=True)
class Demand:
    """One model's demand summed over the gateways, at the last poll."""

    waiting: int
    busy: int
    # The last poll at which the model was active (or the first that saw it).
    last_active: dt.datetime
    # (since, load): the load held from `since` until the next entry; oldest first.
    history: tuple[tuple[dt.datetime, int], ...] = ()
    # Every gateway answered the last poll: no demand can be hidden from it.
    complete: bool = True

    @property
    def load(self) -> int:
        return self.waiting + self.busy

    def peak_since(self, start: dt.datetime) -> int:
        """The highest load from `start` until now (the load now at least)."""
        peak = self.load
        ends: list[dt.datetime | None] = [since for since, _ in self.history[1:]]
        ends.append(None)
        for (_, load), end in zip(self.history, ends, strict=False):
            # An entry counts when it still held at `start` or began after it.
            if end is None or end > start:
                peak = max(peak, load)
        return peak

    def idle_seconds(self, now: dt.datetime) -> float:
        return 0.0 if self.load else max(0.0, (now - self.last_active).total_seconds())


@dataclass
class _ModelState:
    last_active: dt.datetime
    load: int = 0
    waiting: int = 0
    busy: int = 0
    history: list[tuple[dt.datetime, int]] = field(default_factory=list)
    # The requests counter each gateway reported last.
    counters: dict[str, int] = field(default_factory=dict)


class DemandTracker:
    """Folds successive polls of every gateway into one `Demand` per model."""

    def __init__(self, keep_seconds: float = KEEP_SECONDS) -> None:
        self.keep_seconds = keep_seconds
        self._models: dict[str, _ModelState] = {}
        self._complete = False
        self._polled = False

    def observe(self, now: dt.datetime, reports: Sequence[GatewayReport | None]) -> list[str]:
        """Take one poll: a report per gateway, None for one that did not answer.
        Returns the models that have requests waiting now and had none before (the
        ones to look at at once: they may be scaled to zero)."""
        answered = [r for r in reports if r is not None]
        self._complete = bool(reports) and len(answered) == len(reports)
        self._polled = bool(reports)
        keys = {key for r in answered for key in r.models}
        woke: list[str] = []
        for key in keys:
            state = self._models.get(key)
            if state is None:
                state = self._models[key] = _ModelState(last_active=now)
            waiting = busy = 0
            arrived = False
            for report in answered:
                entry = report.models.get(key)
                if entry is None:
                    continue
                waiting += entry.waiting
                busy += entry.busy
                before = state.counters.get(report.gateway)
                # A counter that moved counts as arrivals, also one that went down
                # (a restarted gateway: what it counts now came in since).
                if before is not None and entry.requests != before and entry.requests > 0:
                    arrived = True
                state.counters[report.gateway] = entry.requests
            if waiting and not state.waiting:
                woke.append(key)
            if waiting or busy or arrived:
                state.last_active = now
            state.waiting, state.busy = waiting, busy
            load = waiting + busy
            if not state.history or load != state.load:
                state.history.append((now, load))
            state.load = load
            self._trim(state, now)
        # A model no gateway knows any more (deleted) is forgotten.
        if answered and self._complete:
            for key in [k for k in self._models if k not in keys]:
                del self._models[key]
        return sorted(woke)

    def demand(self, key: str) -> Demand | None:
        """The model's demand; None before any gateway was polled or while none
        has reported the model."""
        state = self._models.get(key)
        if state is None or not self._polled:
            return None
        return Demand(
            waiting=state.waiting,
            busy=state.busy,
            last_active=state.last_active,
            history=tuple(state.history),
            complete=self._complete,
        )

    def _trim(self, state: _ModelState, now: dt.datetime) -> None:
        cutoff = now - dt.timedelta(seconds=self.keep_seconds)
        # Keep the entry in force at the cutoff: it says what the load was then.
        while len(state.history) > 1 and state.history[1][0] <= cutoff:
            state.history.pop(0)
