"""`python -m bench [NAME [ARGS...]]`: run one benchmark, or all of them in turn."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import cast


def _benches() -> list[str]:
    root = Path(__file__).parent
    return sorted(
        m.name
        for m in pkgutil.iter_modules([str(root)])
        if m.ispkg and importlib.util.find_spec(f"bench.{m.name}.run") is not None
    )


def _main_of(name: str) -> Callable[[list[str]], int]:
    module = importlib.import_module(f"bench.{name}.run")
    return cast(Callable[[list[str]], int], module.main)


def main(argv: list[str]) -> int:
    names = _benches()
    if argv and argv[0] in ("-h", "--help"):
        print(f"usage: python -m bench [{'|'.join(names)}] [ARGS...]")
        return 0
    if argv:
        if argv[0] not in names:
            print(
                f"bench: unknown benchmark {argv[0]!r} (have: {', '.join(names)})", file=sys.stderr
            )
            return 2
        return _main_of(argv[0])(argv[1:])
    status = 0
    for name in names:
        print(f"== bench {name}", flush=True)
        status = max(status, _main_of(name)([]))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
