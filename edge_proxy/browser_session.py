"""The inspector's browser sessions: after a sign-in with an admin client key
the browser holds a cookie `v1.<name>.<expires>.<nonce>.<mac>`, an HMAC-SHA256
over the rest with a random secret of this process (a restart signs everyone
out; several edge replicas each sign their own). It names the key, never holds
it. Sign-out revokes the nonce until the cookie would have expired anyway.

CSRF: the cookie is SameSite=Strict, and every state-changing request made
with it must also carry `csrf_token(session)` (a MAC of the nonce) in a form
field or the X-CSRF-Token header, and no foreign Origin. Pure: times are
passed in (wall-clock seconds, as the cookie's expiry is)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit

COOKIE = "edge_session"
COOKIE_PATH = "/_edge"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"
VERSION = "v1"


@dataclass(frozen=True, slots=True)
class BrowserSession:
    name: str  # the client key's name
    expires: int
    nonce: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(eq=False)
class SessionSigner:
    """Issues and checks session cookies. `ttl`: seconds a sign-in lasts."""

    ttl: float = 8 * 3600.0
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    _revoked: dict[str, int] = field(default_factory=dict)  # nonce -> its cookie's expiry

    def _mac(self, payload: str) -> str:
        return _b64(hmac.new(self.secret, payload.encode("ascii"), hashlib.sha256).digest())

    def issue(self, name: str, now: float) -> tuple[str, BrowserSession]:
        session = BrowserSession(name, int(now + self.ttl), secrets.token_urlsafe(16))
        payload = f"{VERSION}.{_b64(name.encode('utf-8'))}.{session.expires}.{session.nonce}"
        return f"{payload}.{self._mac(payload)}", session

    def verify(self, cookie: str | None, now: float) -> BrowserSession | None:
        """The session of a cookie that this process signed, not expired and
        not signed out; None for anything else (tampered, foreign, old)."""
        if not cookie or len(cookie) > 1024:
            return None
        parts = cookie.split(".")
        if len(parts) != 5 or parts[0] != VERSION:
            return None
        payload, mac = ".".join(parts[:4]), parts[4]
        if not hmac.compare_digest(self._mac(payload), mac):
            return None
        try:
            name = _unb64(parts[1]).decode("utf-8")
            expires = int(parts[2])
        except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
            return None
        if now >= expires or parts[3] in self._revoked:
            return None
        return BrowserSession(name, expires, parts[3])

    def csrf_token(self, session: BrowserSession) -> str:
        return self._mac(f"csrf.{session.nonce}")

    def csrf_ok(self, session: BrowserSession, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(self.csrf_token(session), presented or "")

    def revoke(self, session: BrowserSession, now: float) -> None:
        """Sign out: the cookie stops working here even if a copy survives."""
        for nonce, expires in list(self._revoked.items()):
            if expires <= now:
                del self._revoked[nonce]
        self._revoked[session.nonce] = session.expires


def same_origin(origin: str | None, host: str | None) -> bool:
    """False when a browser says the request comes from another site: an
    `Origin` whose host[:port] is not this Host. (The scheme is not compared:
    behind a TLS-terminating balancer the edge sees http for an https page.)
    No Origin (scripts) passes; the CSRF token and SameSite=Strict still apply."""
    if origin is None:
        return True
    if origin == "null" or not host:
        return False
    o = urlsplit(origin)
    return o.scheme in ("http", "https") and o.netloc.lower() == host.lower()
