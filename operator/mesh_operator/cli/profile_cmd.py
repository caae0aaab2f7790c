"""`mesh profile`: read a model file's header and print its profile as one line.

What the operator runs in a short-lived pod for a model on a PVC, which the
operator itself cannot read: the line goes to stdout and, with
`--termination-log`, to the container's termination message, where the operator
picks it up. Exit 0 with the line; 2 with one line naming what is wrong (written
to the termination message too, so the operator can say it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mesh_operator.planner import PlannerInputError, read_model_profile
from mesh_operator.planner.profile_codec import encode_profile

EXIT_BAD_INPUT = 2


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "profile",
        help="print a model file's planner profile as one line",
        description="Read a GGUF file's header (split files are found next to it) and "
        "print the planner's profile of it, encoded on one line.",
    )
    p.add_argument("--model", required=True, type=Path, help="the .gguf file (or its first split)")
    p.add_argument(
        "--termination-log",
        type=Path,
        help="also write the line here (the container's terminationMessagePath)",
    )


def _write(path: Path | None, text: str) -> None:
    if path is None:
        return
    try:
        path.write_text(text)
    except OSError as exc:
        print(f"mesh profile: cannot write {path}: {exc.strerror}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        line = encode_profile(read_model_profile(args.model))
    except PlannerInputError as exc:
        message = str(exc)
    except OSError as exc:
        message = f"{args.model}: {exc.strerror or exc}"
    else:
        print(line)
        _write(args.termination_log, line)
        return 0
    print(f"mesh profile: {message}", file=sys.stderr)
    _write(args.termination_log, message)
    return EXIT_BAD_INPUT
