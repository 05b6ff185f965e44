"""Handshake and status messages carried as JSON on stream 0: what the agent
announces (HELLO), what the edge answers (WELCOME), how the agent reports health."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import ProtocolError

PROTOCOL_VERSIONS: tuple[int, ...] = (1,)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
# A per-process random token; long enough that two processes never share one.
_INSTANCE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
# An origin-form path (and query) of printable ASCII, as it goes on a request
# line; not "//...", which a request head refuses (it would name a host).
_PATH = re.compile(r"^/(?!/)[\x21-\x7e]{0,1023}$")
MAX_LABELS = 32


@dataclass(frozen=True, slots=True)
class PeerSettings:
    """What one side will accept; the other side must stay within it.

    - `max_frame_size`: largest frame payload, bounds one decode buffer.
    - `max_header_fields`: fields (names + values) in a head.
    - `max_streams`: streams open at once (enforced by the agent).
    - `stream_window`: bytes of body the peer may send on one stream before
      waiting for a WINDOW_UPDATE: bounds memory per stream.
    - `connection_window`: the same across all streams: bounds memory per tunnel.
    """

    max_frame_size: int = 64 * 1024
    max_header_fields: int = 256
    max_streams: int = 1024
    stream_window: int = 1024 * 1024
    connection_window: int = 16 * 1024 * 1024

    def to_json(self) -> dict[str, int]:
        return {
            "max_frame_size": self.max_frame_size,
            "max_header_fields": self.max_header_fields,
            "max_streams": self.max_streams,
            "stream_window": self.stream_window,
            "connection_window": self.connection_window,
        }

    @classmethod
    def from_json(cls, obj: Any) -> PeerSettings:
        if not isinstance(obj, dict):
            raise ProtocolError("settings must be an object")
        bounds = {
            "max_frame_size": (1024, 16 * 1024 * 1024),
            "max_header_fields": (2, 4096),
            "max_streams": (1, 1_000_000),
            "stream_window": (1024, 2**31 - 1),
            "connection_window": (1024, 2**31 - 1),
        }
        # Not getattr(cls, key): on a slots dataclass that is the slot's descriptor.
        defaults = cls().to_json()
        values: dict[str, int] = {}
        for key, (lo, hi) in bounds.items():
            v = obj.get(key, defaults[key])
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ProtocolError(f"setting {key} out of range")
            values[key] = v
        return cls(**values)


@dataclass(frozen=True, slots=True)
class Hello:
    """What an agent announces. `instance` is random per agent process: the
    edge tells a reconnect (same instance) from a second process claiming the
    same `agent_id` (another instance). `health_path` is where the edge checks
    the agent's upstream. Both are optional on the wire ("" = not declared),
    so HELLOs of older agents still decode. `process_aware`: the agent reads
    WELCOME's `process`/`processes`, holds tunnels to every process of an edge
    and confirms each tunnel with its first STATUS (or ends it as a duplicate
    with GOAWAY NO_ERROR); optional, false when absent."""

    agent_id: str
    pool: str = "default"
    capacity: int = 1
    software: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    versions: tuple[int, ...] = PROTOCOL_VERSIONS
    settings: PeerSettings = field(default_factory=PeerSettings)
    instance: str = ""
    health_path: str = ""
    process_aware: bool = False

    def encode(self) -> bytes:
        obj: dict[str, Any] = {
            "versions": list(self.versions),
            "agent_id": self.agent_id,
            "pool": self.pool,
            "capacity": self.capacity,
            "software": self.software,
            "labels": self.labels,
            "settings": self.settings.to_json(),
        }
        if self.instance:
            obj["instance"] = self.instance
        if self.health_path:
            obj["health_path"] = self.health_path
        if self.process_aware:
            obj["process_aware"] = True
        return json.dumps(obj).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Hello:
        obj = _load(payload, "HELLO")
        versions = obj.get("versions")
        if (
            not isinstance(versions, list)
            or not versions
            or len(versions) > 16
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in versions)
        ):
            raise ProtocolError("HELLO versions must be a list of integers")
        agent_id = _name(obj.get("agent_id"), "agent_id")
        pool = _name(obj.get("pool", "default"), "pool")
        capacity = obj.get("capacity", 1)
        if not isinstance(capacity, int) or isinstance(capacity, bool) or not 1 <= capacity <= 100_000:
            raise ProtocolError("HELLO capacity must be an integer in 1..100000")
        software = obj.get("software", "")
        if not isinstance(software, str) or len(software) > 256:
            raise ProtocolError("HELLO software must be a short string")
        labels = obj.get("labels", {})
        if (
            not isinstance(labels, dict)
            or len(labels) > MAX_LABELS
            or not all(isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 256 for k, v in labels.items())
        ):
            raise ProtocolError("HELLO labels must be a small string map")
        settings = PeerSettings.from_json(obj.get("settings", {}))
        instance = obj.get("instance", "")
        if not isinstance(instance, str) or (instance and not _INSTANCE.match(instance)):
            raise ProtocolError(f"HELLO instance must match {_INSTANCE.pattern}")
        health_path = obj.get("health_path", "")
        if not isinstance(health_path, str) or (health_path and not _PATH.match(health_path)):
            raise ProtocolError("HELLO health_path must be a path starting with '/' (printable ASCII, at most 1024)")
        process_aware = obj.get("process_aware", False)
        if not isinstance(process_aware, bool):
            raise ProtocolError("HELLO process_aware must be a boolean")
        return cls(agent_id, pool, capacity, software, dict(labels), tuple(versions), settings, instance, health_path,
                   process_aware)


MAX_PROCESSES = 1024


@dataclass(frozen=True, slots=True)
class Welcome:
    """The edge's answer. `process` is the index (0..processes-1) of the edge
    process that accepted this tunnel and `processes` how many share the
    edge's port (`edge-proxy serve --processes N`): an agent must hold a
    tunnel to every index to be reachable from every process. Optional on the
    wire: an edge that sends neither is one process (0 of 1), and old agents
    ignore them."""

    version: int
    session_id: str
    heartbeat_interval: float = 1.0
    settings: PeerSettings = field(default_factory=PeerSettings)
    process: int = 0
    processes: int = 1

    def encode(self) -> bytes:
        obj: dict[str, Any] = {
            "version": self.version,
            "session_id": self.session_id,
            "heartbeat_interval": self.heartbeat_interval,
            "settings": self.settings.to_json(),
        }
        if self.processes != 1 or self.process != 0:
            obj["process"] = self.process
            obj["processes"] = self.processes
        return json.dumps(obj).encode()

    @classmethod
    def decode(cls, payload: bytes) -> Welcome:
        obj = _load(payload, "WELCOME")
        version = obj.get("version")
        if version not in PROTOCOL_VERSIONS:
            raise ProtocolError(f"edge chose unsupported protocol version {version!r}")
        session_id = obj.get("session_id", "")
        if not isinstance(session_id, str) or len(session_id) > 128:
            raise ProtocolError("WELCOME session_id must be a short string")
        interval = obj.get("heartbeat_interval", 1.0)
        if not isinstance(interval, (int, float)) or isinstance(interval, bool) or not 0.01 <= interval <= 3600:
            raise ProtocolError("WELCOME heartbeat_interval out of range")
        processes = obj.get("processes", 1)
        if not isinstance(processes, int) or isinstance(processes, bool) or not 1 <= processes <= MAX_PROCESSES:
            raise ProtocolError(f"WELCOME processes must be an integer in 1..{MAX_PROCESSES}")
        process = obj.get("process", 0)
        if not isinstance(process, int) or isinstance(process, bool) or not 0 <= process < processes:
            raise ProtocolError("WELCOME process must be an integer in 0..processes-1")
        return cls(int(version), session_id, float(interval), PeerSettings.from_json(obj.get("settings", {})),
                   process, processes)


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """The agent's own view of its upstream, sent whenever it changes."""

    healthy: bool
    detail: str = ""

    def encode(self) -> bytes:
        return json.dumps({"healthy": self.healthy, "detail": self.detail}).encode()

    @classmethod
    def decode(cls, payload: bytes) -> WorkerStatus:
        obj = _load(payload, "STATUS")
        healthy = obj.get("healthy")
        detail = obj.get("detail", "")
        if not isinstance(healthy, bool) or not isinstance(detail, str) or len(detail) > 1024:
            raise ProtocolError("STATUS must carry a boolean 'healthy' and a short 'detail'")
        return cls(healthy, detail)


def is_valid_name(value: str) -> bool:
    """Whether `value` may be an agent id or a pool name in a HELLO."""
    return bool(_NAME.match(value))


HEALTH_PATH_RULE = "a path starting with one '/', printable ASCII without spaces, at most 1024 characters"
NAME_RULE = "1-128 letters, digits, '.', '_', ':' or '-', starting with a letter or digit"


def is_valid_health_path(value: str) -> bool:
    """Whether `value` may be a HELLO's `health_path` (checked before sending,
    so a bad setting is a start-up error rather than a refused tunnel)."""
    return bool(_PATH.match(value))


def choose_version(offered: tuple[int, ...]) -> int | None:
    common = set(offered) & set(PROTOCOL_VERSIONS)
    return max(common) if common else None


def _load(payload: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(f"{what} payload is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} payload must be a JSON object")
    return obj


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ProtocolError(f"HELLO {what} must match {_NAME.pattern}")
    return value
