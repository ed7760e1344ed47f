"""``boost-build``: the build host's command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import signal
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent import cliutil
from agent.artifact import (
    TensorSpec,
    generate_keypair,
    load_public_key,
    open_artifact,
    read_manifest,
)
from agent.config import Config
from agent.errors import BoostError
from agent.retry import until_deadline
from models import bench, targets, zoo
from models.broker import LocalBroker
from models.compiler import CompileRequest, compile_model, golden_inputs
from models.fleet import Fleet, decode_outputs
from models.progress import Progress
from models.store import ArtifactStore, StoreServer
from models.worker import Worker
from vta.bitstreams import CATALOG, catalog_entry, load_catalog
from vta.config import VtaConfig
from vta.drivers.pynq import BOARDS as FPGA_BOARDS


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
    print(
        f"\n--target {targets.VTA_TARGET} --board {targets.VTA_SIM_BOARD}|BOARD: int8 conv2d and "
        f"dense layers on VTA, the rest for the board's CPU ({targets.VTA_SIM_BOARD}: this host, "
        "the simulator standing in for the FPGA)"
    )
    return 0


def _tuning(args: argparse.Namespace, config: Config) -> tuple[int, float]:
    """Trials and minutes of tuning: ``--tune-trials N``, else the bounded default."""
    if args.tune_trials is None:
        return 0, config.build.tune_minutes
    return args.tune_trials, 0.0


def cmd_compile(args: argparse.Namespace, config: Config) -> int:
    trials, minutes = _tuning(args, config)
    request = CompileRequest(
        model=args.model,
        target=args.target or config.build.default_target,
        board=args.board,
        trials=trials,
        tune_minutes=minutes,
        output=args.output,
        name=args.name,
        version=args.model_version,
        inputs=args.inputs,
        calibration=args.calibration,
        fpga=args.fpga,
    )
    result = compile_model(
        request,
        config.build.tuning_db,
        config.build.signing_key,
        config.build.builder_id,
        Progress(),
        ArtifactStore(config.build.store_dir),
    )
    size = result.artifact.stat().st_size
    manifest = result.manifest
    print(
        f"{result.artifact}: {size / 1e6:.2f} MB, {manifest.target.name} "
        f"({manifest.target.tvm_target.get('mcpu', 'generic')}), "
        f"{result.tuning_records} tuning records, {result.seconds:.1f} s"
    )
    if untuned := manifest.tuning["untuned_kernels"]:
        print(f"{untuned} kernels have no tuning record and run TVM's default schedule")
    if manifest.bitstream is not None:
        ref = manifest.bitstream
        print(f"bitstream: {ref.board} {ref.design} ({ref.sha256[:12]}, {ref.size} bytes)")
    elif manifest.target.accelerator and args.board in FPGA_BOARDS:
        print(
            f"bitstream: none in the store for {args.board}: devices must already hold design "
            f"{manifest.target.accelerator.removeprefix('vta:')} ('boost-build bitstream add')"
        )
    return 0


def cmd_bitstream_add(args: argparse.Namespace, config: Config) -> int:
    entries = load_catalog(args.catalog)
    design = args.design or VtaConfig().bitstream_id
    entry = catalog_entry(entries, args.board, design)
    ref = ArtifactStore(config.build.store_dir).add_bitstream(args.file, entry)
    print(f"{ref.board} {ref.design}: {args.file} stored as sha256 {ref.sha256} ({ref.size} bytes)")
    if not entry.sha256:
        print(
            f"note: the catalog has no published digest for it; this file's digest is now pinned. "
            f"Check the file against {entry.source} and record the digest in {args.catalog}."
        )
    return 0


def cmd_bitstream_list(args: argparse.Namespace, config: Config) -> int:
    stored = ArtifactStore(config.build.store_dir).bitstreams()
    print(f"{'board':9} {'design':26} {'in the store':14} source")
    for entry in load_catalog(args.catalog):
        ref = stored.get((entry.board, entry.design))
        have = ref.sha256[:12] if ref else "no"
        print(f"{entry.board:9} {entry.design:26} {have:14} {entry.source}")
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


def store_url(config: Config) -> str:
    serve = config.build.serve
    return serve.public_url.rstrip("/") or f"http://{serve.host}:{serve.port}"


def cmd_publish(args: argparse.Namespace, config: Config) -> int:
    published = ArtifactStore(config.build.store_dir).publish(args.artifact)
    print(
        json.dumps(
            {
                "sha256": published.digest,
                "url": store_url(config) + published.url_path,
                "name": published.manifest.file_name,
            }
        )
    )
    return 0


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    store = ArtifactStore(config.build.store_dir)
    port = config.build.serve.port if args.port is None else args.port
    server = StoreServer(store, config.build.serve.host, port)
    with tempfile.TemporaryDirectory(prefix="boost-broker-") as tmp:
        broker = None
        if not config.build.mqtt.url:
            broker = LocalBroker(config.build.serve.broker_port, Path(tmp)).start()
            print(f"MQTT broker at {broker.url}", flush=True)
        print(f"serving {store.root} at {server.url}", flush=True)

        def stop(signum: int, frame: object) -> None:
            # shutdown() waits for serve_forever() to return: not on the thread that runs it.
            threading.Thread(target=server.shutdown).start()

        for sig in (signal.SIGTERM, signal.SIGINT):  # also when started with SIGINT ignored
            signal.signal(sig, stop)
        try:
            server.serve_forever()
        finally:
            server.server_close()
            if broker is not None:
                broker.stop()
    return 0


def cmd_worker(args: argparse.Namespace, config: Config) -> int:
    worker = Worker(config.build, store_url(config), args.id)
    signal.signal(signal.SIGTERM, lambda signum, frame: worker.stop())
    print(
        f"worker {worker.worker_id}: taking build requests at {config.build.broker_url}, "
        f"artifacts into {config.build.store_dir}",
        flush=True,
    )
    try:
        worker.run()
    except KeyboardInterrupt:
        pass
    finally:
        worker.close()
    return 0


def cmd_devices(args: argparse.Namespace, config: Config) -> int:
    with Fleet(config.build) as fleet:
        devices = fleet.snapshot(args.wait)
    if args.json:
        print(json.dumps({d.id: vars(d) for d in devices.values()}, indent=2, sort_keys=True))
        return 0
    print(f"{'device':20} {'online':7} {'arch':8} {'accelerators':28} models")
    for device in sorted(devices.values(), key=lambda d: d.id):
        cpu = device.caps.get("cpu") or {}
        accelerators = ",".join(a.get("kind", "?") for a in device.caps.get("accelerators") or [])
        models = " ".join(
            f"{name}@{m.get('version')}" for name, m in (device.models.get("models") or {}).items()
        )
        print(
            f"{device.id:20} {'yes' if device.online else 'no':7} {cpu.get('arch', '?'):8} "
            f"{accelerators or '-':28} {models or '-'}"
        )
    if not devices:
        print("(no devices have reported to this broker)")
    return 0


def _check_served(url: str, wait_s: float) -> None:
    """Wait up to ``wait_s`` for the store to serve ``url`` (it may be starting)."""

    def head() -> None:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=5).close()

    try:
        until_deadline(head, wait_s, (urllib.error.URLError, OSError))
    except (urllib.error.URLError, OSError) as err:
        raise BoostError(
            f"the artifact store does not serve {url} ({err}); run 'boost-build serve' "
            "or set [build.serve] public_url to where devices reach the store"
        ) from err


def cmd_deploy(args: argparse.Namespace, config: Config) -> int:
    manifest_bytes, signature = read_manifest(args.artifact)
    store = ArtifactStore(config.build.store_dir)
    published = store.publish(args.artifact)
    url = store_url(config) + published.url_path
    _check_served(url, args.wait)
    bitstream_url = None
    ref = published.manifest.bitstream
    if ref is not None:
        if not store.path_of(ref.sha256).is_file():
            raise BoostError(
                f"the artifact needs the {ref.board} bitstream {ref.sha256[:12]}, which is not in "
                f"the store: 'boost-build bitstream add' it first"
            )
        bitstream_url = f"{store_url(config)}/sha256/{ref.sha256}"
    size = published.path.stat().st_size

    def show(device: str, event: dict[str, Any]) -> None:
        if "bytes" in event:
            print(f"{device}: downloading {event['bytes'] * 100 // max(event['total'], 1)}%")
        else:
            detail = f" ({event['detail']})" if event.get("detail") else ""
            print(f"{device}: {event.get('state')}{detail}", flush=True)

    with Fleet(config.build) as fleet:
        chosen = fleet.select(args.to, args.wait)
        print(f"deploying {published.manifest.file_name} ({size} bytes) to {len(chosen)} device(s)")
        outcomes = fleet.deploy(
            manifest_bytes,
            signature,
            url,
            published.digest,
            size,
            chosen,
            show,
            args.timeout,
            args.pin,
            bitstream_url,
        )
    print(f"\n{'device':20} {'outcome':13} detail")
    for outcome in outcomes:
        print(f"{outcome.device:20} {outcome.state:13} {outcome.detail}")
    failed = [o for o in outcomes if not o.ok]
    return 1 if failed else 0


def _read_inputs(path: Path, specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Inputs named like the model's: a .npz by name, or a .npy for a one-input model."""
    if path.suffix != ".npy":
        return golden_inputs(specs, path, "0")
    if len(specs) != 1:
        raise BoostError(f"{path}: the model has {len(specs)} inputs; give a .npz with each name")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise BoostError(f"{path}: not a readable .npy file ({err})") from err
    spec = specs[0]
    if array.shape[1:] == spec.shape[1:] and len(array) >= spec.shape[0]:
        array = array[: spec.shape[0]]
    if array.shape != spec.shape:
        raise BoostError(f"{path}: shape {array.shape}, the model needs {spec.shape}")
    return {spec.name: array.astype(spec.dtype)}


def cmd_infer(args: argparse.Namespace, config: Config) -> int:
    with Fleet(config.build) as fleet:
        chosen = fleet.select(args.device, args.wait)
        if len(chosen) != 1:
            raise BoostError(
                f"{args.device!r} matches {len(chosen)} devices; infer asks one device: give its id"
            )
        (device,) = chosen
        model = (device.models.get("models") or {}).get(args.model)
        if model is None or "inputs" not in model:
            raise BoostError(f"{device.id} has no active model {args.model!r} loaded")
        specs = [TensorSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in model["inputs"]]
        reply = fleet.infer(device.id, args.model, _read_inputs(args.input, specs), args.timeout)
    if not reply.get("ok"):
        error = reply.get("error") or {}
        raise BoostError(f"{device.id}: {error.get('code')}: {error.get('message')}")
    outputs = decode_outputs(reply)
    print(
        f"{device.id}: {args.model} version {reply['version']} answered in "
        f"{reply['latency_ms']:.2f} ms (on the device)"
    )
    for name, value in outputs.items():
        line = f"  {name}: {value.dtype}{list(value.shape)}"
        if value.size and value.ndim == 2 and value.shape[0] == 1:
            line += f", argmax {int(np.argmax(value[0]))}, max {float(value.max()):.4g}"
        print(line)
    if args.output:
        np.savez(args.output, **dict[str, Any](outputs))
        print(f"outputs written to {args.output}")
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
    model.save_inputs(str(inputs_path))
    print(f"{onnx_path}\n{inputs_path}")
    return 0


def cmd_bench(args: argparse.Namespace, config: Config) -> int:
    with tempfile.TemporaryDirectory(prefix="boost-bench-") as tmp:
        work = Path(tmp)
        key = work / "bench.key"
        public = generate_keypair(key)  # the builds are compared here, never deployed
        builds, records = bench.build_engines(
            args.model,
            args.target,
            work,
            config.build.tuning_db,
            key,
            *_tuning(args, config),
            args.inputs,
            Progress(),
        )
        latencies, layers = [], {}
        for n in args.threads:
            measured, layers[n] = bench.measure(
                builds, args.model, public, n, args.runs, work, args.layers
            )
            latencies += measured
    print(f"{args.model.name}: {records} tuning records applied to the tvm build, {args.runs} runs")
    print(bench.table(latencies))
    if args.layers:
        for n, paired in layers.items():
            print(f"\nwhere the time goes, {n} threads (ms per run)")
            print(bench.kind_table(paired))
            print(f"\nlayer by layer, {n} threads (ms per run)")
            print(bench.layer_table(paired))
    if args.json:
        rows = [dataclasses.asdict(lat) for lat in latencies]
        by_layer = {n: [dataclasses.asdict(x) for x in paired] for n, paired in layers.items()}
        document = {"tuning_records": records, "latency": rows, "layers": by_layer}
        args.json.write_text(json.dumps(document, indent=2))
    return 0


def _positive(text: str) -> int:
    """A whole number of 1 or more (an argparse type)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number of 1 or more")
    return int(text)


def _counts(text: str) -> list[int]:
    """Whole numbers of 1 or more, comma-separated (an argparse type)."""
    return [_positive(part) for part in text.split(",")]


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
        metavar="N",
        help="MetaSchedule trials over every kernel (x86_64); 0 applies stored records only "
        "(default: tune the kernels without records for at most [build] tune_minutes)",
    )
    p.add_argument(
        "-o", "--output", type=Path, help="artifact path (default: NAME-VERSION-TARGET.boost)"
    )
    p.add_argument("--name", help="model name (default: the file's stem)")
    p.add_argument("--model-version", default="1", help="model version (default: 1)")
    p.add_argument(
        "--inputs", type=Path, help=".npz with golden inputs named like the model's inputs"
    )
    p.add_argument(
        "--calibration",
        type=Path,
        help="--target vta: .npz of representative input batches, named like the inputs; "
        "test_inputs/test_labels, when present, measure accuracy (default: --inputs)",
    )
    p.add_argument(
        "--fpga",
        metavar="BOARD",
        help="--target vta: carry the store's bitstream of the design for this FPGA board, so "
        "devices program it when they lack it (default: --board, when it is an FPGA board)",
    )
    p.set_defaults(handler=cmd_compile)

    p = sub.add_parser("bench", help="compare a model's latency on every engine of this machine")
    p.add_argument("model", type=Path)
    p.add_argument(
        "--target",
        default="x86_64",
        choices=["x86_64", "vta"],
        help="vta adds the VTA build on the simulator (needs --inputs for calibration)",
    )
    p.add_argument(
        "--threads",
        type=_counts,
        default=[1, 2],
        help="thread counts, comma-separated (default: 1,2)",
    )
    p.add_argument("--runs", type=_positive, default=50, help="timed runs per engine (default: 50)")
    p.add_argument(
        "--tune-trials",
        type=int,
        metavar="N",
        help="tune the tvm build first, as compile does",
    )
    p.add_argument("--inputs", type=Path, help=".npz of input batches (calibration for vta)")
    p.add_argument(
        "--layers",
        action="store_true",
        help="also where the tvm build and ONNX Runtime spend their time: by kind of layer, and "
        "layer by layer",
    )
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    p.set_defaults(handler=cmd_bench)

    p = sub.add_parser("bitstream", help="FPGA bitstreams: the catalog and the store")
    bsub = p.add_subparsers(metavar="ACTION", required=True)
    for action in ("add", "list"):
        q = bsub.add_parser(
            action,
            help="check a bitstream file against the catalog and put it into the store"
            if action == "add"
            else "list the catalog's bitstreams and which the store holds",
        )
        q.add_argument(
            "--catalog", type=Path, default=CATALOG, help=f"bitstream catalog (default: {CATALOG})"
        )
        if action == "add":
            q.add_argument("file", type=Path)
            q.add_argument("--board", required=True, help="the FPGA board it is for")
            q.add_argument("--design", help=f"VTA design id (default: {VtaConfig().bitstream_id})")
        q.set_defaults(handler=cmd_bitstream_add if action == "add" else cmd_bitstream_list)

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

    p = sub.add_parser(
        "worker", help="build models on demand for devices that ask (shares the store's jobs)"
    )
    p.add_argument("--id", default="", help="name in logs and replies (default: host-pid)")
    p.set_defaults(handler=cmd_worker)

    p = sub.add_parser("devices", help="list devices from their retained state and capabilities")
    p.add_argument("--json", action="store_true", help="print the raw documents")
    p.add_argument("--wait", type=float, default=2.0, metavar="S", help="seconds to listen")
    p.set_defaults(handler=cmd_devices)

    p = sub.add_parser("deploy", help="publish an artifact and deploy it to devices over MQTT")
    p.add_argument("artifact", type=Path)
    p.add_argument(
        "--to",
        required=True,
        metavar="SELECTOR",
        help="DEVICE, group:NAME or caps:KEY=VALUE[,...] "
        "(keys: arch, triple, feature, accelerator, group)",
    )
    p.add_argument("--pin", action="store_true", help="pin the build in the devices' caches")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="seconds to wait for every outcome (default 600)",
    )
    p.add_argument(
        "--wait", type=float, default=2.0, metavar="S", help="seconds to listen for devices"
    )
    p.set_defaults(handler=cmd_deploy)

    p = sub.add_parser("infer", help="run one inference on a device and print a summary")
    p.add_argument("device")
    p.add_argument("model")
    p.add_argument("--input", type=Path, required=True, help=".npy (one input) or .npz by name")
    p.add_argument("-o", "--output", type=Path, help="write the outputs to this .npz")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S")
    p.add_argument(
        "--wait", type=float, default=2.0, metavar="S", help="seconds to listen for devices"
    )
    p.set_defaults(handler=cmd_infer)

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
