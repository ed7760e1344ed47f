"""The one configuration of a deployment: ``deploy.toml``.

The schema is the frozen dataclasses below; ``deploy.toml`` at the repository root documents every
key. Values come from, in rising priority: the defaults here, the TOML file, and environment
variables named ``BOOST_<SECTION>_<KEY>`` (``BOOST_AGENT_CACHE_MAX_BYTES`` for ``[agent.cache]
max_bytes``). Relative paths are resolved against the directory of the config file (the working
directory when no file is used).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.engines import PREFER
from agent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 devices only
    import tomli as tomllib

ENV_PREFIX = "BOOST_"
CONFIG_ENV = "BOOST_CONFIG"
DEFAULT_FILE = "deploy.toml"


def _bounded(minimum: int | float | None = None, maximum: int | float | None = None) -> Any:
    return {"min": minimum, "max": maximum}


def _choices(*allowed: str) -> Any:
    return {"choices": allowed}


@dataclass(frozen=True)
class MqttConfig:
    url: str = "mqtt://127.0.0.1:1883"
    username: str = ""
    password_file: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    keepalive_s: int = field(default=30, metadata=_bounded(5, 3600))
    protocol: str = field(default="5", metadata=_choices("5", "3.1.1"))


@dataclass(frozen=True)
class CacheConfig:
    max_bytes: int = field(default=2 * 1024**3, metadata=_bounded(1))
    ram_max_bytes: int = field(default=512 * 1024**2, metadata=_bounded(1))
    half_life_s: float = field(default=86400.0, metadata=_bounded(1))


@dataclass(frozen=True)
class AgentConfig:
    device_id: str = ""
    groups: tuple[str, ...] = ()
    state_dir: Path = Path(".boost/agent")
    trusted_keys: tuple[Path, ...] = (Path(".boost/keys/build.pub"),)
    allowed_hosts: tuple[str, ...] = ("http://127.0.0.1:8750",)
    backends: tuple[str, ...] = ("vta-fpga", "vta-serial", "vta-sim", "cpu")
    serial_ports: tuple[str, ...] = ()
    serial_baud: int = field(default=921600, metadata=_bounded(1200, 16_000_000))
    fpga_root: Path = Path("/")
    metrics_interval_s: float = field(default=60.0, metadata=_bounded(1))
    max_command_bytes: int = field(default=64 * 1024**2, metadata=_bounded(1024))
    step_timeout_s: float = field(default=300.0, metadata=_bounded(1))
    local_api: bool = False
    prefer: str = field(default="fastest", metadata=_choices(*PREFER))
    mqtt: MqttConfig = MqttConfig()
    cache: CacheConfig = CacheConfig()


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = field(default=8750, metadata=_bounded(0, 65535))
    public_url: str = ""
    broker_port: int = field(default=1883, metadata=_bounded(0, 65535))


@dataclass(frozen=True)
class BuildConfig:
    store_dir: Path = Path(".boost/store")
    signing_key: Path = Path(".boost/keys/build.key")
    builder_id: str = ""
    default_target: str = "x86_64"
    tuning_db: Path = Path(".boost/tuning")
    tune_minutes: float = field(default=10.0, metadata=_bounded(0))
    serve: ServeConfig = ServeConfig()
    # "" = the local broker that `boost-build serve` starts on [build.serve] broker_port.
    mqtt: MqttConfig = MqttConfig(url="")

    @property
    def broker_url(self) -> str:
        return self.mqtt.url or f"mqtt://127.0.0.1:{self.serve.broker_port}"


@dataclass(frozen=True)
class Config:
    agent: AgentConfig = AgentConfig()
    build: BuildConfig = BuildConfig()


_TYPE_NAMES: dict[Any, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean (true or false)",
    Path: "a path (string)",
}


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        (item, _) = typing.get_args(tp)
        return f"a list of {_TYPE_NAMES[item].split(' ', 1)[1]}s"
    if _optional_of(tp) is not None:
        return _describe(_optional_of(tp))
    return _TYPE_NAMES[tp]


def _optional_of(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return None


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return "a table" if isinstance(value, dict) else "a list"
    return repr(value)


class _Loader:
    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir

    def fail(self, section: str, key: str, message: str) -> typing.NoReturn:
        where = f"[{section}] {key}" if key else f"[{section}]"
        raise ConfigError(self.source, where, message)

    def convert(self, section: str, key: str, tp: Any, value: Any, meta: Mapping[str, Any]) -> Any:
        inner = _optional_of(tp)
        if inner is not None:
            if value == "":
                return None
            return self.convert(section, key, inner, value, meta)
        if typing.get_origin(tp) is tuple:
            (item, _) = typing.get_args(tp)
            if not isinstance(value, list):
                self.fail(section, key, f"expected {_describe(tp)}, got {_show(value)}")
            return tuple(self.convert(section, key, item, v, meta) for v in value)
        ok = {
            str: isinstance(value, str),
            Path: isinstance(value, str) and value != "",
            bool: isinstance(value, bool),
            int: isinstance(value, int) and not isinstance(value, bool),
            float: isinstance(value, (int, float)) and not isinstance(value, bool),
        }[tp]
        if not ok:
            self.fail(section, key, f"expected {_describe(tp)}, got {_show(value)}")
        if tp is Path:
            path = Path(value).expanduser()
            return path if path.is_absolute() else self.base_dir / path
        if tp is float:
            value = float(value)
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            allowed = " or ".join(f'"{c}"' for c in choices)
            self.fail(section, key, f"expected {allowed}, got {_show(value)}")
        low, high = meta.get("min"), meta.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            self.fail(section, key, f"expected {_describe(tp)} {bounds}, got {_show(value)}")
        return value

    def build(self, cls: Any, section: str, table: Mapping[str, Any], defaults: Any = None) -> Any:
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        defaults = cls() if defaults is None else defaults
        for key in table:
            if key not in fields:
                self.fail(section, key, "unknown key; " + _suggest(key, list(fields)))
        values: dict[str, Any] = {}
        for name, f in fields.items():
            if name not in table:
                continue
            tp, raw = hints[name], table[name]
            if dataclasses.is_dataclass(tp):
                if not isinstance(raw, dict):
                    self.fail(
                        section, name, f"expected a table [{section}.{name}], got {_show(raw)}"
                    )
                values[name] = self.build(tp, f"{section}.{name}", raw, getattr(defaults, name))
            else:
                values[name] = self.convert(section, name, tp, raw, f.metadata)
        for name in fields:
            if name in values or dataclasses.is_dataclass(hints[name]):
                continue
            values[name] = self._resolve_default(hints[name], getattr(defaults, name))
        for name in fields:
            if name not in values:
                values[name] = self.build(
                    hints[name], f"{section}.{name}", {}, getattr(defaults, name)
                )
        return cls(**values)

    def _resolve_default(self, tp: Any, value: Any) -> Any:
        if isinstance(value, Path):
            return value if value.is_absolute() else self.base_dir / value
        if isinstance(value, tuple) and typing.get_args(tp)[:1] == (Path,):
            return tuple(self._resolve_default(Path, v) for v in value)
        return value


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f'did you mean "{close[0]}"?'
    return "known keys: " + ", ".join(sorted(known))


def _env_keys(cls: Any, prefix: str, section: str) -> dict[str, tuple[str, str, Any]]:
    """Map every environment variable name to (section, key, type) for one table."""
    out: dict[str, tuple[str, str, Any]] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{prefix}_{f.name.upper()}"
        if dataclasses.is_dataclass(tp):
            out.update(_env_keys(tp, name, f"{section}.{f.name}"))
        else:
            out[name] = (section, f.name, tp)
    return out


def env_variables() -> dict[str, tuple[str, str, Any]]:
    """Every ``BOOST_*`` variable that overrides a key, mapped to (section, key, type)."""
    out: dict[str, tuple[str, str, Any]] = {}
    out.update(_env_keys(AgentConfig, "BOOST_AGENT", "agent"))
    out.update(_env_keys(BuildConfig, "BOOST_BUILD", "build"))
    return out


def _parse_env(raw: str, tp: Any) -> Any:
    """Turn an environment string into the TOML value it stands for (validated later)."""
    inner = _optional_of(tp) or tp
    if typing.get_origin(inner) is tuple:
        return [part.strip() for part in raw.split(",") if part.strip()]
    if inner is bool:
        lowered = raw.strip().lower()
        return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(
            lowered, raw
        )
    if inner in (int, float):
        try:
            return int(raw) if inner is int else float(raw)
        except ValueError:
            return raw
    return raw


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Overlay environment overrides on the parsed TOML; returns {key path: variable name}."""
    known = env_variables()
    for name in env:
        if not name.startswith(("BOOST_AGENT_", "BOOST_BUILD_")) or name in known:
            continue
        raise ConfigError(
            f"environment variable {name}", "", "no such setting; " + _suggest(name, list(known))
        )
    overridden: dict[str, str] = {}
    for name, (section, key, tp) in known.items():
        if name not in env:
            continue
        table = data
        for part in section.split("."):
            table = table.setdefault(part, {})
            if not isinstance(table, dict):
                raise ConfigError(f"environment variable {name}", f"[{section}]", "not a table")
        table[key] = _parse_env(env[name], tp)
        overridden[f"[{section}] {key}"] = name
    return overridden


def load_config(path: Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Load ``deploy.toml`` (explicit path, ``$BOOST_CONFIG``, ``./deploy.toml``, or defaults)."""
    env = os.environ if env is None else env
    if path is None and env.get(CONFIG_ENV):
        path = Path(env[CONFIG_ENV])
    if path is None and Path(DEFAULT_FILE).is_file():
        path = Path(DEFAULT_FILE)
    data: dict[str, Any] = {}
    base_dir = Path.cwd()
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise ConfigError(
                source, "", "file not found; pass an existing file to --config"
            ) from err
        except OSError as err:
            raise ConfigError(source, "", f"cannot read: {err.strerror}") from err
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(source, "", f"invalid TOML: {err}") from err
        base_dir = path.resolve().parent
    for section in data:
        if section not in ("agent", "build"):
            message = "unknown section; " + _suggest(section, ["agent", "build"])
            raise ConfigError(source, f"[{section}]", message)
    overridden = _apply_env(data, env)
    loader = _Loader(source, base_dir)
    try:
        agent = loader.build(AgentConfig, "agent", _table(loader, data, "agent"))
        build = loader.build(BuildConfig, "build", _table(loader, data, "build"))
    except ConfigError as err:
        if err.key_path not in overridden:
            raise
        raise ConfigError(
            f"environment variable {overridden[err.key_path]}", err.key_path, err.message
        ) from err
    return Config(agent=agent, build=build)


def _table(loader: _Loader, data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        loader.fail(name, "", f"expected a table, got {_show(table)}")
    return table
