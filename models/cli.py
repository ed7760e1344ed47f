"""``boost-build``: the build host's command line."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent import cliutil
from agent.artifact import generate_keypair, load_public_key, open_artifact, read_manifest
from agent.config import Config
from models import targets, zoo
from models.compiler import CompileRequest, compile_model
from models.progress import Progress
from models.store import ArtifactStore, StoreServer


def cmd_targets(args: argparse.Namespace, config: Config) -> int:
    print(f"{'target':8} {'triple':24} {'mcpu':12} {'compiler':26} installed  description")
    for spec in targets.TARGETS.values():
        mcpu = "(host)" if spec.name == "x86_64" else spec.mcpu
        present = (
            "yes" if shutil.which(spec.compiler) else f"no: apt-get install {spec.apt_package}"
        )
        print(
            f"{spec.name:8} {spec.triple:24} {mcpu:12} {spec.compiler:26} {present:10} "
            f"{spec.description}"
        )
    print(f"\n{'board':9} {'target':8} {'mcpu':12} description")
    for board in targets.BOARDS.values():
        print(f"{board.name:9} {board.target:8} {board.mcpu:12} {board.description}")
    return 0


def cmd_compile(args: argparse.Namespace, config: Config) -> int:
    request = CompileRequest(
        model=args.model,
        target=args.target or config.build.default_target,
        board=args.board,
        trials=args.tune_trials,
        output=args.output,
        name=args.name,
        version=args.model_version,
        inputs=args.inputs,
    )
    result = compile_model(
        request,
        config.build.tuning_db,
        config.build.signing_key,
        config.build.builder_id,
        Progress(),
    )
    size = result.artifact.stat().st_size
    print(
        f"{result.artifact}: {size / 1e6:.2f} MB, {result.manifest.target.name} "
        f"({result.manifest.target.tvm_target.get('mcpu', 'generic')}), "
        f"{result.tuning_records} tuning records, {result.seconds:.1f} s"
    )
    return 0


def cmd_inspect(args: argparse.Namespace, config: Config) -> int:
    manifest, _ = read_manifest(args.artifact)
    sys.stdout.write(manifest.decode())
    print("# signature not checked here; use 'boost-build verify'", file=sys.stderr)
    return 0


def cmd_verify(args: argparse.Namespace, config: Config) -> int:
    key_path = args.key or config.build.signing_key.with_suffix(".pub")
    with tempfile.TemporaryDirectory(prefix="boost-verify-") as tmp:
        verified = open_artifact(args.artifact, [load_public_key(key_path)], Path(tmp))
    print(
        f"{args.artifact}: signature ok (key {verified.key_id}); "
        f"{len(verified.manifest.files)} files match their sha256"
    )
    return 0


def cmd_keygen(args: argparse.Namespace, config: Config) -> int:
    private = args.out or config.build.signing_key
    public = generate_keypair(private)
    print(f"private key: {private}")
    print(f"public key:  {public} (copy it to devices and list it in [agent] trusted_keys)")
    return 0


def cmd_publish(args: argparse.Namespace, config: Config) -> int:
    published = ArtifactStore(config.build.store_dir).publish(args.artifact)
    base = (
        config.build.serve.public_url
        or f"http://{config.build.serve.host}:{config.build.serve.port}"
    )
    print(
        json.dumps(
            {
                "sha256": published.digest,
                "url": base + published.url_path,
                "name": published.manifest.file_name,
            }
        )
    )
    return 0


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    store = ArtifactStore(config.build.store_dir)
    port = config.build.serve.port if args.port is None else args.port
    server = StoreServer(store, config.build.serve.host, port)
    print(f"serving {store.root} at {server.url}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def cmd_zoo_list(args: argparse.Namespace, config: Config) -> int:
    for name, factory in zoo.ZOO.items():
        print(f"{name:12} {(factory.__doc__ or '').strip().splitlines()[0]}")
    return 0


def cmd_zoo_export(args: argparse.Namespace, config: Config) -> int:
    model = zoo.get(args.name)
    args.dir.mkdir(parents=True, exist_ok=True)
    onnx_path, inputs_path = args.dir / f"{model.name}.onnx", args.dir / f"{model.name}.npz"
    model.save(str(onnx_path))
    arrays: dict[str, Any] = dict(model.sample_inputs)
    if model.test_set is not None:
        arrays["test_inputs"], arrays["test_labels"] = model.test_set
    np.savez(inputs_path, **arrays)
    print(f"{onnx_path}\n{inputs_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = cliutil.common_parser("boost-build", "MLInferBooster build host")
    sub = parser.add_subparsers(metavar="COMMAND")

    p = sub.add_parser("targets", help="list build targets and boards")
    p.set_defaults(handler=cmd_targets)

    p = sub.add_parser("compile", help="compile an ONNX model into a signed .boost artifact")
    p.add_argument("model", type=Path)
    p.add_argument("--target", help="target name (default: [build] default_target)")
    p.add_argument("--board", help="board name: specialises the target's CPU")
    p.add_argument(
        "--tune-trials",
        type=int,
        default=0,
        metavar="N",
        help="MetaSchedule trials (x86_64); 0 applies stored records only",
    )
    p.add_argument(
        "-o", "--output", type=Path, help="artifact path (default: NAME-VERSION-TARGET.boost)"
    )
    p.add_argument("--name", help="model name (default: the file's stem)")
    p.add_argument("--model-version", default="1", help="model version (default: 1)")
    p.add_argument(
        "--inputs", type=Path, help=".npz with golden inputs named like the model's inputs"
    )
    p.set_defaults(handler=cmd_compile)

    p = sub.add_parser("inspect", help="print an artifact's manifest")
    p.add_argument("artifact", type=Path)
    p.set_defaults(handler=cmd_inspect)

    p = sub.add_parser("verify", help="check an artifact's signature and file digests")
    p.add_argument("artifact", type=Path)
    p.add_argument("--key", type=Path, help="public key (default: [build] signing_key + .pub)")
    p.set_defaults(handler=cmd_verify)

    p = sub.add_parser("keygen", help="create the build host's Ed25519 signing key pair")
    p.add_argument("--out", type=Path, help="private key path (default: [build] signing_key)")
    p.set_defaults(handler=cmd_keygen)

    p = sub.add_parser("publish", help="put an artifact into the content-addressed store")
    p.add_argument("artifact", type=Path)
    p.set_defaults(handler=cmd_publish)

    p = sub.add_parser("serve", help="serve the artifact store over HTTP")
    p.add_argument("--port", type=int, help="port (default: [build.serve] port)")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("zoo", help="the model zoo")
    zsub = p.add_subparsers(metavar="ACTION")
    zl = zsub.add_parser("list", help="list zoo models")
    zl.set_defaults(handler=cmd_zoo_list)
    ze = zsub.add_parser("export", help="write NAME.onnx and NAME.npz (sample inputs)")
    ze.add_argument("name", choices=list(zoo.ZOO))
    ze.add_argument("-o", "--dir", type=Path, default=Path("."), help="output directory")
    ze.set_defaults(handler=cmd_zoo_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return cliutil.run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
