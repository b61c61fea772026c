"""Hostile inputs, generated: photos, texts and source rows that production sees, each with what the
job must make of it (`None`: an ok row; else the reason code of its error row).

`write_corpus` mixes them into a normal synthetic catalogue and writes the job's two source files.
The image builders are also used on their own by the decoder's unit tests.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from depop_embed.sample_catalogue import write_catalogue

# The corpus run's caps: small enough that the bombs below are over them, large enough for every
# normal photo; the huge JPEG is decoded at 1/4 scale under the pixel cap.
MAX_IMAGE_PIXELS = 2_000_000
MAX_BYTES = 2_000_000
RED, GREEN, BLUE, YELLOW = (220, 20, 30), (20, 180, 40), (30, 40, 200), (240, 220, 10)


# --- image builders -----------------------------------------------------------------------------

def encoded(image: Image.Image, fmt: str, **save_args) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **save_args)
    return buf.getvalue()


def quadrants(width: int = 48, height: int = 32) -> Image.Image:
    """Four solid colours, so any turn or flip of the image is visible in its corners."""
    image = Image.new("RGB", (width, height), RED)
    image.paste(GREEN, (width // 2, 0, width, height // 2))
    image.paste(BLUE, (0, height // 2, width // 2, height))
    image.paste(YELLOW, (width // 2, height // 2, width, height))
    return image


def png(width: int, height: int, bit_depth: int, colour_type: int, rows=None) -> bytes:
    """A PNG written chunk by chunk, for what Pillow will not write: 16-bit colour, lying headers,
    bombs. `rows`: an iterable of raw scanlines (without the filter byte); None writes no pixel data."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0))
    if rows is not None:
        deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
        idat = b"".join(deflate.compress(b"\x00" + row) for row in rows) + deflate.flush()
        out += chunk(b"IDAT", idat)
    return out + chunk(b"IEND", b"")


def grey16() -> tuple[bytes, Image.Image]:
    """A 16-bit greyscale ramp, and the 8-bit image it must become (x / 257, not clipped at 255)."""
    samples = np.linspace(0, 65535, 64 * 16).round().astype(np.uint16).reshape(16, 64)
    rows = [row.astype(">u2").tobytes() for row in samples]
    expected = Image.fromarray(np.round(samples / 257).astype(np.uint8), "L").convert("RGB")
    return png(64, 16, 16, 0, rows), expected


def rgb16() -> tuple[bytes, Image.Image]:
    """A 16-bit RGB photo of two colours, and its 8-bit version."""
    left, right = (0x8000, 0x4000, 0xFFFF), (0x1000, 0xF000, 0x0100)
    row = np.array([left] * 16 + [right] * 16, dtype=">u2").tobytes()
    expected = Image.new("RGB", (32, 8), tuple(round(v / 257) for v in left))
    expected.paste(tuple(round(v / 257) for v in right), (16, 0, 32, 8))
    return png(32, 8, 16, 2, [row] * 8), expected


def one_bit() -> tuple[bytes, Image.Image]:
    image = Image.new("1", (40, 24), 0)
    image.paste(1, (0, 0, 20, 24))
    expected = Image.new("RGB", (40, 24), (0, 0, 0))
    expected.paste((255, 255, 255), (0, 0, 20, 24))
    return encoded(image, "PNG"), expected


def palette_with_transparency() -> tuple[bytes, Image.Image]:
    image = Image.new("P", (30, 20), 0)
    image.putpalette([*GREEN, *BLUE] + [0, 0, 0] * 254)
    image.paste(1, (15, 0, 30, 20))
    expected = Image.new("RGB", (30, 20), (255, 255, 255))
    expected.paste(BLUE, (15, 0, 30, 20))
    return encoded(image, "PNG", transparency=0), expected


def rgba() -> tuple[bytes, Image.Image]:
    image = Image.new("RGBA", (30, 20), (*RED, 0))
    image.paste((*BLUE, 255), (0, 10, 30, 20))
    expected = Image.new("RGB", (30, 20), (255, 255, 255))
    expected.paste(BLUE, (0, 10, 30, 20))
    return encoded(image, "PNG"), expected


def grey_alpha() -> tuple[bytes, Image.Image]:
    image = Image.new("LA", (30, 20), (40, 255))
    image.paste((200, 0), (0, 0, 10, 20))
    expected = Image.new("RGB", (30, 20), (40, 40, 40))
    expected.paste((255, 255, 255), (0, 0, 10, 20))
    return encoded(image, "PNG"), expected


def rgb_colour_key() -> tuple[bytes, Image.Image]:
    """RGB with a tRNS colour key: every pixel of that colour is transparent."""
    image = Image.new("RGB", (30, 20), GREEN)
    image.paste(RED, (0, 0, 30, 5))
    expected = Image.new("RGB", (30, 20), (255, 255, 255))
    expected.paste(RED, (0, 0, 30, 5))
    return encoded(image, "PNG", transparency=GREEN), expected


def animated(fmt: str) -> tuple[bytes, Image.Image]:
    """Three frames; a photo is its first frame."""
    frames = [quadrants(), Image.new("RGB", (48, 32), GREEN), Image.new("RGB", (48, 32), BLUE)]
    options = {"lossless": True} if fmt == "WEBP" else {}
    return encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **options), frames[0]


def with_orientation(orientation: int, fmt: str = "PNG") -> tuple[bytes, Image.Image]:
    """A photo stored sideways with the EXIF orientation a phone writes, and how it must be shown."""
    upright = quadrants()
    # To display: 3 = turn 180°, 6 = turn 90° clockwise, 8 = turn 90° anticlockwise; stored is the inverse.
    stored = upright.rotate({3: 180, 6: 90, 8: -90}[orientation], expand=True)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(stored, fmt, exif=exif), upright


def malformed_exif() -> bytes:
    """Orientation 6 plus a rational tag (XPosition) that holds text: Pillow fails to rewrite it."""
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "Maker"
    raw = exif.tobytes().replace(b"\x01\x0f\x00\x02", b"\x01\x1f\x00\x02")
    return encoded(quadrants(40, 20), "JPEG", exif=raw)


def cmyk_jpeg() -> bytes:
    image = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # red in ink
    image.paste((255, 0, 255, 0), (16, 0, 32, 32))  # green
    return encoded(image, "JPEG", quality=95)


def png_bomb(side: int = 8000) -> bytes:
    """A real side x side RGB PNG of zeros: a few hundred KB that decode to side² x 3 bytes."""
    return png(side, side, 8, 2, (bytes(side * 3) for _ in range(side)))


def header_only_png(width: int, height: int) -> bytes:
    """A header announcing a huge image and no pixel data: refused on the header or it would be 'corrupt'."""
    return png(width, height, 8, 2)


def gif_bomb(side: int = 3000) -> bytes:
    return encoded(Image.new("P", (side, side), 0), "GIF")


def webp_bomb(side: int = 3000) -> bytes:
    """A lossless WebP of one colour: tens of bytes, side² x 3 bytes decoded."""
    return encoded(Image.new("RGB", (side, side), RED), "WEBP", lossless=True, method=0)


def huge_jpeg(width: int = 6000, height: int = 4000) -> bytes:
    return encoded(Image.new("L", (width, height), 90), "JPEG", quality=50)


HEIC_LIKE = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(range(256)) * 4
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
HTML_PAGE = b"<!doctype html><html><head><title>404 Not Found</title></head><body>Not Found</body></html>"


# --- the corpus ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class PhotoCase:
    name: str
    expected: str | None  # reason code of the error row; None: status ok
    data: bytes | None = None  # written to photos/hostile/<name><ext>
    ext: str = ".jpg"
    uri: str | None = None  # used instead of a written file (a URL, a missing path, "")
    upright: Image.Image | None = None  # what the decoded photo must equal, where that is exact


def photo_cases() -> list[PhotoCase]:
    good_jpeg = encoded(quadrants(64, 64), "JPEG", quality=90)
    return [
        PhotoCase("truncated_jpeg", "corrupt", good_jpeg[: len(good_jpeg) // 2]),
        PhotoCase("truncated_png", "corrupt", encoded(quadrants(64, 64), "PNG")[:-40], ".png"),
        PhotoCase("zero_bytes", "empty", b""),
        PhotoCase("png_named_jpg", None, encoded(quadrants(), "PNG"), ".jpg", upright=quadrants()),
        PhotoCase("jpeg_named_png", None, good_jpeg, ".png"),
        PhotoCase("jpeg_without_extension", None, good_jpeg, ""),
        PhotoCase("cmyk_jpeg", None, cmyk_jpeg()),
        _decodes_to("grey_16bit_png", grey16(), ".png"),
        _decodes_to("rgb_16bit_png", rgb16(), ".png"),
        _decodes_to("one_bit_png", one_bit(), ".png"),
        _decodes_to("palette_transparent_png", palette_with_transparency(), ".png"),
        _decodes_to("rgba_png", rgba(), ".png"),
        _decodes_to("grey_alpha_png", grey_alpha(), ".png"),
        _decodes_to("colour_key_png", rgb_colour_key(), ".png"),
        _decodes_to("animated_gif", animated("GIF"), ".gif"),
        _decodes_to("animated_webp", animated("WEBP"), ".webp"),
        _decodes_to("exif_rotated_png", with_orientation(6), ".png"),
        PhotoCase("exif_rotated_jpeg", None, with_orientation(8, "JPEG")[0]),
        PhotoCase("malformed_exif_jpeg", None, malformed_exif()),
        PhotoCase("bmp", None, encoded(quadrants(), "BMP"), ".bmp", upright=quadrants()),
        PhotoCase("huge_jpeg_downscaled", None, huge_jpeg()),
        PhotoCase("heic", "unsupported_format", HEIC_LIKE, ".heic"),
        PhotoCase("eps", "unsupported_format", EPS, ".eps"),
        PhotoCase("html_saved_as_jpg", "unsupported_format", HTML_PAGE),
        PhotoCase("png_bomb", "too_large", png_bomb(), ".png"),
        PhotoCase("png_header_only_9000x9000", "too_large", header_only_png(9000, 9000), ".png"),
        PhotoCase("gif_bomb", "too_large", gif_bomb(), ".gif"),
        PhotoCase("elongated_20000x1", "bad_aspect_ratio", png(20000, 1, 8, 2, [bytes(60000)]), ".png"),
        PhotoCase("webp_bomb", "too_large", webp_bomb(), ".webp"),
        PhotoCase("over_byte_cap", "too_large", b"\xff\xd8\xff\xe0" + bytes(range(256)) * (MAX_BYTES // 256 + 1)),
        PhotoCase("missing_file", "missing", uri="photos/hostile/not_there.jpg"),
        PhotoCase("empty_uri", "missing", uri=""),
    ]


def http_cases(server) -> list[PhotoCase]:
    """Remote photos; the server must be the one the test serves (`photo_server` fixture)."""
    server.add("remote.jpg", encoded(quadrants(), "PNG"), "image/png")
    return [
        PhotoCase("http_ok", None, uri=server.url("/photo/remote.jpg"), upright=quadrants()),
        PhotoCase("http_no_content_type", None, uri=server.url("/notype/remote.jpg")),
        PhotoCase("http_500_then_200", None, uri=server.url("/flaky/1/500/remote.jpg")),
        PhotoCase("http_429_then_200", None, uri=server.url("/flaky/1/429/remote.jpg")),
        PhotoCase("http_404", "not_found", uri=server.url("/status/404/remote.jpg")),
        PhotoCase("http_403", "http_4xx", uri=server.url("/status/403/remote.jpg")),
        PhotoCase("http_500", "http_5xx", uri=server.url("/status/500/remote.jpg")),
        PhotoCase("http_slow", "timeout", uri=server.url("/slow/3/remote.jpg")),
        PhotoCase("http_truncated", "truncated", uri=server.url("/truncated/remote.jpg")),
        PhotoCase("http_html", "not_an_image", uri=server.url("/html/remote.jpg")),
        PhotoCase("http_declared_huge", "too_large", uri=server.url("/declared-huge/remote.jpg")),
    ]


REFUSED_PHOTO = "refused.jpg"  # served, but only ever asked for through URIs the job must refuse


def refused_cases(out: Path, server) -> list[PhotoCase]:
    """URIs the job's rules refuse unopened (it allows the corpus folder and the server, private
    networks included); the files and the server's photo are there to be read if they were opened."""
    import os

    photo = encoded(quadrants(), "PNG")
    server.add(REFUSED_PHOTO, photo, "image/png")
    outside = out.parent / "outside"
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.png").write_bytes(photo)
    link = out / "photos" / "hostile" / "link_out.png"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.is_symlink():
        os.symlink(outside / "secret.png", link)
    localhost = server.url(f"/photo/{REFUSED_PHOTO}", "localhost")
    return [
        PhotoCase(f"refused_{name}", "forbidden_uri", uri=uri)
        for name, uri in [
            ("etc_passwd", "file:///etc/passwd"),
            ("dotdot_escape", "photos/../../outside/secret.png"),  # relative: resolved against the corpus folder
            ("symlink_out", "photos/hostile/link_out.png"),
            ("memory_scheme", "memory://photos/secret.png"),
            ("ftp_scheme", f"ftp://127.0.0.1:{server.port}/photo/{REFUSED_PHOTO}"),
            ("localhost", localhost),  # the allowed server under another name: not in the allow-list
            ("decimal_ip", server.url(f"/photo/{REFUSED_PHOTO}", "2130706433")),
            ("redirect_out", server.url(f"/redirect/{localhost}")),
        ]
    ]


def allowed_prefixes(corpus: "Corpus", server) -> str:
    """The --set value of images.allowed_uri_prefixes for the corpus: its folder and the server."""
    return json.dumps([str(corpus.images_path.parent), server.url("/")])


@dataclass(frozen=True)
class TextCase:
    name: str
    fields: dict  # listing fields over the defaults (all other fields null)
    expected: str | None  # None: ok; else the reason code
    text: str | None = None  # the exact text the template must render, where checked


MEGABYTES = 3
TEXT_CASES = [
    TextCase("all_null", {}, "empty_text"),
    TextCase("only_markup_and_controls", {"title": "<p> </p>", "description": "<script>alert('x')</script>\x00\x01",
                                          "brand": "\u202e\u200b", "colour": "   "}, "empty_text"),
    TextCase("html", {"title": "<b>Levi&#39;s</b> 501", "description": "<p>Great&nbsp;fit<br/>no flaws</p><!-- seo -->"},
             None, "Levi's 501. Great fit no flaws"),
    TextCase("emoji", {"title": "Y2K top ✨👗", "description": "👩‍👩‍👧 family bundle 🔥🔥"},
             None, "Y2K top ✨👗. 👩‍👩‍👧 family bundle 🔥🔥"),
    TextCase("arabic", {"title": "فستان أحمر", "brand": "زارا"}, None, "فستان أحمر. زارا"),
    TextCase("hebrew_with_bidi_override", {"title": "שמלה \u202eאדומה\u202c", "size": "M"}, None, "שמלה אדומה. size M"),
    TextCase("controls_and_tabs", {"title": "Nike\x00hoodie\x07", "description": "line1\r\n\tline2\x1b[31m"},
             None, "Nike hoodie. line1 line2 [31m"),
    TextCase("full_width", {"title": "ＮＩＫＥ　ＡＩＲ", "size": "１０"}, None, "NIKE AIR. size 10"),
    TextCase("megabyte_description", {"title": "Coat", "description": "warm wool " * (MEGABYTES * 100_000)}, None),
    TextCase("braces_in_text", {"title": "{title} {0} {brand!r}", "brand": "}{"}, None, "{title} {0} {brand!r}. }{"),
    TextCase("numbers_only", {"title": 12345, "size": 10.5}, None, "12345. size 10.5"),
]


@dataclass
class Corpus:
    listings_path: Path
    images_path: Path
    photos: dict[str, PhotoCase]  # by image_id, the hostile ones
    texts: dict[str, TextCase]  # by listing_id, the hostile ones
    good_photo_ids: list[str]
    good_listing_ids: list[str]
    counts: dict[str, int]  # what sources.read must report
    latest_title: dict[str, str] = field(default_factory=dict)  # listing_id -> the title the newest row has


def write_corpus(out: Path, server, n_good_listings: int = 100) -> Corpus:
    catalogue = write_catalogue(out, n_listings=n_good_listings, seed=21, max_photos=2, photo_size=(64, 80))
    listings = read_jsonl(catalogue.listings_path)
    photos = read_jsonl(catalogue.images_path)
    good_listing_ids = [row["listing_id"] for row in listings]
    good_photo_ids = [row["image_id"] for row in photos]
    (out / "photos" / "hostile").mkdir(parents=True, exist_ok=True)
    stamp = "2026-11-01T00:00:00+00:00"

    hostile_photos: dict[str, PhotoCase] = {}
    for case in photo_cases() + http_cases(server) + refused_cases(out, server):
        listing_id = f"HP-{case.name}"
        listings.append(_listing(listing_id, {"title": f"Listing with photo {case.name}"}, stamp))
        uri = case.uri
        if uri is None:
            uri = f"photos/hostile/{case.name}{case.ext}"
            (out / uri).write_bytes(case.data)
        image_id = f"{listing_id}-1"
        photos.append({"listing_id": listing_id, "image_id": image_id, "position": 0, "uri": uri, "updated_at": stamp})
        hostile_photos[image_id] = case

    hostile_texts: dict[str, TextCase] = {}
    for case in TEXT_CASES:
        listing_id = f"HT-{case.name}"
        listings.append(_listing(listing_id, case.fields, stamp))
        hostile_texts[listing_id] = case

    # Source rows: older duplicates (which must lose), a tie, rows without keys, orphan photos.
    first, second = photos[0], photos[1]
    older = "2020-01-01T00:00:00+00:00"
    photos.append({**first, "uri": "photos/hostile/an_old_upload_that_is_gone.jpg", "updated_at": older})
    photos.append(dict(second))  # the same row twice
    photos.append({**first, "image_id": None})
    photos.append({"listing_id": "NO-SUCH-LISTING", "image_id": "orphan-1", "position": 0, "uri": first["uri"], "updated_at": stamp})
    photos.append({"listing_id": "NO-SUCH-LISTING", "image_id": "orphan-2", "position": 1, "uri": first["uri"], "updated_at": stamp})
    listing = next(row for row in listings if row["listing_id"] == good_listing_ids[5])
    listings.append({**listing, "title": "OLD title that must lose", "updated_at": older})
    listings.append({**listing, "listing_id": None, "title": "a row without an id"})
    counts = {
        "listings_read": len(listings), "listings_duplicate": 1, "listings_without_key": 1,
        "photos_read": len(photos), "photos_duplicate": 2, "photos_without_key": 1, "photos_without_listing": 2,
    }
    write_jsonl(catalogue.listings_path, listings)
    write_jsonl(catalogue.images_path, photos)
    return Corpus(
        catalogue.listings_path, catalogue.images_path, hostile_photos, hostile_texts, good_photo_ids,
        good_listing_ids, counts, {listing["listing_id"]: listing["title"]},
    )


def _decodes_to(name: str, built: tuple[bytes, Image.Image], ext: str) -> PhotoCase:
    data, upright = built
    return PhotoCase(name, None, data, ext, upright=upright)


def _listing(listing_id: str, fields: dict, updated_at: str) -> dict:
    base = dict.fromkeys(("title", "description", "brand", "category", "size", "condition", "colour", "price", "currency", "status"))
    return {**base, **fields, "listing_id": listing_id, "updated_at": updated_at}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
