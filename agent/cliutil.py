"""What both command-line tools share: the dispatch table, ``--config``, and one-line errors."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.config import Config, load_config
from agent.errors import BoostError

Handler = Callable[[argparse.Namespace, Config], int]


def common_parser(prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="deploy.toml to use (default: $BOOST_CONFIG, then ./deploy.toml)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs and tracebacks")
    return parser


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse, load the configuration, call the subcommand's handler; a BoostError is one line."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return handler(args, load_config(args.config))
    except BoostError as err:
        if args.verbose:
            logging.getLogger(parser.prog).exception("failed")
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
