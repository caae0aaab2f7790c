"""Which local executable stands in for a container image.

Test infrastructure. There is no container engine here: a container runs as a
local process. The executable is chosen by the basename of `command[0]` (so
`/usr/local/bin/mesh` and `mesh` are the same), or, when the container has no
command, by the image's known entrypoint. Only names in the table run: the
`mesh` CLI and Python, what the operator's own pods (the header reader) need.
The llama.cpp images run on real nodes (`e2e.nodes`) only. Any other image or
command leaves the container waiting with `ErrImagePull` and a message naming
what is known, never running something unexpected.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from e2e import parts

PYTHON_NAME = re.compile(r"^python(\d(\.\d+)?)?$")


class ImageError(Exception):
    """No local executable for this image and command: the pull "fails"."""


def _mesh_cli() -> Path:
    try:
        return parts.mesh_cli()
    except parts.PartMissingError:
        # Tests run as .venv/bin/pytest without the venv on PATH.
        sibling = Path(sys.executable).parent / "mesh"
        if sibling.exists():
            return sibling
        raise


def default_table() -> dict[str, Callable[[], Path]]:
    """Command names and how to find their executable (looked up when used)."""
    return {
        "mesh": _mesh_cli,
        "python": lambda: Path(sys.executable),
    }


def image_entrypoint(image: str) -> str | None:
    """The command name an image runs when the pod gives none."""
    reference = image.split("@", 1)[0]
    last = reference.rsplit("/", 1)[-1]
    repo = last.partition(":")[0]
    return "mesh" if repo == "mesh" else None


@dataclass(frozen=True)
class Resolved:
    executable: Path
    argv: list[str]


def resolve(
    image: str,
    command: Sequence[str],
    args: Sequence[str],
    extra: Mapping[str, str] | None = None,
    table: Mapping[str, Callable[[], Path]] | None = None,
) -> Resolved:
    """The local argv for a container's (already expanded) command and args."""
    lookup = dict(table if table is not None else default_table())
    for name, path in (extra or {}).items():
        lookup[name] = lambda path=path: Path(path)  # type: ignore[misc]
    if command:
        name = Path(command[0]).name
        rest = list(command[1:]) + list(args)
    else:
        entry = image_entrypoint(image)
        if entry is None:
            raise ImageError(
                f"image {image!r} has no command and no known entrypoint here "
                f"(known: {', '.join(sorted(lookup))})"
            )
        name, rest = entry, list(args)
    key = "python" if PYTHON_NAME.match(name) and name not in lookup else name
    finder = lookup.get(key)
    if finder is None:
        raise ImageError(
            f"no local executable for {name!r} (image {image!r}); "
            f"known: {', '.join(sorted(lookup))}"
        )
    try:
        executable = finder()
    except parts.PartMissingError as exc:
        raise ImageError(str(exc)) from exc
    return Resolved(executable, [str(executable), *rest])
