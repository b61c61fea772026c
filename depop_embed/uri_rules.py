"""Which photo URIs the job may open: a photo URI is a value in an upstream row, so it is untrusted.

A URI is opened only when, after normalisation, it lies under one of `images.allowed_uri_prefixes`
(default: the folder that holds the photo table and `images.uri_root`). Local paths are compared
after `realpath`, so neither `..` nor a symlink leads out of an allowed folder. An http(s) host is
resolved once, every address it resolves to is classified, and the connection goes to the address
that was checked; each redirect hop is checked again. Every refusal raises the same
`PhotoError("forbidden_uri", ...)` whatever the cause, so a stored row does not tell whoever wrote it
what is behind an address.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

FORBIDDEN = "forbidden_uri"
_REFUSED = "refused by images.allowed_uri_prefixes and the address rules (README: hostile inputs)"
_WEB = ("http", "https")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def refused(uri: str):
    from depop_embed.photos import PhotoError  # photos imports this module

    return PhotoError(FORBIDDEN, f"{uri}: {_REFUSED}")


@dataclass(frozen=True)
class UriRules:
    """Normalised allow-list entries: absolute folders (no trailing slash) and lower-cased URI prefixes."""

    folders: tuple[str, ...]
    prefixes: tuple[str, ...]
    allow_private_networks: bool = False


def build_rules(entries: tuple[str, ...], allow_private_networks: bool) -> UriRules:
    """Rules from allow-list entries already validated by `entry_error`."""
    folders, prefixes = [], []
    for entry in entries:
        scheme = urlsplit(entry).scheme.lower()
        if scheme == "file":
            folders.append(os.path.normpath(unquote(urlsplit(entry).path)))
        elif len(scheme) > 1:
            prefixes.append(normalise_uri(entry))
        else:
            folders.append(os.path.normpath(entry))
    return UriRules(tuple(folders), tuple(prefixes), allow_private_networks)


def entry_error(entry: str) -> str | None:
    """Why an allow-list entry is neither an absolute folder nor a URI prefix with a host; None if fine."""
    if not isinstance(entry, str) or not entry.strip():
        return "an empty entry"
    parts = urlsplit(entry)
    if parts.scheme.lower() == "file":
        return None if parts.path.startswith("/") else f"{entry!r}: a file: entry needs an absolute path"
    if len(parts.scheme) > 1:
        if not parts.netloc:
            return f"{entry!r}: a URI prefix needs a host or bucket (scheme://host/...)"
        if parts.scheme.lower() in _WEB and (parts.username is not None or parts.password is not None):
            return f"{entry!r}: an http(s) prefix takes no user info"
        return None
    if entry.startswith("/"):
        return None
    return f"{entry!r} is neither a URI prefix (scheme://host/...) nor an absolute folder"


def normalise_uri(uri: str) -> str:
    """scheme://host[:port]/path?query with scheme and host lower-cased, http(s) user info dropped and
    `.`/`..` segments resolved (also when percent-encoded), so what is matched is what is requested."""
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    if scheme in _WEB:
        host = (parts.hostname or "").rstrip(".")
        host = f"[{host}]" if ":" in host else host
        netloc = f"{host}:{parts.port}" if parts.port is not None else host
    else:  # an object store's bucket or container@account (lower-case names, whatever the row says)
        netloc = parts.netloc.lower()
    path = _remove_dot_segments(parts.path.replace("%2e", ".").replace("%2E", "."))
    return urlunsplit((scheme, netloc, path, parts.query, ""))


def _remove_dot_segments(path: str) -> str:
    """RFC 3986's: `.` and `..` segments go (never above the root); empty segments (`//`) stay, as a
    server sees them."""
    segments = path.split("/")
    out: list[str] = []
    for i, segment in enumerate(segments):
        if segment in (".", ".."):
            if segment == ".." and len(out) > 1:
                out.pop()
            if i == len(segments) - 1:
                out.append("")
            continue
        out.append(segment)
    return "/".join(out)


def check_uri(uri: str, rules: UriRules) -> str:
    """The normalised URI (local paths: the real path) to open; raises forbidden_uri outside the allow-list."""
    try:
        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        if scheme == "file" or len(scheme) <= 1:  # a plain path, a file: URI (one letter: a Windows drive)
            path = os.path.realpath(unquote(parts.path) if scheme == "file" else uri)
            if any(_is_under(path, folder) for folder in _real_folders(rules.folders)):
                return path
            raise refused(uri)
        if scheme in _WEB and (parts.username is not None or parts.password is not None):
            raise refused(uri)
        normal = normalise_uri(uri)
    except ValueError as exc:  # an invalid port, a malformed IPv6 literal
        raise refused(uri) from exc
    if any(_has_prefix(normal, prefix) for prefix in rules.prefixes):
        return normal
    raise refused(uri)


def resolve(host: str, port: int, rules: UriRules) -> tuple[str, int]:
    """(address, port) to connect to: the host resolved once; refused when any address it resolves to
    is not public (a DNS name that answers with one public and one private address is refused too)."""
    from depop_embed.photos import PhotoError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise PhotoError("connection", f"{host}: cannot resolve ({exc})") from exc
    if not rules.allow_private_networks and any(is_forbidden_address(info[4][0]) for info in infos):
        raise refused(host)
    return infos[0][4][:2]


def is_forbidden_address(address: str) -> bool:
    """Whether an IP address (as getaddrinfo returns it) is loopback, private, link-local (which holds
    the cloud metadata address), multicast, unspecified, reserved or otherwise not globally routable,
    including through its IPv4-mapped, 6to4 and NAT64 spellings."""
    return _is_forbidden(ipaddress.ip_address(address.split("%", 1)[0]))  # without an IPv6 zone id


def _is_forbidden(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        # Spellings that carry an IPv4 address reach that address: it decides. (Teredo, 2001::/32, is
        # never global, so it is refused on its own.)
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return _is_forbidden(embedded)
    return (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified
        or ip.is_reserved or not ip.is_global
    )


def _has_prefix(uri: str, prefix: str) -> bool:
    # https://cdn.example.com must not admit https://cdn.example.com.evil.org/
    return uri.startswith(prefix) and (prefix.endswith("/") or len(uri) == len(prefix) or uri[len(prefix)] in "/?")


def _is_under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


@functools.lru_cache(maxsize=64)
def _real_folders(folders: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(os.path.realpath(f) for f in folders)
