"""The `mesh` command line: argument parsing and dispatch, nothing else.

Each subcommand lives in its own module here with two functions:
`add_parser(subparsers)` declares its arguments and `run(args) -> int` calls the
domain modules. Domain modules never parse arguments.
"""
