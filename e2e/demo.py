"""The README's main command: the whole mission on the embedded default of three
real CPU nodes (and a system node) running the project's own images, from
`helm install mesh` to a chat answer that survives losing a node.

Test infrastructure driving the real product (`e2e.scenario`). Prints each step,
the chat answer, a completion and the figures, and writes them to .mesh/e2e-report.json.
`--keep` leaves the cluster running afterwards.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from e2e import parts
from e2e.cluster import ClusterError
from e2e.nodes import ImageError, NodesError
from e2e.scenario import COMPLETION_PROMPT, Scenario, ScenarioError, write_report
from e2e.waiting import WaitTimeoutError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.demo", description=__doc__)
    parser.add_argument("--keep", action="store_true", help="leave the cluster running")
    parser.add_argument("--workdir", type=Path, help="state folder (default: a temporary one)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mesh-demo-"))
    try:
        figures = Scenario(workdir, keep=args.keep).run()
    except (
        ScenarioError,
        WaitTimeoutError,
        ClusterError,
        NodesError,
        ImageError,
        parts.PartMissingError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = parts.mesh_dir() / "e2e-report.json"
    write_report(figures, report)
    print()
    print(
        f"nodes up / helm install: {figures.nodes_up_seconds:.1f} s / "
        f"{figures.install_to_ready_seconds:.1f} s (image pulls included)"
    )
    # The model is a base model: the completion is the answer it can give; the chat
    # shows the template at work (gemma's turns, no ChatML), not an instruction-tuned reply.
    print(f"completion:             {COMPLETION_PROMPT!r} -> {figures.completion!r}")
    print(f"chat answer:            {figures.answer!r}")
    print(f"planned on:             {', '.join(figures.planned_nodes)}")
    print(
        f"apply -> first token:   {figures.apply_to_first_token_seconds:.1f} s "
        f"(of which image pulls {figures.model_pull_seconds:.1f} s)"
    )
    print(f"node lost:              {figures.lost_node}")
    print(
        f"node loss -> serving:   {figures.node_loss_to_serving_seconds:.1f} s "
        f"(re-planned on {', '.join(figures.replanned_nodes)})"
    )
    print(
        f"client during the loss: {figures.requests_during_loss} requests, "
        f"{figures.errors_during_loss} errors, "
        f"slowest {figures.max_latency_during_loss_seconds:.1f} s"
    )
    print(
        f"tokens/s split / solo:  {figures.split_tokens_per_second:.1f} / "
        f"{figures.solo_tokens_per_second:.1f}"
    )
    print(f"figures written to {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
