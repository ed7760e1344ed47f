from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import Config, env_variables, load_config
from agent.errors import ConfigError
from tests.conftest import REPO, run_cli


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "deploy.toml"
    path.write_text(text)
    return path


def test_shipped_deploy_toml_equals_the_defaults() -> None:
    shipped = load_config(REPO / "deploy.toml", env={})
    defaults = load_config(None, env={})
    # The same values, resolved against different base directories.
    assert shipped.agent.cache == defaults.agent.cache
    assert shipped.agent.mqtt.url == defaults.agent.mqtt.url
    assert shipped.build.serve == defaults.build.serve
    assert shipped.agent.state_dir == REPO / ".boost/agent"
    assert shipped.build.signing_key == REPO / ".boost/keys/build.key"
    assert shipped.agent.trusted_keys == (REPO / ".boost/keys/build.pub",)


def test_every_key_in_the_schema_is_documented_in_deploy_toml() -> None:
    text = (REPO / "deploy.toml").read_text()
    for section, key, _ in env_variables().values():
        assert f"[{section}]" in text, section
        assert f"\n{key} = " in text, f"[{section}] {key} is not documented in deploy.toml"


def test_values_and_relative_paths(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[agent]\ngroups = ["lab"]\nstate_dir = "state"\n[agent.cache]\nmax_bytes = 1000\n',
    )
    config = load_config(path, env={})
    assert config.agent.groups == ("lab",)
    assert config.agent.state_dir == tmp_path / "state"
    assert config.agent.cache.max_bytes == 1000
    assert config.agent.cache.ram_max_bytes == Config().agent.cache.ram_max_bytes


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '[agent.cache]\nmax_bytes = "1GB"\n',
            'deploy.toml: [agent.cache] max_bytes: expected an integer, got "1GB"',
        ),
        (
            "[agent.cache]\nmax_bytes = true\n",
            "deploy.toml: [agent.cache] max_bytes: expected an integer, got true",
        ),
        (
            "[agent.cache]\nmax_bytes = 0\n",
            "deploy.toml: [agent.cache] max_bytes: expected an integer at least 1, got 0",
        ),
        (
            "[build.serve]\nport = 70000\n",
            "deploy.toml: [build.serve] port: expected an integer between 0 and 65535, got 70000",
        ),
        (
            '[agent]\ngroups = "lab"\n',
            'deploy.toml: [agent] groups: expected a list of strings, got "lab"',
        ),
        ("[agent]\ngroups = [1]\n", "deploy.toml: [agent] groups: expected a string, got 1"),
        (
            "[agent.cache]\nmax_byte = 5\n",
            'deploy.toml: [agent.cache] max_byte: unknown key; did you mean "max_bytes"?',
        ),
        (
            "[agent]\nzzz = 5\n",
            "deploy.toml: [agent] zzz: unknown key; known keys: allowed_hosts, "
            "backends, cache, device_id, fpga_root, groups, local_api, max_command_bytes, "
            "metrics_interval_s, mqtt, prefer, serial_baud, serial_ports, state_dir, "
            "step_timeout_s, trusted_keys",
        ),
        ("[agnet]\n", 'deploy.toml: [agnet]: unknown section; did you mean "agent"?'),
        (
            '[agent.mqtt]\nprotocol = "3"\n',
            'deploy.toml: [agent.mqtt] protocol: expected "5" or "3.1.1", got "3"',
        ),
        (
            '[agent]\ncache = "big"\n',
            'deploy.toml: [agent] cache: expected a table [agent.cache], got "big"',
        ),
        ("[agent\n", "deploy.toml: invalid TOML: "),
    ],
)
def test_bad_values_name_the_key_and_the_expected_type(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(Path("deploy.toml"), env={})
    assert str(info.value).startswith(message)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"nope.toml: file not found; pass an existing file to --config"
    ):
        load_config(tmp_path / "nope.toml", env={})


def test_environment_overrides_every_kind_of_value(tmp_path: Path) -> None:
    path = write(tmp_path, "[agent.cache]\nmax_bytes = 5\n")
    env = {
        "BOOST_AGENT_CACHE_MAX_BYTES": "77",
        "BOOST_AGENT_GROUPS": "a, b",
        "BOOST_BUILD_SERVE_PORT": "9000",
        "BOOST_AGENT_MQTT_TLS_CA": "/etc/ca.pem",
        "BOOST_BUILD_STORE_DIR": "elsewhere",
    }
    config = load_config(path, env=env)
    assert config.agent.cache.max_bytes == 77
    assert config.agent.groups == ("a", "b")
    assert config.build.serve.port == 9000
    assert config.agent.mqtt.tls_ca == Path("/etc/ca.pem")
    assert config.build.store_dir == tmp_path / "elsewhere"


def test_bad_environment_values_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"BOOST_AGENT_CACHE_MAX_BYTES": "1GB"})
    assert str(info.value) == (
        "environment variable BOOST_AGENT_CACHE_MAX_BYTES: [agent.cache] max_bytes: "
        'expected an integer, got "1GB"'
    )
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"BOOST_AGENT_CACHE_MAX_BYTE": "1"})
    assert str(info.value) == (
        "environment variable BOOST_AGENT_CACHE_MAX_BYTE: no such setting; "
        'did you mean "BOOST_AGENT_CACHE_MAX_BYTES"?'
    )


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, '[build]\ndefault_target = "armv7"\n')
    assert load_config(None, env={"BOOST_CONFIG": str(path)}).build.default_target == "armv7"


def test_cli_reports_config_errors_in_one_line(tmp_path: Path) -> None:
    write(tmp_path, '[agent.cache]\nmax_bytes = "1GB"\n')
    result = run_cli("models.cli", "--config", "deploy.toml", "targets", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        'boost-build: error: deploy.toml: [agent.cache] max_bytes: expected an integer, got "1GB"'
    )


def test_build_broker_defaults_to_the_local_one_serve_starts(tmp_path: Path) -> None:
    defaults = load_config(None, env={})
    assert defaults.build.mqtt.url == "" and defaults.agent.mqtt.url == "mqtt://127.0.0.1:1883"
    assert defaults.build.broker_url == "mqtt://127.0.0.1:1883"
    path = write(tmp_path, "[build.serve]\nbroker_port = 1999\n")
    assert load_config(path, env={}).build.broker_url == "mqtt://127.0.0.1:1999"
    path = write(tmp_path, '[build.mqtt]\nurl = "mqtts://broker.lab:8883"\nprotocol = "3.1.1"\n')
    config = load_config(path, env={})
    assert config.build.broker_url == "mqtts://broker.lab:8883"
    assert config.build.mqtt.protocol == "3.1.1" and config.agent.mqtt.protocol == "5"
