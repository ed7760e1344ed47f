"""``boost-agent``: the device daemon's command line."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from agent import cliutil
from agent.artifact import load_public_key, open_artifact
from agent.config import Config
from agent.runtime import TvmRuntime, golden_check


def cmd_check(args: argparse.Namespace, config: Config) -> int:
    """Verify an artifact with the trusted keys, load it with the runtime, run its golden test."""
    trusted = [load_public_key(path) for path in config.agent.trusted_keys]
    with tempfile.TemporaryDirectory(prefix="boost-check-") as tmp:
        verified = open_artifact(args.artifact, trusted, Path(tmp))
        manifest = verified.manifest
        print(
            f"{args.artifact}: signature ok (key {verified.key_id}), {len(manifest.files)} files ok"
        )
        model = TvmRuntime().load(
            verified.path(manifest.library), manifest.inputs, manifest.outputs
        )
        report = golden_check(
            model, verified.path(manifest.golden.file), manifest.golden.rtol, manifest.golden.atol
        )
    print(report.describe())
    return 0 if report.passed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = cliutil.common_parser("boost-agent", "MLInferBooster device agent")
    sub = parser.add_subparsers(metavar="COMMAND")
    check = sub.add_parser("check", help="verify, load and smoke-test an artifact on this device")
    check.add_argument("artifact", type=Path)
    check.set_defaults(handler=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return cliutil.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
