"""The exceptions the planner raises for input it cannot use.

Every message is a single line that says what is wrong and where (file, byte
offset, inventory path), so `mesh plan` can print it as is and exit 2.
"""

from __future__ import annotations


class PlannerInputError(ValueError):
    """A model header, an inventory or a request the planner cannot use."""


class HeaderTruncatedError(PlannerInputError):
    """The bytes end before the GGUF header does (before the end of the tensor infos).

    `offset` is the byte where the item that did not fit starts, so the header is
    longer than that. A reader of a remote file tells this from a bad header by
    the type, and reads a longer prefix.
    """

    def __init__(self, source: str, offset: int, stage: str) -> None:
        super().__init__(
            f"{source}: truncated at byte {offset} while reading {stage}"
            " (the header must reach the end of the tensor infos)"
        )
        self.source = source
        self.offset = offset
        self.stage = stage
