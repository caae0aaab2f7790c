"""`mesh push-model`: push a model file to an OCI registry as a one-layer image.

The image a MeshModel names in `source.oci.reference`: the file at the image's
root (or `--file` inside it), in an uncompressed tar layer, so the same file
always gives the same digests. Prints the reference by digest, to pin a model
to exactly these bytes. Exit 0; 2 with one line naming what is wrong.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mesh_operator.api.imageref import parse_reference
from mesh_operator.oci import INSECURE_ENV, RegistryError, insecure_registries, push_model

EXIT_BAD_INPUT = 2


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "push-model",
        help="push a .gguf file to an OCI registry as a model image",
        description="Push a GGUF file as a one-layer image (an uncompressed tar layer "
        "holding the file) that a MeshModel mounts with source.oci. Plain HTTP is used "
        f"for loopback registries, those in ${INSECURE_ENV} and with --plain-http.",
    )
    p.add_argument("model", type=Path, help="the .gguf file")
    p.add_argument("reference", help="registry/repository:tag to push to")
    p.add_argument(
        "--file",
        help="path of the file inside the image (default: model.gguf, the default of "
        "source.oci.file)",
        default="model.gguf",
    )
    p.add_argument("--plain-http", action="store_true", help="speak plain HTTP to this registry")
    p.add_argument("--username", help="user name for the registry (with --password-stdin)")
    p.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password (or token) for --username from standard input",
    )


def run(args: argparse.Namespace) -> int:
    insecure = set(insecure_registries())
    try:
        if args.plain_http:
            insecure.add(parse_reference(args.reference).registry)
        if not str(args.file).endswith(".gguf"):
            raise ValueError(f"--file {args.file}: a model file inside an image ends in .gguf")
        if bool(args.username) != bool(args.password_stdin):
            raise ValueError("--username and --password-stdin go together")
        credentials = None
        if args.username:
            password = sys.stdin.readline().rstrip("\r\n")
            if not password:
                raise ValueError("--password-stdin: no password on standard input")
            credentials = (args.username, password)
        pushed = push_model(
            args.model, args.reference, file=args.file, insecure=insecure, credentials=credentials
        )
    except (ValueError, RegistryError, OSError) as exc:
        print(f"mesh push-model: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(pushed.pinned)
    print(
        f"pushed {args.model} as {pushed.file}: layer {pushed.layer_digest} "
        f"({pushed.layer_size} bytes), manifest {pushed.manifest_digest}",
        file=sys.stderr,
    )
    return 0
