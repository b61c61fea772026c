"""Remote photos over HTTP, against a real server on 127.0.0.1 (tests/photo_server.py), which the
rules here allow explicitly (its prefix, and private networks): tests/test_uri_rules.py shows that
the default rules never reach it."""

from __future__ import annotations

import re
import socket
import time

import pytest

from depop_embed.config import FetchConfig
from depop_embed.photos import PhotoError, decode, is_transient, read_bytes
from depop_embed.uri_rules import build_rules
from hostile_corpus import encoded, quadrants

PHOTO = encoded(quadrants(), "PNG")
FAST = FetchConfig(timeout_s=0.5, retries=2, backoff_s=0.01, max_bytes=100_000)


@pytest.fixture(scope="module")
def server(photo_server):
    photo_server.add("a.png", PHOTO, "image/png")
    photo_server.add("b.jpg", PHOTO, "application/octet-stream")
    return photo_server


def on_server(server):
    """Rules that allow the test server, private address and all."""
    return build_rules((server.url("/"),), allow_private_networks=True)


def fetch_error(server, path: str, fetch: FetchConfig = FAST) -> tuple[PhotoError, int]:
    """The error a fetch raises, and how many requests the server saw for the path."""
    before = server.hits[path]
    with pytest.raises(PhotoError) as info:
        read_bytes(server.url(path), fetch, on_server(server))
    return info.value, server.hits[path] - before


@pytest.mark.parametrize("path", ["/photo/a.png", "/photo/b.jpg", "/notype/a.png", "/undeclared/a.png"])
def test_a_photo_is_fetched_whole(server, path):
    data = read_bytes(server.url(path), FAST, on_server(server))
    assert data == PHOTO and decode(data, 10_000).size == quadrants().size


@pytest.mark.parametrize("status, code", [(404, "not_found"), (410, "not_found"), (403, "http_4xx"), (400, "http_4xx")])
def test_client_errors_fail_at_once_without_retrying(server, status, code):
    error, requests = fetch_error(server, f"/status/{status}/a.png")
    assert (error.code, requests) == (code, 1)
    assert str(error) == f"{code}: HTTP {status} from {server.url(f'/status/{status}/a.png')}"
    assert not is_transient(str(error))


@pytest.mark.parametrize("status, code", [(500, "http_5xx"), (503, "http_5xx"), (429, "rate_limited")])
def test_server_errors_are_retried_then_reported_as_transient(server, status, code):
    error, requests = fetch_error(server, f"/status/{status}/a.png")
    assert (error.code, requests) == (code, 1 + FAST.retries)
    assert str(error).endswith(f"(after {1 + FAST.retries} attempts)") and is_transient(str(error))


@pytest.mark.parametrize("status", [500, 502, 429])
def test_a_flaky_server_succeeds_on_retry(server, status):
    path = f"/flaky/1/{status}/a.png"
    assert read_bytes(server.url(path), FAST, on_server(server)) == PHOTO
    assert server.hits[path] == 2


def test_retries_wait_with_exponential_backoff(server):
    fetch = FetchConfig(timeout_s=1, retries=2, backoff_s=0.2, max_bytes=100_000)
    started = time.monotonic()
    error, requests = fetch_error(server, "/status/503/b.jpg", fetch)
    assert requests == 3 and error.code == "http_5xx"
    assert time.monotonic() - started >= 0.2 + 0.4  # waits of backoff_s, then 2 x backoff_s


def test_no_retries_when_configured_off(server):
    error, requests = fetch_error(server, "/status/500/b.jpg", FetchConfig(retries=0, backoff_s=0))
    assert (error.code, requests) == ("http_5xx", 1) and "after 1 attempts" in str(error)


def test_a_server_that_does_not_answer_times_out(server):
    error, requests = fetch_error(server, "/slow/2/a.png")
    assert (error.code, requests) == ("timeout", 1 + FAST.retries) and is_transient(str(error))


def test_a_body_that_trickles_in_times_out_on_the_whole_body(server):
    # Each byte arrives well within the socket timeout; the body as a whole does not.
    server.add("dripped.jpg", b"\xff\xd8" + bytes(98), "image/jpeg")
    fetch = FetchConfig(timeout_s=0.3, retries=0, backoff_s=0, max_bytes=100_000)
    error, _ = fetch_error(server, "/drip/0.05/dripped.jpg", fetch)
    assert error.code == "timeout"
    received = int(re.search(r"\((\d+) bytes so far\)", str(error)).group(1))
    assert received < 50  # it gave up at the deadline, not after the 100 bytes (5 s) had all come


def test_a_truncated_body_is_retried_then_reported(server):
    error, requests = fetch_error(server, "/truncated/a.png")
    assert (error.code, requests) == ("truncated", 1 + FAST.retries)
    assert f"got {len(PHOTO)} of {len(PHOTO) + 1000} bytes" in str(error) and is_transient(str(error))


def test_html_instead_of_an_image_is_an_error_without_retrying(server):
    error, requests = fetch_error(server, "/html/a.png")
    assert (error.code, requests) == ("not_an_image", 1)
    assert "Content-Type text/html" in str(error) and not is_transient(str(error))


def test_size_cap_declared_and_undeclared(server):
    error, requests = fetch_error(server, "/declared-huge/a.png")
    assert (error.code, requests) == ("too_large", 1)  # refused on the header, body never read
    small_cap = FetchConfig(timeout_s=1, retries=2, backoff_s=0, max_bytes=len(PHOTO) - 1)
    error, requests = fetch_error(server, "/undeclared/a.png", small_cap)
    assert (error.code, requests) == ("too_large", 1)
    assert "images.fetch.max_bytes" in str(error)


def test_nobody_listening_is_a_transient_connection_error():
    with socket.socket() as sock:  # a port that was free a moment ago
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rules = build_rules((f"http://127.0.0.1:{port}/",), allow_private_networks=True)
    with pytest.raises(PhotoError) as info:
        read_bytes(f"http://127.0.0.1:{port}/a.png", FetchConfig(timeout_s=1, retries=1, backoff_s=0), rules)
    assert info.value.code == "connection" and is_transient(str(info.value))


@pytest.mark.parametrize(
    "error, transient",
    [
        ("timeout: http://x/a.jpg: timed out (after 3 attempts)", True),
        ("http_5xx: HTTP 503 from http://x/a.jpg", True),
        ("rate_limited: HTTP 429 from http://x/a.jpg", True),
        ("connection: http://x/a.jpg: [Errno 111] Connection refused", True),
        ("read_failed: /Volumes/photos/a.jpg: [Errno 5] Input/output error", True),
        ("truncated: http://x/a.jpg: got 10 of 20 bytes", True),
        ("not_found: HTTP 404 from http://x/a.jpg", False),
        ("corrupt: OSError: image file is truncated", False),
        ("too_large: 9000x9000 pixels is over encode.max_image_pixels (2000000)", False),
        ("timeouts: not a code", False),
        ("", False),
        (None, False),
    ],
)
def test_is_transient_reads_the_code_of_an_error_value(error, transient):
    assert is_transient(error) is transient

