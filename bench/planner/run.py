"""`python -m bench planner`: the scenario suite, then the real measurement.

Prints two tables. The suite needs nothing but this package; the real runs
(`real`: the time model against llama.cpp, then mesh's plan against llama.cpp's
split) need llama.cpp and the model from `scripts/setup.sh` and are skipped,
saying why, when they are missing (or with --no-real). With --ram-tier GIB, the suite
again with that much system RAM offered on every node (`ram_tier`). With --floor, a third table
(`floor`): how often the beam search's plan is kept when the branch and bound
runs out of budget, over the suite's pools with both strategies (minutes).
With --compare-round-trips K (`refit`), the suite planned with K round trips per
remote device as well, both plans judged by today's time model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.planner.floor import format_floor, run_floor
from bench.planner.ram_tier import format_ram_tier, run_ram_tier
from bench.planner.real import format_real, format_run, measure
from bench.planner.refit import format_refit, run_refit
from bench.planner.shapes import write_fixtures
from bench.planner.suite import format_suite, run_suite
from e2e import parts
from e2e.parts import PartMissingError

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "planner" / "models"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench planner")
    parser.add_argument("--no-real", action="store_true", help="skip the llama.cpp measurement")
    parser.add_argument("--no-suite", action="store_true", help="skip the scenario suite")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also count the plans the beam search keeps when the search runs out of budget",
    )
    parser.add_argument(
        "--ram-tier",
        type=int,
        metavar="GIB",
        help="also plan the suite with GIB of system RAM offered on every node",
    )
    parser.add_argument(
        "--compare-round-trips",
        type=float,
        metavar="K",
        help="also plan the suite with K round trips per remote device and judge both plans "
        "by today's time model",
    )
    parser.add_argument("--rtt-ms", type=float, default=5.0, help="RTT the proxy adds")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per generation")
    parser.add_argument("--runs", type=int, default=5, help="rounds: generations per configuration")
    parser.add_argument(
        "--write-fixtures",
        action="store_true",
        help="write the header-only GGUFs of the planner's tests and exit",
    )
    args = parser.parse_args(argv)

    if args.write_fixtures:
        try:
            real: Path | None = parts.model_path()
        except PartMissingError:
            real = None
        for path in write_fixtures(FIXTURES, real):
            print(path)
        return 0

    if not args.no_suite:
        started = time.monotonic()
        print("== planner scenario suite (predicted, same estimate and time model for all)")
        print(format_suite(run_suite()))
        print(f"suite took {time.monotonic() - started:.0f} s", flush=True)
    if args.ram_tier is not None:
        print()
        print("== the suite with system RAM as a tier")
        print(format_ram_tier(run_ram_tier(args.ram_tier), args.ram_tier))
    if args.compare_round_trips is not None:
        print()
        print("== the suite's plans under the refit time model")
        print(format_refit(run_refit(args.compare_round_trips), args.compare_round_trips))
    if args.floor:
        print()
        print("== plans cut short by the search's work budget, and the beam search's floor")
        started = time.monotonic()
        print(format_floor(run_floor()))
        print(f"floor took {time.monotonic() - started:.0f} s", flush=True)
    if not args.no_real:
        print()
        print("== real run on llama.cpp")
        started = time.monotonic()
        try:
            report = measure(
                args.rtt_ms, args.tokens, args.runs, lambda run: print(format_run(run), flush=True)
            )
        except PartMissingError as exc:
            print(f"skipped: {exc}")
            return 0
        print(format_real(report))
        print(f"real run took {time.monotonic() - started:.0f} s")
    return 0
