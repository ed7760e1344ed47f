"""``boost-agent``: the device daemon's command line."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from agent import cliutil
from agent.artifact import load_public_key, open_artifact
from agent.cache import DiskCache, LfuAging
from agent.capabilities import default_device_id, probe, probe_accelerators
from agent.config import Config
from agent.runtime import TvmRuntime, golden_check
from agent.state import DeviceState


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


def cmd_start(args: argparse.Namespace, config: Config) -> int:
    """Run the daemon in the foreground until SIGTERM or SIGINT."""
    from agent.daemon import Agent

    return Agent(config.agent).run()


def cmd_probe(args: argparse.Namespace, config: Config) -> int:
    agent = config.agent
    caps = probe(
        agent.device_id or default_device_id(),
        agent.groups,
        agent.backends,
        agent.state_dir,
        probe_accelerators(agent),
    )
    print(json.dumps(caps, indent=2))
    return 0


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    """Active models and cache contents, read from the state directory (the daemon need not run)."""
    agent = config.agent
    try:
        state = DeviceState.load(agent.state_dir / "state.json", repair=False)
    except ValueError as err:
        print(f"state: {err}; the agent sets it aside at its next start")
        state = DeviceState(agent.state_dir / "state.json")
    cache = DiskCache(
        agent.state_dir / "cache", agent.cache.max_bytes, LfuAging(agent.cache.half_life_s)
    )
    print(f"state directory {agent.state_dir} (bdseq {state.bdseq})")
    print(f"{'model':20} {'version':10} {'active':14} last-good")
    for name, slot in sorted(state.models.items()):
        print(f"{name:20} {slot.version:10} {slot.active[:12]:14} {(slot.last_good or '-')[:12]}")
    if not state.models:
        print("(no active models)")
    try:
        entries = cache.read_index()
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"cache index unreadable ({err}); the agent rebuilds it at its next start")
        return 0
    used = sum(e.size for e in entries.values())
    print(f"\ncache: {len(entries)} entries, {used} of {cache.budget} bytes")
    for e in sorted(entries.values(), key=lambda e: (e.model, e.version)):
        flags = ["pinned"] if e.digest in state.pins else []
        flags += ["protected"] if e.digest in state.protected() else []
        print(
            f"{e.digest[:12]} {e.model:20} {e.version:10} {e.size:>12} "
            f"uses {e.usage.count:.2f} {' '.join(flags)}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = cliutil.common_parser("boost-agent", "MLInferBooster device agent")
    sub = parser.add_subparsers(metavar="COMMAND")
    check = sub.add_parser("check", help="verify, load and smoke-test an artifact on this device")
    check.add_argument("artifact", type=Path)
    check.set_defaults(handler=cmd_check)
    sub.add_parser("start", help="run the device daemon in the foreground").set_defaults(
        handler=cmd_start
    )
    sub.add_parser("probe", help="print this device's capability document").set_defaults(
        handler=cmd_probe
    )
    sub.add_parser("status", help="active models and cache state").set_defaults(handler=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return cliutil.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
