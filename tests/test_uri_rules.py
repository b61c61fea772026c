"""Photo URIs are untrusted (depop_embed/uri_rules.py): the allow-list, the address rules, redirects and
local path escapes. Traffic goes only to the 127.0.0.1 test server; every other address is judged by
the classification code itself, which sends nothing."""

from __future__ import annotations

import os

import fsspec
import pytest

from depop_embed import config, sources, uri_rules
from depop_embed.config import FetchConfig
from depop_embed.photos import PhotoError, is_refused, next_hop, read_bytes
from depop_embed.uri_rules import build_rules, check_uri, is_forbidden_address, resolve
from hostile_corpus import encoded, quadrants

from conftest import make_config

PHOTO = encoded(quadrants(), "PNG")
FETCH = FetchConfig(timeout_s=1, retries=0, backoff_s=0, max_bytes=100_000)
# Spellings of the test server's address a row could use; it listens on 127.0.0.1 only, so 127.0.0.2
# cannot be fetched even where private networks are allowed.
SPELLINGS = ["127.0.0.1", "localhost", "127.0.0.2", "2130706433", "[::ffff:127.0.0.1]"]
REACHABLE = ["127.0.0.1", "localhost", "2130706433", "[::ffff:127.0.0.1]"]


@pytest.fixture(scope="module")
def server(photo_server):
    photo_server.add("a.png", PHOTO, "image/png")
    return photo_server


def refusal(uri: str, rules) -> PhotoError:
    with pytest.raises(PhotoError) as info:
        read_bytes(uri, FETCH, rules)
    assert info.value.code == "forbidden_uri" and is_refused(str(info.value)), str(info.value)
    return info.value


def spelled(server, host: str, path: str = "/photo/a.png") -> str:
    return server.url(path, host)


# -- the address rules, on the classification function ------------------------------------------------

@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.0.0.2", "127.255.255.254", "::1",  # loopback
    "10.0.0.1", "172.16.5.4", "192.168.1.1", "fd00::1", "fc00::1",  # private (RFC 1918, fc00::/7)
    "169.254.169.254", "169.254.0.1", "fe80::1", "fe80::1%eth0",  # link-local: the cloud metadata address
    "224.0.0.1", "239.255.255.250", "ff02::1",  # multicast
    "0.0.0.0", "::",  # unspecified
    "100.64.0.1", "240.0.0.1", "255.255.255.255", "198.18.0.1", "192.0.2.1",  # shared, reserved, test nets
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1",  # IPv4-mapped
    "2002:7f00:1::", "2002:a9fe:a9fe::1",  # 6to4 of 127.0.0.1, of the metadata address
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe",  # NAT64 of them
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo whose client is 127.0.0.1
])
def test_non_public_addresses_in_every_spelling_are_forbidden(address):
    assert is_forbidden_address(address)


@pytest.mark.parametrize("address", ["8.8.8.8", "151.101.1.69", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_not(address):
    assert not is_forbidden_address(address)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "127.0.0.2", "2130706433", "0x7f.0.0.1", "0177.0.0.1",
                                  "127.1", "::ffff:127.0.0.1", "0"])
def test_every_spelling_the_resolver_accepts_is_classified_by_what_it_resolves_to(host):
    # Numeric spellings and localhost resolve without a DNS query; nothing is sent anywhere.
    with pytest.raises(PhotoError) as info:
        resolve(host, 80, build_rules((), allow_private_networks=False))
    assert info.value.code == "forbidden_uri"
    address, port = resolve(host, 80, build_rules((), allow_private_networks=True))
    assert is_forbidden_address(address) and port == 80


# -- the allow-list, on normalised URIs ---------------------------------------------------------------

CDN = build_rules((
    "https://cdn.example.com/photos/", "https://img.example.com", "s3://bucket/photos/",
    "abfss://photos@account.dfs.core.windows.net/listings/",
), False)


@pytest.mark.parametrize("uri, allowed", [
    ("https://cdn.example.com/photos/a.jpg", "https://cdn.example.com/photos/a.jpg"),
    ("HTTPS://CDN.Example.COM/photos/a.jpg", "https://cdn.example.com/photos/a.jpg"),
    ("https://cdn.example.com/photos/x/../a.jpg", "https://cdn.example.com/photos/a.jpg"),
    ("https://cdn.example.com/photos//a.jpg", "https://cdn.example.com/photos//a.jpg"),  # as the server sees it
    ("https://img.example.com/a.jpg?w=200", "https://img.example.com/a.jpg?w=200"),
    ("https://img.example.com", "https://img.example.com"),
    ("s3://bucket/photos/2024/a.jpg", "s3://bucket/photos/2024/a.jpg"),
    ("abfss://photos@Account.dfs.core.windows.net/listings/a.jpg", "abfss://photos@account.dfs.core.windows.net/listings/a.jpg"),
])
def test_allowed_uris_are_normalised_to_what_is_requested(uri, allowed):
    assert check_uri(uri, CDN) == allowed


@pytest.mark.parametrize("uri", [
    "https://cdn.example.com/photos/../private/a.jpg",  # dot segments resolved before matching
    "https://cdn.example.com/photos/%2e%2e/private/a.jpg",  # also percent-encoded
    "https://cdn.example.com/photosecret/a.jpg",  # not at a segment boundary
    "https://img.example.com.evil.org/a.jpg",  # a host that starts with an allowed one
    "https://cdn.example.com@evil.org/photos/a.jpg",  # user info: the host is evil.org
    "https://cdn.example.com:8443/photos/a.jpg",  # another port is another origin
    "http://cdn.example.com/photos/a.jpg",  # another scheme
    "s3://other-bucket/photos/a.jpg", "s3://bucket/private/a.jpg", "s3://bucket/photos/../private/a.jpg",
    "abfss://secrets@account.dfs.core.windows.net/listings/a.jpg",
    "memory://photos/a.jpg", "ftp://cdn.example.com/photos/a.jpg", "gs://bucket/photos/a.jpg",
    "https://[::1", "https://cdn.example.com:99999/photos/a.jpg",  # malformed
])
def test_uris_outside_the_allow_list_are_refused(uri):
    with pytest.raises(PhotoError) as info:
        check_uri(uri, CDN)
    assert info.value.code == "forbidden_uri"


def test_redirect_targets_are_checked_again_and_never_downgrade_to_http():
    rules = build_rules(("https://cdn.example.com/", "http://cdn.example.com/"), False)
    assert next_hop("https://cdn.example.com/a.jpg", "/b.jpg", rules) == "https://cdn.example.com/b.jpg"
    for url, location in [
        ("https://cdn.example.com/a.jpg", "http://cdn.example.com/a.jpg"),  # https -> http
        ("https://cdn.example.com/a.jpg", "https://evil.org/a.jpg"),  # out of the allow-list
        ("https://cdn.example.com/a.jpg", "file:///etc/passwd"),
    ]:
        with pytest.raises(PhotoError, match="forbidden_uri"):
            next_hop(url, location, rules)
    # That an allowed hop's address is checked again is shown on a real hop, against the loopback server:
    # test_every_redirect_hop_goes_through_the_address_rules.


# -- the test server is never reached -----------------------------------------------------------------

def test_with_the_default_config_no_spelling_of_the_server_is_reached(server, tmp_path):
    rules = sources.photo_rules(make_config(tmp_path).images)
    before = server.connections
    for host in SPELLINGS:
        refusal(spelled(server, host), rules)
    assert server.connections == before


def test_allow_listed_private_hosts_are_refused_by_address_and_fetched_once_private_networks_are_allowed(server):
    prefixes = tuple(spelled(server, host, "/photo/") for host in SPELLINGS)
    before = server.connections
    for host in SPELLINGS:
        refusal(spelled(server, host), build_rules(prefixes, allow_private_networks=False))
    assert server.connections == before  # refused before any connection

    private = build_rules(prefixes, allow_private_networks=True)
    for host in REACHABLE:
        assert read_bytes(spelled(server, host), FETCH, private) == PHOTO, host
    assert server.connections == before + len(REACHABLE)


def test_refusals_read_the_same_whatever_the_cause(server, tmp_path):
    uri = spelled(server, "127.0.0.1")
    by_allow_list = refusal(uri, sources.photo_rules(make_config(tmp_path).images))
    by_address = refusal(uri, build_rules((server.url("/"),), allow_private_networks=False))
    assert str(by_allow_list) == str(by_address) == f"forbidden_uri: {uri}: {uri_rules._REFUSED}"


def test_a_redirect_out_of_the_allow_list_is_not_followed(server):
    rules = build_rules((server.url("/redirect/"), server.url("/photo/")), allow_private_networks=True)
    fetched, outside = server.hits["/photo/a.png"], server.hits["/notype/a.png"]  # the server is the session's
    assert read_bytes(server.url("/redirect/photo/a.png"), FETCH, rules) == PHOTO  # a redirect inside is followed
    whole_server = build_rules((server.url("/"),), allow_private_networks=True)
    for target, allowing in [("notype/a.png", rules), (spelled(server, "localhost", "/photo/a.png"), whole_server)]:
        uri = server.url(f"/redirect/{target}")
        assert str(refusal(uri, allowing)) == f"forbidden_uri: {uri}: {uri_rules._REFUSED}"  # the target is not told
    assert server.hits["/notype/a.png"] == outside
    assert server.hits["/photo/a.png"] == fetched + 1  # only the redirect inside the allow-list


def test_every_redirect_hop_goes_through_the_address_rules(server, monkeypatch):
    """A first hop whose address is taken as public (as a CDN's would be) redirects to an allow-listed
    loopback spelling: the second hop's address is checked again and refused, unconnected."""
    real = uri_rules.is_forbidden_address
    monkeypatch.setattr(uri_rules, "is_forbidden_address", lambda address: address != "127.0.0.1" and real(address))
    mapped = spelled(server, "[::ffff:127.0.0.1]", "/photo/a.png")
    rules = build_rules((server.url("/redirect/"), spelled(server, "[::ffff:127.0.0.1]", "/photo/")), False)
    before, fetched = server.connections, server.hits["/photo/a.png"]
    refusal(server.url(f"/redirect/{mapped}"), rules)
    assert server.connections == before + 1 and server.hits["/photo/a.png"] == fetched  # the first hop only


def test_redirects_are_followed_a_few_times_only(server):
    rules = build_rules((server.url("/"),), allow_private_networks=True)
    loop = "/redirect/redirect/redirect/redirect/photo/a.png"
    with pytest.raises(PhotoError, match="too_many_redirects"):
        read_bytes(server.url(loop), FETCH, rules)


def test_other_schemes_to_the_server_are_refused_unconnected(server, tmp_path):
    rules = sources.photo_rules(make_config(tmp_path).images)
    before = server.connections
    refusal(f"ftp://127.0.0.1:{server.port}/photo/a.png", rules)
    assert server.connections == before


# -- local paths and fsspec ---------------------------------------------------------------------------

def test_local_escapes_are_refused_unopened(tmp_path):
    folder, outside = tmp_path / "photos", tmp_path / "private"
    folder.mkdir(), outside.mkdir()
    (outside / "secret.jpg").write_bytes(PHOTO)
    (folder / "ok.jpg").write_bytes(PHOTO)
    os.symlink(outside / "secret.jpg", folder / "link_out.jpg")
    os.symlink(folder / "ok.jpg", folder / "link_in.jpg")
    os.symlink(outside, folder / "dir_out")
    rules = build_rules((str(folder),), allow_private_networks=False)
    assert read_bytes(str(folder / "ok.jpg"), FETCH, rules) == PHOTO
    assert read_bytes(str(folder / "link_in.jpg"), FETCH, rules) == PHOTO
    for uri in ["file:///etc/passwd", "/etc/passwd", f"{folder}/../private/secret.jpg", f"{folder}/link_out.jpg",
                f"{folder}/dir_out/secret.jpg", f"file://{folder}/%2e%2e/private/secret.jpg", "/dev/zero",
                f"{folder}x/ok.jpg"]:
        before = os.stat(outside / "secret.jpg").st_atime_ns
        refusal(uri, rules)
        assert os.stat(outside / "secret.jpg").st_atime_ns == before


def test_fsspec_schemes_only_where_the_allow_list_names_them(tmp_path):
    with fsspec.open("memory://photos/a.png", "wb") as fh:
        fh.write(PHOTO)
    refusal("memory://photos/a.png", sources.photo_rules(make_config(tmp_path).images))
    assert read_bytes("memory://photos/a.png", FETCH, build_rules(("memory://photos/",), False)) == PHOTO


# -- the defaults -------------------------------------------------------------------------------------

def test_default_rules_are_the_photo_table_folder_and_the_uri_root(tmp_path):
    images = tmp_path / "src" / "listing_images.jsonl"
    assert sources.photo_rules(make_config(tmp_path, images=images).images) == build_rules((str(tmp_path / "src"),), False)
    with_root = make_config(tmp_path, f"images.uri_root={tmp_path / 'photos'}", images=images).images
    assert sources.photo_rules(with_root).folders == (str(tmp_path / "photos"), str(tmp_path / "src"))
    explicit = make_config(tmp_path, "images.allowed_uri_prefixes=[s3://bucket/photos/]", images=images).images
    assert sources.photo_rules(explicit) == build_rules(("s3://bucket/photos/",), False)  # instead of the defaults


def test_databricks_names_the_photo_volume_only():
    rules = sources.photo_rules(config.load("databricks").images)
    assert rules == build_rules(("/Volumes/main/marketplace/listing_photos",), allow_private_networks=False)
