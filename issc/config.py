"""Hub and node configuration: YAML in, frozen dataclasses out.

Every key is optional except where noted; unknown keys and wrong types are errors
at start-up, and every error names the file and the key path. Relative paths in a
config file resolve against the directory of that file (without a file, against the
current directory), so a config works the same whatever directory it is started from.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from issc.errors import ConfigError
from issc.names import VOLUNTEER_NAME_RE, VOLUNTEER_NAME_RULE
from issc.tls import normalize_fingerprint

T = TypeVar("T")

DEFAULT_HUB_PORT = 7411
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_HUB_KEYS = {
    "listen", "data_dir", "database", "heartbeat_interval", "heartbeat_misses",
    "offer_timeout", "max_attempts", "registration", "control_socket", "tls", "limits",
}  # fmt: skip
_LIMIT_KEYS = {
    "max_connections", "max_connections_per_address", "messages_per_second", "message_burst",
    "write_timeout",
}  # fmt: skip
_NODE_KEYS = {
    "hub", "volunteer", "token", "data_dir", "projects", "trusted_keys", "slots", "relay", "tls",
    "file_cache_mb", "file_cache_days", "discover", "sandbox",
}  # fmt: skip
DEFAULT_DISCOVERY_ADDRESS = "255.255.255.255"
DEFAULT_DISCOVERY_PORT = 7412
MAX_RELAY_PEERS = 1024
MAX_DISCOVER_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


DEFAULT_HUB = Address("127.0.0.1", DEFAULT_HUB_PORT)


@dataclass(frozen=True, slots=True)
class ServerTls:
    cert: Path
    key: Path
    self_signed: bool = False  # make a self-signed cert and key when neither file exists


@dataclass(frozen=True, slots=True)
class ClientTls:
    """How a node checks the hub: exactly one of ``ca`` and ``fingerprint`` is set."""

    ca: Path | None
    fingerprint: str | None  # normalized: "sha256:" and 64 lowercase hex digits


@dataclass(frozen=True, slots=True)
class RelayConfig:
    listen: Address
    max_peers: int = 64  # peers served at once
    discovery: Address | None = None  # where to answer discovery requests; None = don't


@dataclass(frozen=True, slots=True)
class DiscoverConfig:
    """Find relays by sending a discovery request to address:port (issc.discovery)."""

    address: str = DEFAULT_DISCOVERY_ADDRESS
    port: int = DEFAULT_DISCOVERY_PORT
    timeout: float = 1.0  # seconds to collect answers


@dataclass(frozen=True, slots=True)
class HubLimits:
    """What one remote address or connection may take of the hub (docs/protocol.md,
    "Limits"); ``limits:`` in the hub config."""

    max_connections: int = 10_000  # node connections open at once, in total
    # From one IP address at once: a LAN behind one NAT address is many volunteers.
    max_connections_per_address: int = 256
    messages_per_second: float = 1000.0  # sustained, per connection (token bucket rate)
    message_burst: int = 2000  # messages a connection may send at once (bucket size)
    write_timeout: float = 10.0  # seconds a node may leave too much of its data unread


@dataclass(frozen=True, slots=True)
class HubConfig:
    listen: Address
    data_dir: Path
    database: str | None
    heartbeat_interval: float
    heartbeat_misses: int
    offer_timeout: float
    max_attempts: int
    registration: Literal["open", "closed"]
    control_socket: Path | None
    tls: ServerTls | None
    limits: HubLimits = HubLimits()

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL; the default is an SQLite file in data_dir."""
        return self.database or f"sqlite:///{self.data_dir / 'hub.db'}"

    @property
    def control_socket_path(self) -> Path:
        return self.control_socket or self.data_dir / "control.sock"

    @property
    def lease_window(self) -> float:
        """Seconds without a heartbeat after which a node's leases are released."""
        return self.heartbeat_interval * self.heartbeat_misses


@dataclass(frozen=True, slots=True)
class NodeConfig:
    hubs: tuple[Address, ...]
    volunteer: str
    token: str | None
    data_dir: Path
    projects: tuple[str, ...]
    trusted_keys: Mapping[str, str]
    slots: int
    relay: RelayConfig | None
    tls: ClientTls | None
    file_cache_mb: int  # input-file cache size beyond which least recently used files go
    file_cache_days: float  # input files unused this long are evicted
    discover: DiscoverConfig | None = None  # None = no relay discovery
    # How task code is confined (docs/security.md): auto = bubblewrap where usable;
    # bubblewrap = required; none = rlimits and a scrubbed environment only.
    sandbox: Literal["auto", "bubblewrap", "none"] = "auto"

    @property
    def file_cache_bytes(self) -> int:
        return self.file_cache_mb * 1024 * 1024

    @property
    def file_cache_seconds(self) -> float:
        return self.file_cache_days * 86400.0


class _Reader:
    """Typed access to one mapping of a config file; errors name file and key path."""

    def __init__(self, source: str, base_dir: Path, data: Mapping[str, Any], prefix: str = ""):
        self.source = source
        self.base_dir = base_dir
        self.data = data
        self.prefix = prefix

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.prefix}{key}: {message}")

    def reject_unknown(self, known: set[str]) -> None:
        for key in self.data:
            if key not in known:
                expected = ", ".join(sorted(known))
                raise self.error(str(key), f"unknown key (expected one of {expected})")

    def get(self, key: str, default: T, convert: Callable[[Any], T], what: str) -> T:
        if key not in self.data or self.data[key] is None:
            return default
        try:
            return convert(self.data[key])
        except (TypeError, ValueError) as exc:
            detail = f" ({exc})" if str(exc) else ""
            raise self.error(key, f"must be {what}, got {self.data[key]!r}{detail}") from None

    def sub(self, key: str) -> _Reader | None:
        value = self.data.get(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(key, f"must be a mapping, got {value!r}")
        return _Reader(self.source, self.base_dir, value, f"{self.prefix}{key}.")

    def path(self, key: str, default: Path | None) -> Path | None:
        return self.get(key, default, lambda v: self.base_dir / _string(v), "a path")


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError
    return value


def _positive_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError
    if not math.isfinite(value) or value <= 0:
        raise ValueError("must be positive")
    return float(value)


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def _int_range(low: int, high: int) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError
        if not low <= value <= high:
            raise ValueError(f"must be {low}..{high}")
        return value

    return convert


def _timeout(value: Any) -> float:
    seconds = _positive_float(value)
    if seconds > MAX_DISCOVER_TIMEOUT:
        raise ValueError(f"must be at most {MAX_DISCOVER_TIMEOUT:g}")
    return seconds


def _host(value: Any) -> str:
    text = _string(value)
    if len(text) > 253 or any(c.isspace() for c in text) or not text.isascii():
        raise ValueError("expected a host name or IP address")
    return text


def parse_address(value: Any) -> Address:
    """Parse ``host:port`` (IPv6 as ``[::1]:port``); raises ValueError/TypeError."""
    text = _string(value)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError("expected host:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    port = int(port_text)
    if port > 65535:
        raise ValueError("port out of range")
    return Address(host, port)


def _choice(*options: str) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        if value not in options:
            raise ValueError(f"one of {', '.join(options)}")
        return value

    return convert


def _load_yaml(path: Path) -> Mapping[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a mapping of keys to values")
    return data


def load_hub_config(path: Path | None) -> HubConfig:
    """Load a hub config; ``None`` gives the defaults. Raises ConfigError."""
    data = _load_yaml(path) if path else {}
    r = _Reader(str(path or "<defaults>"), path.parent.resolve() if path else Path.cwd(), data)
    r.reject_unknown(_HUB_KEYS)
    tls = None
    if (t := r.sub("tls")) is not None:
        t.reject_unknown({"cert", "key", "self_signed"})
        cert, key = t.path("cert", None), t.path("key", None)
        if cert is None or key is None:
            raise r.error("tls", "needs both cert and key")
        tls = ServerTls(cert, key, t.get("self_signed", False, _bool, "true or false"))
    data_dir = r.path("data_dir", r.base_dir / "issc-data")
    assert data_dir is not None
    return HubConfig(
        listen=r.get("listen", DEFAULT_HUB, parse_address, "host:port"),
        data_dir=data_dir,
        database=r.get("database", None, _string, "an SQLAlchemy URL"),
        heartbeat_interval=r.get("heartbeat_interval", 5.0, _positive_float, "a positive number"),
        heartbeat_misses=r.get("heartbeat_misses", 3, _positive_int, "a positive integer"),
        offer_timeout=r.get("offer_timeout", 60.0, _positive_float, "a positive number"),
        max_attempts=r.get("max_attempts", 5, _positive_int, "a positive integer"),
        registration=r.get("registration", "open", _choice("open", "closed"), "open or closed"),
        control_socket=r.path("control_socket", None),
        tls=tls,
        limits=_hub_limits(r),
    )


def _hub_limits(r: _Reader) -> HubLimits:
    default = HubLimits()
    s = r.sub("limits")
    if s is None:
        return default
    s.reject_unknown(_LIMIT_KEYS)
    count, number = "a positive integer", "a positive number"
    return HubLimits(
        max_connections=s.get("max_connections", default.max_connections, _positive_int, count),
        max_connections_per_address=s.get(
            "max_connections_per_address", default.max_connections_per_address, _positive_int, count
        ),
        messages_per_second=s.get(
            "messages_per_second", default.messages_per_second, _positive_float, number
        ),
        message_burst=s.get("message_burst", default.message_burst, _positive_int, count),
        write_timeout=s.get("write_timeout", default.write_timeout, _positive_float, number),
    )


def _hub_list(value: Any) -> tuple[Address, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("empty list")
    return tuple(parse_address(item) for item in items)


def _name_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise TypeError
    for item in value:
        if not isinstance(item, str) or not _NAME_RE.match(item):
            raise ValueError(f"bad project name {item!r}")
    return tuple(value)


def _volunteer(value: Any) -> str:
    if not isinstance(value, str) or not VOLUNTEER_NAME_RE.match(value):
        raise ValueError(VOLUNTEER_NAME_RULE)
    return value


def _trusted_keys(r: _Reader) -> dict[str, str]:
    from issc.keys import parse_public_key  # keys pulls in cryptography; only nodes need it

    sub = r.sub("trusted_keys")
    if sub is None:
        return {}
    keys: dict[str, str] = {}
    for project, key in sub.data.items():
        if not isinstance(project, str) or not _NAME_RE.match(project):
            raise sub.error(str(project), "not a valid project name")
        try:
            parse_public_key(_string(key))
        except Exception as exc:  # KeyFormatError or TypeError: both mean a bad value
            raise sub.error(project, f"not a public key string ({exc})") from None
        keys[project] = key
    return keys


def load_node_config(path: Path) -> NodeConfig:
    """Load a node config file. Raises ConfigError naming the file and key."""
    r = _Reader(str(path), path.parent.resolve(), _load_yaml(path))
    r.reject_unknown(_NODE_KEYS)
    if "volunteer" not in r.data:
        raise r.error("volunteer", "is required")
    relay = None
    if (s := r.sub("relay")) is not None:
        s.reject_unknown({"listen", "max_peers", "discovery"})
        listen = s.get("listen", None, parse_address, "host:port")
        if listen is None:
            raise r.error("relay", "needs listen: host:port")
        max_peers = s.get(
            "max_peers", 64, _int_range(1, MAX_RELAY_PEERS), f"an integer 1..{MAX_RELAY_PEERS}"
        )
        discovery = s.get("discovery", None, parse_address, "host:port")
        if discovery is not None and listen.port == 0:
            # Discovery answers name the port: peers cannot be sent to "port 0".
            raise r.error("relay", "listen needs a fixed port (not 0) when discovery is on")
        relay = RelayConfig(listen, max_peers, discovery)
    discover = None
    if (s := r.sub("discover")) is not None:  # discover: {} = discovery with the defaults
        s.reject_unknown({"address", "port", "timeout"})
        discover = DiscoverConfig(
            address=s.get("address", DEFAULT_DISCOVERY_ADDRESS, _host, "a host name or IP address"),
            port=s.get("port", DEFAULT_DISCOVERY_PORT, _int_range(1, 65535), "a port 1..65535"),
            timeout=s.get("timeout", 1.0, _timeout, "a positive number of seconds"),
        )
    tls = None
    if (s := r.sub("tls")) is not None:
        s.reject_unknown({"ca", "fingerprint"})
        pin = s.get(
            "fingerprint",
            None,
            lambda v: normalize_fingerprint(_string(v)),
            'a certificate fingerprint "sha256:<64 hex digits>"',
        )
        tls = ClientTls(s.path("ca", None), pin)
        if (tls.ca is None) == (tls.fingerprint is None):
            raise r.error("tls", "needs exactly one of ca and fingerprint")
    no_projects: tuple[str, ...] = ()
    projects = r.get("projects", no_projects, _name_list, "a list of project names")
    trusted = _trusted_keys(r)
    for project in projects:
        if project not in trusted:
            raise r.error("trusted_keys", f"no key for project {project!r} listed in projects")
    data_dir = r.path("data_dir", r.base_dir / "issc-node")
    assert data_dir is not None
    return NodeConfig(
        hubs=r.get("hub", (DEFAULT_HUB,), _hub_list, "host:port or a list"),
        volunteer=r.get("volunteer", "", _volunteer, "a volunteer name"),
        token=r.get("token", None, _string, "a string"),
        data_dir=data_dir,
        projects=projects,
        trusted_keys=trusted,
        slots=r.get("slots", 2, _positive_int, "a positive integer"),
        relay=relay,
        tls=tls,
        file_cache_mb=r.get("file_cache_mb", 1024, _positive_int, "a positive integer"),
        file_cache_days=r.get("file_cache_days", 14.0, _positive_float, "a positive number"),
        discover=discover,
        sandbox=r.get(
            "sandbox", "auto", _choice("auto", "bubblewrap", "none"), "auto, bubblewrap or none"
        ),
    )
