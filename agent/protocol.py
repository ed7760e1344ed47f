"""MQTT protocol v1 (DESIGN.md): topics, command payloads, tensors, structured errors.

Both ends use this module: the agent parses commands with ``parse_command`` and answers with
``error_reply``; ``boost-build`` builds commands with ``deploy_command`` / ``infer_command``.
Payloads are UTF-8 JSON objects. Bytes travel as base64: the manifest and its signature exactly
as signed, and tensors as ``{"shape": [...], "dtype": "float32", "data": <little-endian C-order
bytes>}``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.errors import BoostError

PREFIX = "boost/v1"
VERBS = ("deploy", "undeploy", "infer", "pin", "unpin", "evict", "rebirth", "ping")
TENSOR_DTYPES = frozenset(
    {"float32", "float64", "float16", "int8", "uint8", "int16", "int32", "int64", "bool"}
)
#: Answers go to topics under this prefix only (a device's ACL lets it write there, and nowhere
#: that another device or the build host reads as a command or a state).
REPLY_PREFIX = f"{PREFIX}/build/replies/"
#: On-demand build requests; build workers share them (each request reaches one worker).
BUILD_REQUESTS = f"{PREFIX}/build/requests"
BUILD_SHARE = f"$share/boost-build/{BUILD_REQUESTS}"
MAX_DIMS = 32
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


class ProtocolError(BoostError):
    """A message that does not follow protocol v1; ``code`` goes into the error reply, with
    ``request_id`` when the message had a valid one."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        self.code = code
        self.message = message
        self.request_id = request_id
        super().__init__(f"{code}: {message}")


def device_topic(device: str, leaf: str) -> str:
    return f"{PREFIX}/dev/{device}/{leaf}"


def group_topic(group: str, leaf: str) -> str:
    return f"{PREFIX}/group/{group}/{leaf}"


def check_name(kind: str, name: str) -> str:
    """Device ids, groups and model names go into topics: no wildcards, no slashes."""
    if not _NAME.match(name):
        raise ProtocolError(
            "bad-request",
            f"{kind} {name!r} must be 1-128 characters of letters, digits, '_', '.', ':' or '-'",
        )
    return name


def command_verb(topic: str) -> str | None:
    """The verb of a command topic (device or group), or None when it is not one."""
    parts = topic.split("/")
    if len(parts) == 6 and parts[:2] == PREFIX.split("/") and parts[4] == "cmd":
        return parts[5]
    return None


def new_request_id() -> str:
    return uuid.uuid4().hex


def now() -> float:
    return round(time.time(), 3)


def dumps(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def error_reply(request_id: str | None, code: str, message: str) -> dict[str, Any]:
    return {"request_id": request_id, "ok": False, "error": {"code": code, "message": message}}


# --- commands ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    verb: str
    request_id: str
    reply_to: str | None
    body: Mapping[str, Any]

    def text(self, key: str) -> str:
        value = self.body.get(key)
        if not isinstance(value, str) or not value:
            raise ProtocolError("bad-request", f"{self.verb}: {key!r} must be a non-empty string")
        return value

    def integer(self, key: str) -> int:
        value = self.body.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ProtocolError("bad-request", f"{self.verb}: {key!r} must be an integer >= 0")
        return value

    def blob(self, key: str) -> bytes:
        try:
            return base64.b64decode(self.text(key), validate=True)
        except (binascii.Error, ValueError) as err:
            raise ProtocolError("bad-request", f"{self.verb}: {key!r} is not base64") from err


def parse_command(verb: str, payload: bytes, known: Sequence[str] = VERBS) -> Command:
    """Decode a command; raises ``ProtocolError`` naming what is wrong."""
    if verb not in known:
        raise ProtocolError("unknown-verb", f"unknown command {verb!r}; known: {', '.join(known)}")
    try:
        body = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ProtocolError("bad-json", f"{verb}: payload is not UTF-8 JSON ({err})") from err
    if not isinstance(body, dict):
        raise ProtocolError("bad-json", f"{verb}: payload must be a JSON object")
    request_id = body.get("request_id")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= 128:
        raise ProtocolError("bad-request", f"{verb}: 'request_id' must be a string of 1-128 chars")
    reply_to = body.get("reply_to")
    if reply_to is not None and not _valid_reply_to(reply_to):
        raise ProtocolError(
            "bad-request",
            f"{verb}: 'reply_to' must be a topic under {REPLY_PREFIX} without wildcards",
            request_id,
        )
    return Command(verb, request_id, reply_to, body)


def _valid_reply_to(value: Any) -> bool:
    return (
        isinstance(value, str)
        and value.startswith(REPLY_PREFIX)
        and len(value) <= 512
        and not any(c in value for c in "+#\0")
    )


def reply_topic(payload: bytes) -> str | None:
    """The valid ``reply_to`` of a message that may be malformed otherwise (None: none)."""
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    reply_to = body.get("reply_to") if isinstance(body, dict) else None
    return reply_to if _valid_reply_to(reply_to) else None


def deploy_command(
    manifest: bytes,
    signature: bytes,
    url: str,
    sha256: str,
    size: int,
    pin: bool = False,
    bitstream_url: str | None = None,
) -> dict[str, Any]:
    """``bitstream_url``: where the bitstream the manifest references is, for a device whose
    FPGA must be programmed."""
    command = {
        "request_id": new_request_id(),
        "deploy_id": new_request_id(),
        "manifest": base64.b64encode(manifest).decode(),
        "signature": base64.b64encode(signature).decode(),
        "url": url,
        "sha256": sha256,
        "size": size,
        "pin": pin,
    }
    if bitstream_url is not None:
        command["bitstream_url"] = bitstream_url
    return command


def build_reply_topic(device: str, request_id: str) -> str:
    """Where the workers answer a device's build request (its ACL lets it read only its own)."""
    return f"{REPLY_PREFIX}{device}/{request_id}"


def build_request(
    device: str, name: str, onnx: bytes, request_id: str | None = None
) -> dict[str, Any]:
    """Ask the build workers for a build of an ONNX model for ``device``; the answer is a deploy
    command to the device that names the request (``build_request``)."""
    request_id = request_id or new_request_id()
    return {
        "request_id": request_id,
        "device": device,
        "name": name,
        "sha256": hashlib.sha256(onnx).hexdigest(),
        "onnx": base64.b64encode(onnx).decode(),
        "reply_to": build_reply_topic(device, request_id),
    }


@dataclass(frozen=True)
class BuildRequest:
    request_id: str
    device: str
    name: str
    sha256: str
    onnx: bytes
    reply_to: str | None


def parse_build_request(payload: bytes) -> BuildRequest:
    """Decode a build request; raises ``ProtocolError`` naming what is wrong (with the request
    id when it had one)."""
    command = parse_command("build", payload, known=("build",))
    try:
        device = check_name("device", command.text("device"))
        name = check_name("model name", command.text("name"))
        sha256, onnx = command.text("sha256"), command.blob("onnx")
        if hashlib.sha256(onnx).hexdigest() != sha256:
            raise ProtocolError("bad-request", "build: 'onnx' does not have the sha256 named")
    except ProtocolError as err:
        raise ProtocolError(err.code, err.message, command.request_id) from err
    return BuildRequest(command.request_id, device, name, sha256, onnx, command.reply_to)


# --- tensors -------------------------------------------------------------------------------------


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return {
        "shape": list(array.shape),
        "dtype": array.dtype.name,
        "data": base64.b64encode(data.tobytes()).decode(),
    }


def decode_tensor(name: str, raw: Any) -> np.ndarray:
    """A tensor from its JSON form; every defect is a ``ProtocolError`` naming the tensor."""
    if not isinstance(raw, dict):
        raise ProtocolError("bad-input", f"input {name!r}: expected {{shape, dtype, data}}")
    shape, dtype, data = raw.get("shape"), raw.get("dtype"), raw.get("data")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise ProtocolError(
            "bad-input",
            f"input {name!r}: shape must be a list of at most {MAX_DIMS} integers >= 0",
        )
    if not isinstance(dtype, str) or dtype not in TENSOR_DTYPES:
        raise ProtocolError(
            "bad-input", f"input {name!r}: dtype {dtype!r} is not one of {sorted(TENSOR_DTYPES)}"
        )
    if not isinstance(data, str):
        raise ProtocolError("bad-input", f"input {name!r}: data must be a base64 string")
    try:
        raw_bytes = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ProtocolError("bad-input", f"input {name!r}: data is not base64") from err
    np_dtype = np.dtype(dtype).newbyteorder("<")
    count = math.prod(shape)  # Python integers: a hostile shape cannot overflow
    if count * np_dtype.itemsize != len(raw_bytes):
        raise ProtocolError(
            "bad-input",
            f"input {name!r}: {dtype}{shape} needs {count * np_dtype.itemsize} bytes, "
            f"got {len(raw_bytes)}",
        )
    # numpy refuses a shape whose nonzero extents multiply past its index type, even when an
    # extent of 0 makes it empty (and its data, 0 bytes, the right size)
    if math.prod(d for d in shape if d) > np.iinfo(np.intp).max:
        raise ProtocolError("bad-input", f"input {name!r}: shape {shape} is too large an array")
    return np.frombuffer(raw_bytes, np_dtype).astype(dtype).reshape(shape)


def infer_command(model: str, inputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {
        "request_id": new_request_id(),
        "model": model,
        "inputs": {name: encode_tensor(value) for name, value in inputs.items()},
    }
