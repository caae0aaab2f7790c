"""The one exception the planner raises for input it cannot use.

Every message is a single line that says what is wrong and where (file, byte
offset, inventory path), so `mesh plan` can print it as is and exit 2.
"""

from __future__ import annotations


class PlannerInputError(ValueError):
    """A model header, an inventory or a request the planner cannot use."""
