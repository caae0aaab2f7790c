"""Durations as Kubernetes users write them (`30s`, `10m`, `1h30m`).

A field of type `Duration` takes a string of whole hours, minutes and seconds in
that order, each at most once (the subset of Go's `time.ParseDuration` that
`kubectl` users write for timeouts), checked in the CRD by a pattern and here by
`parse_duration`, which gives the seconds.
"""

from __future__ import annotations

import re
from typing import Annotated, Final

from pydantic import AfterValidator, Field

DURATION_PATTERN: Final = r"^([0-9]{1,5}h)?([0-9]{1,5}m)?([0-9]{1,7}s)?$"
EXAMPLES: Final = "e.g. 30s, 10m, 1h30m"
_GRAMMAR: Final = re.compile(DURATION_PATTERN)
_UNIT_SECONDS: Final = {"h": 3600, "m": 60, "s": 1}


class DurationError(ValueError):
    """Text that is not a duration this API takes."""


def parse_duration(text: str) -> float:
    """The seconds `text` stands for (`1h30m` -> 5400.0); DurationError when it is
    not a positive duration."""
    match = _GRAMMAR.match(text)
    if not text or match is None:
        raise DurationError(f"{text!r} is not a duration ({EXAMPLES})")
    seconds = 0
    for part in match.groups():
        if part:
            seconds += int(part[:-1]) * _UNIT_SECONDS[part[-1]]
    if seconds <= 0:
        raise DurationError(f"{text!r} is not a positive duration ({EXAMPLES})")
    return float(seconds)


def _checked(text: str) -> str:
    parse_duration(text)
    return text


Duration = Annotated[
    str,
    Field(max_length=24, pattern=DURATION_PATTERN),
    AfterValidator(_checked),
]
