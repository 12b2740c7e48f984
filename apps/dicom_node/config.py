"""``node.yaml``: the DICOM node's settings, read once at start and checked key by key.

Every error names the file, the key and what would be right (``NodeConfigError``); unknown keys are errors
too (a typo must not silently fall back to a default). See ``apps/dicom_node/node.example.yaml`` for every
key with its meaning.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class NodeConfigError(ValueError):
    """A node.yaml that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity: who may send to us (calling AE title + host), and where results go."""

    ae_title: str
    host: str
    port: int | None = None

    def matches(self, ae_title: str, address: str) -> bool:
        """True when an association from ``ae_title`` at ``address`` is this peer (host names resolved)."""
        return ae_title.strip() == self.ae_title and address in resolve(self.host)


@dataclass(frozen=True)
class TLSConfig:
    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = False
    verify_peer_hostname: bool = False


@dataclass(frozen=True)
class NodeConfig:
    ae_title: str
    port: int
    model: Path
    spool: Path
    host: str = "0.0.0.0"
    peers: tuple[Peer, ...] = ()
    destination: Peer | None = None
    rules: Path | None = None
    device: str | None = None
    num_tta: int | None = None
    masks: bool = False
    operating_point: float | None = None
    idle_seconds: float = 30.0
    complete_on_release: bool = False
    max_queued_series: int = 20
    retry_initial_seconds: float = 10.0
    retry_max_seconds: float = 600.0
    network_timeout_seconds: float = 30.0
    tls: TLSConfig = field(default_factory=TLSConfig)
    audit_log: Path | None = None
    source: Path | None = None

    @property
    def audit_path(self) -> Path:
        return self.audit_log or self.spool / "audit.jsonl"

    def peer(self, ae_title: str, address: str) -> Peer | None:
        """The allow-listed peer an association comes from, or None."""
        return next((p for p in self.peers if p.matches(ae_title, address)), None)


def resolve(host: str) -> set[str]:
    """The IP addresses of ``host`` (itself when it is an address); empty when it does not resolve."""
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        pass
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return set()


_TOP = {"ae_title", "port", "host", "model", "spool", "peers", "destination", "rules", "device", "num_tta", "masks",
        "operating_point", "series", "queue", "send", "tls", "audit_log"}
_SECTIONS = {"series": {"idle_seconds", "complete_on_release"}, "queue": {"max_series"},
             "send": {"retry_initial_seconds", "retry_max_seconds", "network_timeout_seconds"},
             "tls": {"enabled", "certificate", "private_key", "ca_certificates", "require_client_certificate",
                     "verify_peer_hostname"}}


def _ae_title(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise NodeConfigError(f"{where}: an AE title (1-16 characters) is required, got {value!r}")
    v = value.strip()
    if len(v) > 16 or "\\" in v or any(ord(ch) < 32 for ch in v):
        raise NodeConfigError(f"{where}: {value!r} is not a valid AE title (at most 16 characters, no backslash "
                              "or control characters)")
    return v


def _port(value: Any, where: str, required: bool = True) -> int | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise NodeConfigError(f"{where}: a TCP port 1-65535 is required, got {value!r}")
    return value


def _number(value: Any, where: str, minimum: float = 0.0, integer: bool = False) -> float:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or value < minimum:
        kind = "an integer" if integer else "a number"
        raise NodeConfigError(f"{where}: {kind} >= {minimum:g} is required, got {value!r}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise NodeConfigError(f"{where}: true or false is required, got {value!r}")
    return value


def _path(value: Any, where: str, base: Path, must_exist: bool = False) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise NodeConfigError(f"{where}: a path is required, got {value!r}")
    p = Path(value).expanduser()
    p = p if p.is_absolute() else (base / p)
    if must_exist and not p.exists():
        raise NodeConfigError(f"{where}: {p} does not exist")
    return p


def _peer(value: Any, where: str, port_required: bool) -> Peer:
    if not isinstance(value, Mapping):
        raise NodeConfigError(f"{where}: expected {{ae_title, host, port}}, got {value!r}")
    extra = set(value) - {"ae_title", "host", "port"}
    if extra:
        raise NodeConfigError(f"{where}: unknown key(s) {sorted(extra)} (allowed: ae_title, host, port)")
    host = value.get("host")
    if not isinstance(host, str) or not host:
        raise NodeConfigError(f"{where}.host: a host name or IP address is required, got {host!r}")
    return Peer(_ae_title(value.get("ae_title"), f"{where}.ae_title"), host,
                _port(value.get("port"), f"{where}.port", required=port_required))


def load_config(path: str | Path) -> NodeConfig:
    """Read and check ``node.yaml``; relative paths in it are relative to the file's folder.

    Raises:
        NodeConfigError: the file is missing, not YAML, or a key is missing, unknown or wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise NodeConfigError(f"{path}: no such file (copy apps/dicom_node/node.example.yaml and edit it)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise NodeConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, Mapping):
        raise NodeConfigError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    return parse_config(raw, path)


def parse_config(raw: Mapping[str, Any], path: Path | None = None) -> NodeConfig:
    """:func:`load_config` on an already parsed mapping (``path`` for messages and relative paths)."""
    name = str(path) if path else "node config"
    base = path.parent.resolve() if path else Path.cwd()

    def where(key: str) -> str:
        return f"{name}: {key}"

    unknown = set(raw) - _TOP
    if unknown:
        raise NodeConfigError(f"{name}: unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP)}")
    for section, keys in _SECTIONS.items():
        sub = raw.get(section) or {}
        if not isinstance(sub, Mapping):
            raise NodeConfigError(f"{where(section)}: expected a mapping, got {sub!r}")
        extra = set(sub) - keys
        if extra:
            raise NodeConfigError(f"{where(section)}: unknown key(s) {sorted(extra)}; allowed: {sorted(keys)}")
    for key in ("ae_title", "port", "model", "spool"):
        if raw.get(key) is None:
            raise NodeConfigError(f"{where(key)}: required")
    series, queue, send, tls = (raw.get(s) or {} for s in ("series", "queue", "send", "tls"))
    peers = raw.get("peers") or []
    if not isinstance(peers, list):
        raise NodeConfigError(f"{where('peers')}: expected a list of {{ae_title, host, port}}")
    parsed_peers = tuple(_peer(p, where(f"peers[{i}]"), port_required=False) for i, p in enumerate(peers))
    destination = raw.get("destination")
    dest = _peer(destination, where("destination"), port_required=True) if destination is not None else None
    if dest is None and any(p.port is None for p in parsed_peers):
        missing = [p.ae_title for p in parsed_peers if p.port is None]
        raise NodeConfigError(f"{where('peers')}: {missing} have no port, and there is no destination: results go "
                              "back to the sending peer's storage port, so give each peer its port or set destination")
    tls_cfg = TLSConfig(
        enabled=_bool(tls.get("enabled", False), where("tls.enabled")),
        certificate=_path(tls.get("certificate"), where("tls.certificate"), base, must_exist=True),
        private_key=_path(tls.get("private_key"), where("tls.private_key"), base, must_exist=True),
        ca_certificates=_path(tls.get("ca_certificates"), where("tls.ca_certificates"), base, must_exist=True),
        require_client_certificate=_bool(tls.get("require_client_certificate", False),
                                         where("tls.require_client_certificate")),
        verify_peer_hostname=_bool(tls.get("verify_peer_hostname", False), where("tls.verify_peer_hostname")))
    if tls_cfg.enabled and (tls_cfg.certificate is None or tls_cfg.private_key is None):
        raise NodeConfigError(f"{where('tls')}: enabled needs certificate and private_key")
    if tls_cfg.require_client_certificate and tls_cfg.ca_certificates is None:
        raise NodeConfigError(f"{where('tls.require_client_certificate')}: needs tls.ca_certificates to verify them")
    num_tta = raw.get("num_tta")
    if num_tta is not None and num_tta not in (1, 4, 8):
        raise NodeConfigError(f"{where('num_tta')}: 1, 4 or 8 (mirror TTA per fold), got {num_tta!r}")
    masks = raw.get("masks", False)
    if not isinstance(masks, bool):
        raise NodeConfigError(f"{where('masks')}: true or false (a mask per finding in the SEG), got {masks!r}")
    device = raw.get("device")
    if device is not None and device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise NodeConfigError(f"{where('device')}: cpu, cuda or cuda:N, got {device!r}")
    op = raw.get("operating_point")
    if op is not None and (isinstance(op, bool) or not isinstance(op, (int, float)) or not 0 <= op <= 1):
        raise NodeConfigError(f"{where('operating_point')}: a score threshold in [0, 1], got {op!r}")
    host = raw.get("host", "0.0.0.0")
    if not isinstance(host, str) or not host:
        raise NodeConfigError(f"{where('host')}: the address to listen on, got {host!r}")
    return NodeConfig(
        ae_title=_ae_title(raw["ae_title"], where("ae_title")), port=_port(raw["port"], where("port")),
        model=_path(raw["model"], where("model"), base, must_exist=True), spool=_path(raw["spool"], where("spool"), base),
        host=host, peers=parsed_peers, destination=dest,
        rules=_path(raw.get("rules"), where("rules"), base, must_exist=True), device=device, num_tta=num_tta, masks=masks,
        operating_point=None if op is None else float(op),
        idle_seconds=float(_number(series.get("idle_seconds", 30.0), where("series.idle_seconds"), 0.1)),
        complete_on_release=_bool(series.get("complete_on_release", False), where("series.complete_on_release")),
        max_queued_series=int(_number(queue.get("max_series", 20), where("queue.max_series"), 1, integer=True)),
        retry_initial_seconds=float(_number(send.get("retry_initial_seconds", 10.0),
                                            where("send.retry_initial_seconds"), 0.1)),
        retry_max_seconds=float(_number(send.get("retry_max_seconds", 600.0), where("send.retry_max_seconds"), 0.1)),
        network_timeout_seconds=float(_number(send.get("network_timeout_seconds", 30.0),
                                              where("send.network_timeout_seconds"), 1)),
        tls=tls_cfg, audit_log=_path(raw.get("audit_log"), where("audit_log"), base), source=path)
