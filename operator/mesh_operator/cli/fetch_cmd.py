"""`mesh fetch`: download a model into the node cache (the host pod's init container)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from mesh_operator.fetch import FetchError, FetchRequest, fetch_model
from mesh_operator.hub import hub_endpoint

SHA256_LENGTH = 64


def add_parser(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "fetch",
        help="download a model file into the node cache, resumable and verified",
        description="Download a GGUF model to --dest from a URL or Hugging Face, resuming an "
        "interrupted download and checking --sha256 (for Hugging Face, the Hub's sha256 "
        "when none is given). The Hugging Face token is read from $HF_TOKEN, the Hub's "
        "address from $HF_ENDPOINT.",
    )
    parser.add_argument("--dest", type=Path, required=True, help="path of the model file")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", help="http(s):// or file:// URL of the model")
    source.add_argument("--hf-repo", help="Hugging Face repository, e.g. org/name")
    parser.add_argument("--hf-file", help="file in the Hugging Face repository")
    parser.add_argument("--revision", default="main", help="Hugging Face revision (%(default)s)")
    parser.add_argument("--sha256", help="expected sha256 of the file")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.hf_repo and not args.hf_file:
        print("mesh fetch: error: --hf-repo needs --hf-file", file=sys.stderr)
        return 2
    sha = args.sha256.lower() if args.sha256 else None
    if sha is not None and (
        len(sha) != SHA256_LENGTH or any(c not in "0123456789abcdef" for c in sha)
    ):
        print(f"mesh fetch: error: --sha256 {args.sha256!r} is not 64 hex digits", file=sys.stderr)
        return 2
    request = FetchRequest(
        dest=args.dest,
        url=args.url,
        hf_repo=args.hf_repo,
        hf_file=args.hf_file,
        revision=args.revision,
        sha256=sha,
        token=os.environ.get("HF_TOKEN") or None,
        hf_endpoint=hub_endpoint(),
    )
    try:
        path = fetch_model(request)
    except FetchError as exc:
        print(f"mesh fetch: error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0
