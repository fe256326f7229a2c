"""Hub and node config files: defaults, every key, and errors that name the key and file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from issc.config import (
    Address,
    ClientTls,
    DiscoverConfig,
    RelayConfig,
    ServerTls,
    load_hub_config,
    load_node_config,
)
from issc.errors import ConfigError
from issc.keys import generate_key

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(tmp_path: Path, text: str, name: str = "conf.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pubkey(tmp_path_factory: pytest.TempPathFactory) -> str:
    return generate_key(tmp_path_factory.mktemp("keys") / "owner.key")


def node_yaml(pubkey: str, extra: str = "") -> str:
    return f'volunteer: alice\nprojects: [primes]\ntrusted_keys: {{primes: "{pubkey}"}}\n' + extra


def config_error(load: Callable[[Path], object], path: Path) -> str:
    """The message of the ConfigError that loading ``path`` raises; it always names the file."""
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert str(path) in message
    return message


# ---- hub: defaults and keys ---------------------------------------------------------


def test_hub_defaults_without_a_file_resolve_against_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_hub_config(None)
    assert config.listen == Address("127.0.0.1", 7411)
    assert config.data_dir == tmp_path / "issc-data"
    assert config.database is None
    assert config.database_url == f"sqlite:///{tmp_path / 'issc-data' / 'hub.db'}"
    assert config.heartbeat_interval == 5
    assert config.heartbeat_misses == 3
    assert config.lease_window == 15
    assert config.offer_timeout == 60
    assert config.max_attempts == 5
    assert config.registration == "open"
    assert config.control_socket is None
    assert config.control_socket_path == tmp_path / "issc-data" / "control.sock"
    assert config.tls is None


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_empty_hub_file_gives_defaults_with_data_dir_beside_the_file(
    tmp_path: Path, text: str
) -> None:
    config = load_hub_config(write(tmp_path, text))
    assert config.listen == Address("127.0.0.1", 7411)
    assert config.data_dir == tmp_path / "issc-data"
    assert config.control_socket_path == tmp_path / "issc-data" / "control.sock"


def test_hub_every_key_is_parsed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
listen: 0.0.0.0:0
data_dir: /srv/issc
database: postgresql+psycopg://issc@db/issc
heartbeat_interval: 2.5
heartbeat_misses: 4
offer_timeout: 30
max_attempts: 7
registration: closed
control_socket: /run/issc/ctl.sock
tls: {cert: /etc/issc/hub.crt, key: /etc/issc/hub.key, self_signed: true}
""",
    )
    config = load_hub_config(path)
    assert config.listen == Address("0.0.0.0", 0)
    assert config.data_dir == Path("/srv/issc")
    assert config.database == config.database_url == "postgresql+psycopg://issc@db/issc"
    assert config.heartbeat_interval == 2.5
    assert config.heartbeat_misses == 4
    assert config.lease_window == 10
    assert config.offer_timeout == 30.0
    assert isinstance(config.offer_timeout, float)
    assert config.max_attempts == 7
    assert config.registration == "closed"
    assert config.control_socket_path == Path("/run/issc/ctl.sock")
    assert config.tls == ServerTls(Path("/etc/issc/hub.crt"), Path("/etc/issc/hub.key"), True)


def test_hub_null_values_mean_the_default(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: null\nheartbeat_interval: null\ntls: null\ndatabase: null\n")
    config = load_hub_config(path)
    assert config.listen == Address("127.0.0.1", 7411)
    assert config.heartbeat_interval == 5
    assert config.tls is None


def test_hub_ipv6_listen_address(tmp_path: Path) -> None:
    config = load_hub_config(write(tmp_path, 'listen: "[::1]:7411"\n'))
    assert config.listen == Address("::1", 7411)
    assert str(config.listen) == "[::1]:7411"


def test_hub_relative_paths_resolve_against_the_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    conf_dir = conf_dir.resolve()  # the loader resolves symlinks in the file's directory
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write(
        conf_dir,
        "data_dir: data\ncontrol_socket: ../run/ctl.sock\ntls: {cert: hub.crt, key: tls/hub.key}\n",
    )
    monkeypatch.chdir(elsewhere)
    config = load_hub_config(Path("..") / "etc" / "conf.yaml")  # a relative path to the file
    assert config.data_dir == conf_dir / "data"
    assert config.control_socket_path == conf_dir / "../run/ctl.sock"
    assert config.tls == ServerTls(conf_dir / "hub.crt", conf_dir / "tls" / "hub.key")
    assert config.data_dir.is_absolute()


# ---- hub: errors ----------------------------------------------------------------------


def test_hub_unknown_key_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: 127.0.0.1:1\nheartbeat_intervall: 5\n")
    message = config_error(load_hub_config, path)
    assert "heartbeat_intervall" in message
    assert "unknown key" in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('heartbeat_interval: "fast"\n', "heartbeat_interval"),
        ("heartbeat_interval: 0\n", "heartbeat_interval"),
        ("heartbeat_interval: -1\n", "heartbeat_interval"),
        ("heartbeat_interval: .inf\n", "heartbeat_interval"),
        ("heartbeat_interval: true\n", "heartbeat_interval"),
        ("heartbeat_misses: 1.5\n", "heartbeat_misses"),
        ("heartbeat_misses: 0\n", "heartbeat_misses"),
        ("offer_timeout: [60]\n", "offer_timeout"),
        ("max_attempts: 0\n", "max_attempts"),
        ('max_attempts: "5"\n', "max_attempts"),
        ("listen: nohost\n", "listen"),
        ("listen: 127.0.0.1:99999\n", "listen"),
        ("listen: 127.0.0.1:http\n", "listen"),
        ("listen: 7411\n", "listen"),
        ("registration: maybe\n", "registration"),
        ("registration: true\n", "registration"),
        ("data_dir: 5\n", "data_dir"),
        ('data_dir: ""\n', "data_dir"),
        ("database: 5\n", "database"),
        ("control_socket: [a]\n", "control_socket"),
        ("tls: yes\n", "tls"),
    ],
)
def test_hub_wrong_type_names_the_key_and_the_file(tmp_path: Path, text: str, key: str) -> None:
    message = config_error(load_hub_config, write(tmp_path, text))
    assert f": {key}: " in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("tls: {cert: a.crt}\n", "tls"),
        ("tls: {key: a.key}\n", "tls"),
        ("tls: {cert: a.crt, key: a.key, ca: b.crt}\n", "tls.ca"),
        ("tls: {cert: 5, key: a.key}\n", "tls.cert"),
        ("tls: {cert: a.crt, key: a.key, self_signed: yes please}\n", "tls.self_signed"),
        ("tls: {cert: a.crt, key: a.key, self_signed: 1}\n", "tls.self_signed"),
    ],
)
def test_hub_tls_sub_key_errors_name_the_key_path(tmp_path: Path, text: str, key: str) -> None:
    message = config_error(load_hub_config, write(tmp_path, text))
    assert f": {key}: " in message


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("- listen\n- data_dir\n", "mapping"),
        ("listen: [unclosed\n", "YAML"),
    ],
)
def test_hub_file_that_is_not_a_mapping_is_an_error(tmp_path: Path, text: str, why: str) -> None:
    assert why in config_error(load_hub_config, write(tmp_path, text))


def test_missing_hub_file_names_the_file(tmp_path: Path) -> None:
    assert "cannot read" in config_error(load_hub_config, tmp_path / "absent.yaml")


# ---- node -----------------------------------------------------------------------------


def test_node_defaults(tmp_path: Path) -> None:
    config = load_node_config(write(tmp_path, "volunteer: alice\n"))
    assert config.hubs == (Address("127.0.0.1", 7411),)
    assert config.volunteer == "alice"
    assert config.token is None
    assert config.data_dir == tmp_path / "issc-node"
    assert config.projects == ()
    assert dict(config.trusted_keys) == {}
    assert config.slots == 2
    assert config.relay is None
    assert config.tls is None
    assert config.file_cache_mb == 1024
    assert config.file_cache_days == 14
    assert config.sandbox == "auto"
    assert config.file_cache_bytes == 1024 * 1024 * 1024
    assert config.file_cache_seconds == 14 * 86400
    assert config.discover is None


def test_node_every_key_is_parsed(tmp_path: Path, pubkey: str) -> None:
    path = write(
        tmp_path,
        f"""
hub: [192.168.1.20:7412, "hub.example.org:7411"]
volunteer: bob@example.org
token: tok-123
data_dir: /var/lib/issc-node
projects: [primes, mandel-brot_2]
trusted_keys:
  primes: "{pubkey}"
  mandel-brot_2: "{pubkey}"
  unused: "{pubkey}"
slots: 8
relay: {{listen: 0.0.0.0:7412, max_peers: 1024, discovery: 0.0.0.0:7413}}
tls: {{ca: /etc/issc/ca.pem}}
file_cache_mb: 200
file_cache_days: 0.5
discover: {{address: 192.168.1.255, port: 7414, timeout: 30}}
sandbox: bubblewrap
""",
    )
    config = load_node_config(path)
    assert config.hubs == (Address("192.168.1.20", 7412), Address("hub.example.org", 7411))
    assert config.volunteer == "bob@example.org"
    assert config.token == "tok-123"
    assert config.data_dir == Path("/var/lib/issc-node")
    assert config.projects == ("primes", "mandel-brot_2")
    assert dict(config.trusted_keys) == {
        "primes": pubkey,
        "mandel-brot_2": pubkey,
        "unused": pubkey,
    }
    assert config.slots == 8
    assert config.relay == RelayConfig(Address("0.0.0.0", 7412), 1024, Address("0.0.0.0", 7413))
    assert config.tls == ClientTls(Path("/etc/issc/ca.pem"), None)
    assert config.file_cache_mb == 200
    assert config.file_cache_bytes == 200 * 1024 * 1024
    assert config.file_cache_days == 0.5
    assert config.file_cache_seconds == 43200
    assert config.discover == DiscoverConfig("192.168.1.255", 7414, 30.0)
    assert isinstance(config.discover.timeout, float)
    assert config.sandbox == "bubblewrap"


def test_node_relay_defaults(tmp_path: Path) -> None:
    config = load_node_config(write(tmp_path, "volunteer: a\nrelay: {listen: 0.0.0.0:7412}\n"))
    assert config.relay == RelayConfig(Address("0.0.0.0", 7412), max_peers=64, discovery=None)
    path = write(
        tmp_path, "volunteer: a\nrelay: {listen: 0.0.0.0:1, max_peers: null, discovery: null}\n"
    )
    assert load_node_config(path).relay == RelayConfig(Address("0.0.0.0", 1), 64, None)
    path = write(
        tmp_path, 'volunteer: a\nrelay: {listen: "[::]:1", max_peers: 1, discovery: "[::]:2"}\n'
    )
    assert load_node_config(path).relay == RelayConfig(Address("::", 1), 1, Address("::", 2))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("discover: null\n", None),
        ("discover: {}\n", DiscoverConfig("255.255.255.255", 7412, 1.0)),
        ("discover: {address: null, port: null, timeout: null}\n", DiscoverConfig()),
        ("discover: {address: 127.255.255.255}\n", DiscoverConfig(address="127.255.255.255")),
        ("discover: {address: relay.lan, port: 1}\n", DiscoverConfig("relay.lan", 1, 1.0)),
        ("discover: {port: 65535, timeout: 0.25}\n", DiscoverConfig(port=65535, timeout=0.25)),
        ("discover: {timeout: 2}\n", DiscoverConfig(timeout=2.0)),
    ],
)
def test_node_discover(tmp_path: Path, text: str, expected: DiscoverConfig | None) -> None:
    config = load_node_config(write(tmp_path, "volunteer: a\n" + text))
    assert config.discover == expected
    if config.discover is not None:
        assert isinstance(config.discover.timeout, float)


def test_node_single_hub_and_tls_fingerprint_only(tmp_path: Path) -> None:
    pin = "SHA256:" + ":".join(["AB"] * 32)  # openssl's form: upper case, colons
    path = write(tmp_path, f'volunteer: a\nhub: relay.lan:7412\ntls: {{fingerprint: "{pin}"}}\n')
    config = load_node_config(path)
    assert config.hubs == (Address("relay.lan", 7412),)
    assert config.tls == ClientTls(None, "sha256:" + "ab" * 32)


def test_node_relative_paths_resolve_against_the_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    conf_dir = conf_dir.resolve()
    path = write(conf_dir, "volunteer: alice\ndata_dir: state\ntls: {ca: certs/ca.pem}\n")
    monkeypatch.chdir(tmp_path)
    config = load_node_config(Path("conf") / "conf.yaml")
    assert config.data_dir == conf_dir / "state"
    assert config.tls == ClientTls(conf_dir / "certs" / "ca.pem", None)
    assert path.parent == conf_dir


def test_node_missing_volunteer_names_the_key_and_the_file(tmp_path: Path) -> None:
    message = config_error(load_node_config, write(tmp_path, "slots: 2\n"))
    assert ": volunteer: " in message
    assert "required" in message


def test_node_project_without_a_trusted_key_is_an_error(tmp_path: Path, pubkey: str) -> None:
    path = write(
        tmp_path,
        f'volunteer: alice\nprojects: [primes, mandel]\ntrusted_keys: {{primes: "{pubkey}"}}\n',
    )
    message = config_error(load_node_config, path)
    assert ": trusted_keys: " in message
    assert "mandel" in message


@pytest.mark.parametrize(
    "key",
    [
        "not-a-key",
        "ed25519:",
        "ed25519:!!!!",
        "ed25519:AAAA",  # valid base64, but not 32 bytes
        "rsa:wORs+tbT4FFPqkMhIAzdvW344qra7DbEoKuf9sAn9Rs=",
    ],
)
def test_node_bad_key_string_names_the_project_key_path(tmp_path: Path, key: str) -> None:
    path = write(
        tmp_path, f'volunteer: alice\nprojects: [primes]\ntrusted_keys: {{primes: "{key}"}}\n'
    )
    message = config_error(load_node_config, path)
    assert ": trusted_keys.primes: " in message


def test_node_key_that_is_not_a_string_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "volunteer: alice\ntrusted_keys: {primes: 42}\n")
    assert ": trusted_keys.primes: " in config_error(load_node_config, path)


def test_node_unknown_key_names_the_key_and_the_file(tmp_path: Path, pubkey: str) -> None:
    message = config_error(load_node_config, write(tmp_path, node_yaml(pubkey, "cores: 4\n")))
    assert "cores" in message
    assert "unknown key" in message


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("slots: 0\n", "slots"),
        ("slots: two\n", "slots"),
        ("slots: 1.5\n", "slots"),
        ("hub: nohost\n", "hub"),
        ("hub: []\n", "hub"),
        ("hub: [127.0.0.1:1, nohost]\n", "hub"),
        ("token: 5\n", "token"),
        ("data_dir: [x]\n", "data_dir"),
        ("projects: primes\n", "projects"),
        ("projects: [Primes!]\n", "projects"),
        ("relay: {}\n", "relay"),
        ("relay: 0.0.0.0:7412\n", "relay"),
        ("relay: {listen: nohost}\n", "relay.listen"),
        ("relay: {listen: 0.0.0.0:1, peers: 3}\n", "relay.peers"),
        ("relay: {listen: 0.0.0.0:1, max_peers: 0}\n", "relay.max_peers"),
        ("relay: {listen: 0.0.0.0:1, max_peers: -1}\n", "relay.max_peers"),
        ("relay: {listen: 0.0.0.0:1, max_peers: 1025}\n", "relay.max_peers"),
        ("relay: {listen: 0.0.0.0:1, max_peers: 2.5}\n", "relay.max_peers"),
        ("relay: {listen: 0.0.0.0:1, max_peers: true}\n", "relay.max_peers"),
        ('relay: {listen: 0.0.0.0:1, max_peers: "8"}\n', "relay.max_peers"),
        ("relay: {listen: 0.0.0.0:1, discovery: nohost}\n", "relay.discovery"),
        ("relay: {listen: 0.0.0.0:1, discovery: 7412}\n", "relay.discovery"),
        ("relay: {listen: 0.0.0.0:1, discovery: 0.0.0.0:65536}\n", "relay.discovery"),
        ("relay: {listen: 0.0.0.0:1, discovery: [0.0.0.0:1]}\n", "relay.discovery"),
        ("relay: {max_peers: 8}\n", "relay"),
        ("discover: yes\n", "discover"),
        ("discover: 255.255.255.255\n", "discover"),
        ("discover: [a]\n", "discover"),
        ("discover: {addr: 10.0.0.255}\n", "discover.addr"),
        ("discover: {address: 10.0.0.255, hub: x}\n", "discover.hub"),
        ("discover: {address: 5}\n", "discover.address"),
        ('discover: {address: ""}\n', "discover.address"),
        ('discover: {address: "a b"}\n', "discover.address"),
        ("discover: {address: [x]}\n", "discover.address"),
        ("discover: {port: 0}\n", "discover.port"),
        ("discover: {port: 65536}\n", "discover.port"),
        ("discover: {port: -1}\n", "discover.port"),
        ('discover: {port: "7412"}\n', "discover.port"),
        ("discover: {port: 7412.0}\n", "discover.port"),
        ("discover: {port: true}\n", "discover.port"),
        ("discover: {timeout: 0}\n", "discover.timeout"),
        ("discover: {timeout: -1}\n", "discover.timeout"),
        ("discover: {timeout: 30.5}\n", "discover.timeout"),
        ("discover: {timeout: .inf}\n", "discover.timeout"),
        ("discover: {timeout: .nan}\n", "discover.timeout"),
        ("discover: {timeout: soon}\n", "discover.timeout"),
        ("discover: {timeout: false}\n", "discover.timeout"),
        ("tls: {pin: x}\n", "tls.pin"),
        ("tls: {fingerprint: 5}\n", "tls.fingerprint"),
        ('tls: {fingerprint: "sha256:abcd"}\n', "tls.fingerprint"),
        ('tls: {fingerprint: "md5:' + "ab" * 32 + '"}\n', "tls.fingerprint"),
        ('tls: {fingerprint: "sha256:' + "zz" * 32 + '"}\n', "tls.fingerprint"),
        ("tls: {}\n", "tls"),
        ('tls: {ca: ca.pem, fingerprint: "sha256:' + "ab" * 32 + '"}\n', "tls"),
        ("trusted_keys: [a]\n", "trusted_keys"),
        ("file_cache_mb: 0\n", "file_cache_mb"),
        ("file_cache_mb: -5\n", "file_cache_mb"),
        ("file_cache_mb: 1.5\n", "file_cache_mb"),
        ("file_cache_mb: lots\n", "file_cache_mb"),
        ("file_cache_mb: true\n", "file_cache_mb"),
        ("file_cache_days: 0\n", "file_cache_days"),
        ("file_cache_days: -1\n", "file_cache_days"),
        ("file_cache_days: .inf\n", "file_cache_days"),
        ("file_cache_days: forever\n", "file_cache_days"),
        ("file_cache_days: false\n", "file_cache_days"),
        ("sandbox: chroot\n", "sandbox"),
        ("sandbox: true\n", "sandbox"),
    ],
)
def test_node_wrong_type_names_the_key_path_and_the_file(
    tmp_path: Path, pubkey: str, extra: str, key: str
) -> None:
    # Later keys replace the ones node_yaml writes (YAML: the last duplicate wins).
    message = config_error(load_node_config, write(tmp_path, node_yaml(pubkey, extra)))
    assert f": {key}: " in message


@pytest.mark.parametrize("name", ["", "-alice", "al ice", "a" * 65, "al/ice"])
def test_node_bad_volunteer_name(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, f'volunteer: "{name}"\n')
    assert ": volunteer: " in config_error(load_node_config, path)


# ---- the example configs ----------------------------------------------------------------


def test_example_hub_config_loads_with_the_defaults() -> None:
    config = load_hub_config(CONFIGS / "hub.yaml")
    assert config.listen == Address("127.0.0.1", 7411)
    assert config.data_dir == CONFIGS / "issc-data"
    assert config.database is None
    assert (config.heartbeat_interval, config.heartbeat_misses) == (5, 3)
    assert (config.offer_timeout, config.max_attempts) == (60, 5)
    assert config.registration == "open"
    assert config.control_socket_path == CONFIGS / "issc-data" / "control.sock"
    assert config.tls is None


def test_example_node_config_loads() -> None:
    config = load_node_config(CONFIGS / "node.yaml")
    assert config.hubs == (Address("127.0.0.1", 7411),)
    assert config.volunteer == "alice"
    assert config.token is None
    assert config.data_dir == CONFIGS / "issc-node"
    assert config.projects == ("primes",)
    assert set(config.trusted_keys) == {"primes"}
    assert config.slots == 2
    assert config.relay is None
    assert config.tls is None
    assert (config.file_cache_mb, config.file_cache_days) == (1024, 14)
    assert config.discover is None


def test_example_hub_config_shows_every_hub_key() -> None:
    import yaml

    keys = set(yaml.safe_load((CONFIGS / "hub.yaml").read_text()))
    assert keys == {
        "listen", "data_dir", "database", "heartbeat_interval", "heartbeat_misses",
        "offer_timeout", "max_attempts", "registration", "control_socket", "tls", "limits",
    }  # fmt: skip


def test_example_node_config_shows_every_node_key() -> None:
    import yaml

    keys = set(yaml.safe_load((CONFIGS / "node.yaml").read_text()))
    assert keys == {
        "hub", "volunteer", "token", "data_dir", "projects", "trusted_keys", "slots", "relay",
        "tls", "file_cache_mb", "file_cache_days", "discover", "sandbox",
    }  # fmt: skip
