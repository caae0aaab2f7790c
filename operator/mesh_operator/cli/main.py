"""Entry point of the `mesh` console script, and of `kubectl-mesh`, the same CLI as a
kubectl plugin (`kubectl mesh status`)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from mesh_operator import __version__

# Subcommands in help order; a module that is not there yet is simply not offered.
SUBCOMMANDS = (
    "operator",
    "agent",
    "gateway",
    "plan",
    "profile",
    "fetch",
    "push-model",
    "status",
    "doctor",
)

EXIT_BAD_INPUT = 2
# kubectl runs a plugin `kubectl-<name>` found on PATH for `kubectl <name>`.
PLUGIN_SCRIPT = "kubectl-mesh"


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on bad usage already; keep its message to one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _modules(only: str | None = None) -> dict[str, ModuleType]:
    found: dict[str, ModuleType] = {}
    for name in SUBCOMMANDS:
        if only is not None and name != only:
            continue
        qualified = f"mesh_operator.cli.{name.replace('-', '_')}_cmd"
        if importlib.util.find_spec(qualified) is not None:
            found[name] = importlib.import_module(qualified)
    return found


def program_name(argv0: str) -> str:
    """How the user called the CLI: `kubectl mesh` through the plugin, else `mesh`."""
    return "kubectl mesh" if os.path.basename(argv0) == PLUGIN_SCRIPT else "mesh"


def build_parser(
    only: str | None = None, prog: str = "mesh"
) -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    """The parser; with `only`, just that subcommand's module is imported.

    Importing every subcommand would load kopf, huggingface_hub and the rest
    into each process: the node agent on every node would pay for the operator.
    """
    parser = _Parser(
        prog=prog,
        description="Pool the GPUs of a Kubernetes cluster to serve llama.cpp models.",
    )
    parser.add_argument("--version", action="version", version=f"mesh {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    modules = _modules(only)
    for module in modules.values():
        module.add_parser(sub)
    return parser, modules


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    chosen = args_list[0] if args_list and args_list[0] in SUBCOMMANDS else None
    parser, modules = build_parser(chosen, program_name(sys.argv[0]))
    args = parser.parse_args(args_list)
    args.prog = parser.prog
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    result: int = modules[args.command].run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
