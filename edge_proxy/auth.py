"""Client API keys and worker tokens: creation, hashed storage, constant-time
checks. Both are random secrets; only their SHA-256 is stored on disk."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.cli import StartupError

log = logging.getLogger(__name__)

CLIENT_KEY_PREFIX = "eik_"
WORKER_TOKEN_PREFIX = "ewt_"


@dataclass(frozen=True, slots=True)
class Credential:
    name: str
    digest: bytes
    admin: bool = False  # may read /_edge/metrics, /_edge/workers and sign in to the inspector /_edge/
    rate: float | None = None  # requests/s override for this key
    burst: float | None = None


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


class CredentialStore:
    """A set of hashed secrets read from a JSON file:
    `{"credentials": [{"name": ..., "sha256": hex, "admin": bool, ...}]}`."""

    def __init__(self, creds: list[Credential] | None = None) -> None:
        self._creds = list(creds or [])

    def __len__(self) -> int:
        return len(self._creds)

    @classmethod
    def load(cls, path: str | Path) -> CredentialStore:
        p = Path(path)
        try:
            raw = json.loads(p.read_text())
        except FileNotFoundError:
            raise StartupError(f"credentials file {p} not found; create it with `edge-proxy keys create --file {p} --name NAME`") from None
        except (ValueError, OSError) as exc:
            raise StartupError(f"cannot read credentials file {p}: {exc}") from None
        _warn_if_readable_by_others(p)
        creds = []
        for item in raw.get("credentials", []):
            creds.append(
                Credential(
                    name=str(item["name"]),
                    digest=bytes.fromhex(item["sha256"]),
                    admin=item.get("admin") is True,  # absent or not a boolean: not an admin
                    rate=item.get("rate"),
                    burst=item.get("burst"),
                )
            )
        return cls(creds)

    def named(self, name: str) -> Credential | None:
        """The credential called `name` (a browser session names its key)."""
        return next((c for c in self._creds if c.name == name), None)

    def verify(self, secret: str | None) -> Credential | None:
        """The credential matching `secret`, compared in constant time against
        every stored digest (no early exit, so timing reveals nothing)."""
        if not secret:
            return None
        d = digest(secret)
        found = None
        for c in self._creds:
            if hmac.compare_digest(c.digest, d):
                found = c
        return found


def create(path: str | Path, name: str, prefix: str, admin: bool = False, rate: float | None = None,
           burst: float | None = None) -> str:
    """Append a new secret named `name` to the file; return the secret."""
    p = Path(path)
    data: dict[str, list[dict[str, object]]] = {"credentials": []}
    if p.exists():
        data = json.loads(p.read_text())
    if any(c.get("name") == name for c in data.get("credentials", [])):
        raise StartupError(f"a credential named {name!r} already exists in {p}; pick another --name or revoke it first")
    secret = prefix + secrets.token_urlsafe(32)
    entry: dict[str, object] = {"name": name, "sha256": digest(secret).hex(), "admin": admin,
                                "created": int(time.time())}
    if rate is not None:
        entry["rate"] = rate
        entry["burst"] = burst if burst is not None else max(1.0, rate)
    data.setdefault("credentials", []).append(entry)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, p)
    return secret


def revoke(path: str | Path, name: str) -> bool:
    p = Path(path)
    data = json.loads(p.read_text())
    before = len(data.get("credentials", []))
    data["credentials"] = [c for c in data.get("credentials", []) if c.get("name") != name]
    p.write_text(json.dumps(data, indent=2))
    return len(data["credentials"]) < before


def _warn_if_readable_by_others(p: Path) -> None:
    try:
        mode = p.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is accessible by group/others (mode %o); run `chmod 600 %s`", p, mode & 0o777, p)


def presented_key(authorization: str | None, api_key: str | None) -> str | None:
    """The client key from `Authorization: Bearer ...` or `X-API-Key`."""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if api_key:
        return api_key.strip()
    return None
