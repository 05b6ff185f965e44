"""What an operator writes to declare a direct worker (one the edge dials
itself over plain HTTP, typically at an address inside a VPN):
`POOL=URL[,capacity=N][,health=PATH][,id=NAME]`, on the command line
(`--direct`) or one per line in a file (`--directs FILE`). Pure parsing: the
URL comes only from here, never from a client, so the edge is no open proxy."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from urllib.parse import urlsplit

from tunnel.handshake import HEALTH_PATH_RULE, NAME_RULE, is_valid_health_path, is_valid_name

# The same default as `worker-agent --capacity`, so that a worker keeps its
# share of the pool whichever way it joins.
DEFAULT_CAPACITY = 4
MAX_CAPACITY = 100_000  # as a HELLO's capacity
SYNTAX = "POOL=URL[,capacity=N][,health=PATH][,id=NAME]"
EXAMPLE = "default=http://10.77.0.2:8000,capacity=4,health=/healthz,id=worker-1"


class DirectSpecError(ValueError):
    """A direct worker's declaration is wrong; the message says how to fix it."""


@dataclass(frozen=True, slots=True)
class DirectSpec:
    """One direct worker. `health` "" means the edge's --health-path."""

    pool: str
    url: str  # normalised: http://HOST:PORT (IPv6 hosts in brackets)
    host: str
    port: int
    capacity: int = DEFAULT_CAPACITY
    health: str = ""
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", default_id(self.host, self.port))


def default_id(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"direct-{shown}:{port}"


def _fail(text: str, why: str) -> DirectSpecError:
    return DirectSpecError(f"{text!r}: {why}; expected {SYNTAX}, e.g. {EXAMPLE}")


def parse_url(text: str, url: str) -> tuple[str, str, int]:
    """(normalised URL, host, port) of a direct worker's URL; `text` is the
    whole declaration, for the message."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _fail(text, f"bad URL {url!r} ({exc})") from None
    if parts.scheme == "https":
        raise _fail(text, "https:// is not supported yet for direct workers (the VPN encrypts the leg); use http://")
    if parts.scheme != "http":
        raise _fail(text, f"the URL must start with http://, got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise _fail(text, "no user or password in the URL")
    host = parts.hostname or ""
    if not host or port is None:
        raise _fail(text, f"the URL needs a host and a port, like http://10.77.0.2:8000, got {url!r}")
    if not 0 < port < 65536:
        raise _fail(text, f"port {port} is out of range")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _fail(text, f"the URL must not have a path, query or fragment (requests keep their own path), "
                          f"got {url!r}")
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    shown = f"[{host}]" if literal is not None and literal.version == 6 else host
    return f"http://{shown}:{port}", host, port


def parse_direct(text: str) -> DirectSpec:
    """One declaration, `POOL=URL[,capacity=N][,health=PATH][,id=NAME]`."""
    text = text.strip()
    first, *options = text.split(",")
    pool, sep, url = first.partition("=")
    pool, url = pool.strip(), url.strip()
    if not sep or not pool or not url:
        raise _fail(text, "it must start with POOL=URL")
    if not is_valid_name(pool):
        raise _fail(text, f"pool name {pool!r} is not {NAME_RULE}")
    norm, host, port = parse_url(text, url)
    capacity, health, ident = DEFAULT_CAPACITY, "", ""
    seen: set[str] = set()
    for opt in options:
        key, sep, value = opt.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or key not in ("capacity", "health", "id"):
            raise _fail(text, f"unknown option {opt.strip()!r} (the options are capacity=N, health=PATH, id=NAME)")
        if key in seen:
            raise _fail(text, f"{key}= is given twice")
        seen.add(key)
        if key == "capacity":
            if not value.isdigit() or not 1 <= int(value) <= MAX_CAPACITY:
                raise _fail(text, f"capacity must be a whole number from 1 to {MAX_CAPACITY}, got {value!r}")
            capacity = int(value)
        elif key == "health":
            if not is_valid_health_path(value) or "," in value:
                raise _fail(text, f"health path {value!r} is not {HEALTH_PATH_RULE} (and no ',')")
            health = value
        else:
            if not is_valid_name(value):
                raise _fail(text, f"id {value!r} is not {NAME_RULE}")
            ident = value
    return DirectSpec(pool, norm, host, port, capacity, health, ident)


def parse_lines(text: str, source: str) -> list[DirectSpec]:
    """The declarations of a --directs file: one per line, blank lines and
    `#` comments ignored. Errors name the file and line."""
    specs: list[DirectSpec] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("--direct "):  # the lines `edge-proxy vpn init` prints, pasted as they are
            line = line[len("--direct ") :].strip()
        try:
            specs.append(parse_direct(line))
        except DirectSpecError as exc:
            raise DirectSpecError(f"{source} line {number}: {exc}") from None
    return specs


def check_unique(specs: list[DirectSpec]) -> None:
    """Each id once: two declarations of one id would replace each other."""
    seen: dict[str, DirectSpec] = {}
    for s in specs:
        if s.id in seen:
            raise DirectSpecError(f"direct worker id {s.id!r} is declared twice ({seen[s.id].url} and {s.url}); "
                                  "give each its own id=NAME")
        seen[s.id] = s


def load(flags: list[DirectSpec], path: str | None) -> list[DirectSpec]:
    """The whole set: the --direct flags, then the --directs file (if any)."""
    specs = list(flags)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise DirectSpecError(f"cannot read --directs file {path}: {exc.strerror or exc}; create it (one "
                                  f"{SYNTAX} per line) or drop --directs") from None
        except UnicodeDecodeError:
            raise DirectSpecError(f"--directs file {path} is not UTF-8 text") from None
        specs.extend(parse_lines(text, path))
    check_unique(specs)
    return specs
